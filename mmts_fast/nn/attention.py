"""Grouped-query attention module over K3 (self- and cross-attention)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mmts_fast import ops


class GQAttention(nn.Module):
    """Multi-head attention with ``n_kv_heads`` key/value heads shared by groups of ``n_heads / n_kv_heads``
    query heads (GQA; MQA with one kv head, plain MHA with ``n_kv_heads = n_heads``), through
    :func:`mmts_fast.ops.gqa_attention` (Triton on CUDA, the eager reference elsewhere).

    Projections, named as in Hugging Face Llama so its weights load directly:
    ``q_proj [d_model -> n_heads*head_dim]``, ``k_proj`` / ``v_proj [d_context -> n_kv_heads*head_dim]``,
    ``o_proj [n_heads*head_dim -> d_model]``. No positional encoding (apply RoPE outside if needed) and
    no attention dropout.

    Args:
        d_model: width of the queries' input x and of the output.
        n_heads: query heads ``Hq``.
        n_kv_heads: key/value heads ``Hkv`` (``n_heads % n_kv_heads == 0``); None = n_heads.
        head_dim: ``D`` (at most 128); None = ``d_model // n_heads``.
        d_context: width of the cross-attention context; None = d_model (self-attention only).
        bias: biases on the four projections.
        scale: score scale; None = ``1 / sqrt(head_dim)``.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, d_context: Optional[int] = None, bias: bool = True,
                 scale: Optional[float] = None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"GQAttention: n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if head_dim is None:
            if d_model % n_heads != 0:
                raise ValueError(f"GQAttention: d_model={d_model} is not divisible by n_heads={n_heads}; "
                                 f"pass head_dim")
            head_dim = d_model // n_heads
        from mmts_fast.kernels.gqa_attention import MAX_HEAD_DIM
        if not 1 <= head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"GQAttention: head_dim={head_dim} (d_model={d_model} / n_heads={n_heads}) is not "
                             f"supported by gqa_attention: 1 <= head_dim <= {MAX_HEAD_DIM}; use more heads or "
                             f"pass head_dim")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.d_context = d_model if d_context is None else d_context
        self.scale = scale
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(self.d_context, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(self.d_context, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                causal: bool = False) -> Tensor:
        """x ``[B, L, d_model]``; context ``[B, S, d_context]`` (None: self-attention, S = L);
        key_padding_mask ``[B, S]`` bool, **True = attend**, False = padding (the opposite of
        ``nn.MultiheadAttention``); causal: bottom-right aligned (query i sees keys ``j <= i + S - L``).
        Returns ``[B, L, d_model]``; a query that sees no key gets the output projection of zeros."""
        if context is None:
            if self.d_context != self.d_model:
                raise ValueError(f"GQAttention: built for cross-attention (d_context={self.d_context} != "
                                 f"d_model={self.d_model}); pass a context")
            context = x
        B, L, _ = x.shape
        S = context.shape[1]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        # [B, L, H*D] -> [B, H, L, D] views: the op reads these strides directly, no copy
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)
        k = self.k_proj(context).view(B, S, Hkv, D).transpose(1, 2)
        v = self.v_proj(context).view(B, S, Hkv, D).transpose(1, 2)
        o = ops.gqa_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, H * D))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, d_context={self.d_context}")
