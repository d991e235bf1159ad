"""K3 attention inside Hugging Face Llama-family models (``LlamaForCausalLM``, ``LlamaModel``, trimmed SmolLM2,
D-LoRA-injected or not).

:func:`apply_fast_attention` switches a model, in place, to the attention implementation ``"mmts_fast_gqa"``
(:data:`ATTN_IMPLEMENTATION`), registered with transformers' two interfaces:

* ``AttentionInterface`` -> :func:`k3_attention_forward`: what ``LlamaAttention.forward`` calls with
  ``q [B, Hq, L, D]`` and the cache's **un-repeated** ``k, v [B, Hkv, Lk, D]``; it runs
  :func:`mmts_fast.ops.gqa_attention` (K3 looks the kv head up by index, nothing is repeated) and returns
  ``(attn_output [B, L, Hq, D], None)``.
* ``AttentionMaskInterface`` -> :func:`k3_attention_mask`: what ``create_causal_mask`` calls (once per model
  call) to build the mask every layer receives. For the plain causal pattern (Llama's, with or without a 2-D
  padding ``attention_mask``, with or without a KV cache) it does not materialise a ``[B, 1, Lq, Lk]`` mask but
  returns the compact form K3 takes:

  - ``None``: causal over all the keys, no padding (K3 ``causal=True``, no mask);
  - a 2-D bool ``[B, Lk']`` (``Lk' <= Lk``, True = attend): K3 ``causal=True`` over the first ``Lk'`` keys
    (the keys beyond are unwritten static-cache slots, never visible) with this key padding mask.

  Bottom-right causal alignment is then exactly HF's ``kv_idx <= q_idx`` in absolute positions: the queries
  are the last ``Lq`` of the ``Lk' = q_offset - kv_offset + Lq`` visible keys (prefill: ``Lk' = Lq``; cached
  decoding with a DynamicCache: ``Lq = 1``, ``Lk' = Lk``, the new token sees every cached key). Left and right
  padding only remove keys, which the key padding mask says.

  Any other pattern (sliding / chunked windows, packed sequences, ``or`` / ``and`` mask overlays,
  bidirectional masks, a static-cache query offset under ``torch.compile``) gets the eager additive 4-D mask
  (transformers' ``eager_mask``), and the attention function runs the eager math on it.

Falls back to the model's own eager attention (``eager_attention_forward`` of the attention module's modeling
file, i.e. exactly what ``attn_implementation="eager"`` computes; the mask converted to its additive form),
never to a wrong K3 call, when:

* the layer receives a 4-D mask (a caller's custom 4-D mask, or any pattern listed above);
* attention weights are requested (``output_attentions=True``): K3 never forms them;
* attention dropout is active (``dropout > 0``, i.e. training with ``config.attention_dropout > 0``);
* the call carries extras K3 has no notion of: ``sliding_window``, ``softcap``, ``s_aux`` / ``sinks``,
  ``position_bias`` (other models of the family; Llama passes none of them);
* K3 cannot take the tensors: head dim > 128, k and v of different shapes, a dtype other than fp32 / bf16 /
  fp16, ``Hq % Hkv != 0``.

One visible difference from eager: a query row that sees no key at all (a left-padding position, which sees only
padding) gets 0 from K3, where eager gives the uniform average over the masked keys. Such rows belong to padding
tokens; no real token ever reads them (they are masked as keys), so the logits of the real tokens are unchanged.

:func:`remove_fast_attention` restores the implementation the model had before.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from mmts_fast import ops

__all__ = ["ATTN_IMPLEMENTATION", "apply_fast_attention", "remove_fast_attention", "register_fast_attention",
           "k3_attention_forward", "k3_attention_mask"]

#: name of the attention implementation registered with transformers
ATTN_IMPLEMENTATION = "mmts_fast_gqa"
MAX_HEAD_DIM = 128
_PREV_ATTR = "_mmts_fast_prev_attn_implementation"
_K3_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")


# ---------------------------------------------------------------------------------------------
# Mask interface: HF's mask arguments -> None / 2-D key padding (K3) or the eager 4-D mask
# ---------------------------------------------------------------------------------------------
def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def k3_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                      mask_function=None, attention_mask: Optional[Tensor] = None,
                      allow_is_causal_skip: bool = True, **kwargs):
    """The ``AttentionMaskInterface`` entry for ``"mmts_fast_gqa"`` (see the module docstring).

    Plain causal pattern: returns ``None`` (no padding, every key) or a bool ``[B, Lk']`` key padding mask over
    the first ``Lk' = q_offset - kv_offset + q_length`` keys. Anything else: transformers' ``eager_mask``
    (additive float ``[B, 1, Lq, Lk]``), which :func:`k3_attention_forward` hands to eager attention.
    """
    from transformers.masking_utils import causal_mask_function, eager_mask, prepare_padding_mask

    fallback = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                    kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    if mask_function is not None:
        fallback["mask_function"] = mask_function
    plain_causal = mask_function is None or mask_function is causal_mask_function
    if isinstance(q_offset, Tensor):            # StaticCache: an int tensor (no graph break when compiled)
        if _is_compiling() or q_offset.numel() != 1:
            plain_causal = False
        else:
            q_offset = int(q_offset)
    if not isinstance(kv_offset, int) or isinstance(kv_length, Tensor):
        plain_causal = False
    if plain_causal:
        visible = q_offset - kv_offset + q_length   # keys the last query may see: [0, visible)
        if not (q_length <= visible <= kv_length):
            plain_causal = False
    if not plain_causal:
        # Never skip to None here: None means "plain causal" to the attention function.
        fallback["allow_is_bidirectional_skip"] = False
        return eager_mask(**fallback)

    if attention_mask is None:
        if visible == kv_length and allow_is_causal_skip:
            return None
        return torch.ones(batch_size, visible, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    padding = prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
    kpm = padding[:, kv_offset:kv_offset + visible]
    if kpm.shape[0] != batch_size:
        kpm = kpm.expand(batch_size, -1)
    # Like sdpa's is_causal skip: no padding among the visible keys -> no mask at all (a device sync, so not
    # while compiling, and not when the caller asked for a materialised mask).
    if visible == kv_length and allow_is_causal_skip and not _is_compiling() and bool(kpm.all()):
        return None
    return kpm


# ---------------------------------------------------------------------------------------------
# Attention interface
# ---------------------------------------------------------------------------------------------
def _wants_attention_weights(module: nn.Module, kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:   # transformers 5: output_attentions is collected by hooks on the attention modules' outputs
        from transformers.utils.output_capturing import _active_collector
        collected = _active_collector.get()
    except (ImportError, LookupError, AttributeError):
        collected = None
    if isinstance(collected, dict) and "attentions" in collected:
        return True
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _k3_can_run(q: Tensor, k: Tensor, v: Tensor, dropout: float, kwargs: dict) -> bool:
    if dropout:
        return False
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        return False
    if q.dim() != 4 or k.dim() != 4 or tuple(k.shape) != tuple(v.shape):
        return False
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return False
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        return False
    return q.dtype in _K3_DTYPES and q.dtype == k.dtype == v.dtype


def _dense_additive_mask(mask, q: Tensor, k: Tensor, causal: bool, sliding_window: Optional[int]):
    """None / 2-D key padding (the compact forms) / 4-D bool or float -> what eager attention adds to the scores
    (None, or a float ``[B, 1, Lq, Lk]`` with 0 = attend and the dtype's minimum = masked)."""
    from mmts_fast.kernels.gqa_attention import visible_keys

    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    if mask is not None and mask.dim() == 4:
        if mask.dtype != torch.bool:
            return mask
        allowed = mask
    else:
        if mask is None:
            if not (causal and Lq > 1) and sliding_window is None:
                return None
            n, kpm = Lk, None
        else:
            n, kpm = mask.shape[-1], mask.to(torch.bool)
        allowed = visible_keys(Lq, n, causal=causal, key_padding_mask=kpm, device=q.device)
        if sliding_window is not None:      # HF's overlay: kv_idx > q_idx - sliding_window (absolute positions)
            qpos = torch.arange(Lq, device=q.device)[:, None] + (n - Lq)
            allowed = allowed & (torch.arange(n, device=q.device)[None, :] > qpos - sliding_window)
        if n < Lk:
            allowed = torch.nn.functional.pad(allowed, (0, Lk - n), value=False)
        allowed = allowed.expand(B, Lq, Lk)[:, None]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    return torch.where(allowed, zero, torch.finfo(q.dtype).min)


def _repeat_kv(x: Tensor, n: int) -> Tensor:
    if n == 1:
        return x
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, n, L, D).reshape(B, H * n, L, D)


def _generic_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Llama's eager attention, for modules whose modeling file has no ``eager_attention_forward``."""
    n = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, n), _repeat_kv(value, n)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, : k.shape[-2]]
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _eager(module, query, key, value, attention_mask, dropout, scaling, causal, **kwargs):
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = _dense_additive_mask(attention_mask, query, key, causal, kwargs.get("sliding_window"))
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None or not hasattr(module, "num_key_value_groups"):
        fn = _generic_eager
    return fn(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def k3_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                         is_causal: Optional[bool] = None, **kwargs):
    """The ``AttentionInterface`` entry for ``"mmts_fast_gqa"``: ``query [B, Hq, Lq, D]``, ``key / value
    [B, Hkv, Lk, D]`` (not repeated), ``attention_mask`` as :func:`k3_attention_mask` makes it (None, 2-D bool
    ``[B, Lk']``) or any 4-D mask. Returns ``(attn_output [B, Lq, Hq, D], None)`` from K3, or eager attention's
    ``(output, weights)`` in the cases listed in the module docstring."""
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    compact = attention_mask is None or (isinstance(attention_mask, Tensor) and attention_mask.dim() == 2)
    if compact and attention_mask is not None:
        # 2-D key padding over the first Lk' keys: the causal pattern of k3_attention_mask
        causal = True
        if attention_mask.shape[0] != query.shape[0] or attention_mask.shape[1] > key.shape[2]:
            raise ValueError(f"{ATTN_IMPLEMENTATION}: 2-D attention mask {tuple(attention_mask.shape)} does not fit "
                             f"B={query.shape[0]}, Lk={key.shape[2]}")
    if not compact and not (isinstance(attention_mask, Tensor) and attention_mask.dim() == 4):
        raise TypeError(f"{ATTN_IMPLEMENTATION}: unsupported attention mask {type(attention_mask).__name__} "
                        f"(expected None, a 2-D key padding mask or a 4-D mask)")
    if (not compact or _wants_attention_weights(module, kwargs)
            or not _k3_can_run(query, key, value, dropout, kwargs)):
        return _eager(module, query, key, value, attention_mask, dropout, scaling, causal, **kwargs)

    kpm = None
    if attention_mask is not None:
        n = attention_mask.shape[1]
        if n < key.shape[2]:                    # unwritten (static-cache) slots beyond Lk': never visible
            key, value = key[:, :, :n], value[:, :, :n]
        kpm = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(torch.bool)
    out = ops.gqa_attention(query, key, value, causal=causal, key_padding_mask=kpm, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------------------
# Registration, apply / remove
# ---------------------------------------------------------------------------------------------
def register_fast_attention() -> str:
    """Register ``"mmts_fast_gqa"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``
    (global, idempotent). Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, k3_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, k3_attention_mask)
    return ATTN_IMPLEMENTATION


def _hf_models(model: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face ``PreTrainedModel`` (s): the model itself, else its top-most submodels."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return [model]
    found, inside = [], set()
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(p + ".") for p in inside):
            found.append(m)
            inside.add(name)
    if not found:
        raise TypeError(f"apply_fast_attention: {type(model).__name__} is not (and holds no) Hugging Face "
                        f"PreTrainedModel")
    return found


def apply_fast_attention(model: nn.Module) -> nn.Module:
    """Make a Hugging Face Llama-family model use K3 (:func:`mmts_fast.ops.gqa_attention`) for attention, in place.

    Registers ``"mmts_fast_gqa"`` (:func:`register_fast_attention`) and sets it with
    ``model.set_attn_implementation`` (so ``model.config._attn_implementation == "mmts_fast_gqa"``); works on
    ``...ForCausalLM`` and base models, before or after :func:`mmts_fast.nn.lora.apply_dlora` (the projections
    are not touched). K3 runs on the backend :mod:`mmts_fast.backend` picks (Triton on CUDA, the eager
    reference on CPU; ``mmts_fast.use_backend`` forces one). Returns ``model``.
    """
    register_fast_attention()
    for m in _hf_models(model):
        cfg = m.config
        heads = getattr(cfg, "num_attention_heads", None)
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
        if head_dim is not None and head_dim > MAX_HEAD_DIM:
            raise ValueError(f"apply_fast_attention: head dim {head_dim} > {MAX_HEAD_DIM}, which K3 does not take")
        prev = cfg._attn_implementation
        if prev == ATTN_IMPLEMENTATION:
            continue
        m.set_attn_implementation(ATTN_IMPLEMENTATION)
        if m.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise TypeError(f"apply_fast_attention: {type(m).__name__} does not dispatch attention through "
                            f"transformers' AttentionInterface, so K3 cannot be plugged in")
        setattr(m, _PREV_ATTR, prev)
    return model


def remove_fast_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fast_attention`: the attention implementation the model had before (``"sdpa"`` when it
    is not known). A model without fast attention is left as it is. Returns ``model``."""
    for m in _hf_models(model):
        if m.config._attn_implementation != ATTN_IMPLEMENTATION:
            continue
        prev = getattr(m, _PREV_ATTR, None) or "sdpa"
        m.set_attn_implementation(prev)
        if hasattr(m, _PREV_ATTR):
            delattr(m, _PREV_ATTR)
    return model
