"""Public ops. Each dispatches to its Triton kernel or its eager reference through
:mod:`mmts_fast.backend`; the kernel modules (and Triton) load on first call, not at import."""
from __future__ import annotations


def expert_heads(x, weight, bias, gates, windows=None, **kwargs):
    """Fused multi-expert linear heads (K1).

    ``expert_heads(x [B,L,C], weight [M,H,L], bias [M,H] | None, gates [B,C,M] | [B,M], windows=None, *,
    revin=False, revin_weight=None, revin_bias=None, eps=1e-5, film_gamma=None, film_beta=None,
    return_experts=False) -> y [B,H,C]`` (or ``(y, experts [B,M,H,C])``).
    Full documentation: :func:`mmts_fast.kernels.expert_heads.expert_heads`.
    """
    from mmts_fast.kernels.expert_heads import expert_heads as _op
    return _op(x, weight, bias, gates, windows, **kwargs)


def lora_mixture(x, weight, bias, lora_a, lora_b, gates, scale=1.0, *, segments=None):
    """Grouped LoRA mixture matmul (K2): ``y = x W^T + bias + scale * sum_m g[row, m] (x A_m^T) B_m^T``.

    ``lora_mixture(x [..., d_in], weight [d_out, d_in] | NF4 (Params4bit or (packed, QuantState)) | None,
    bias [d_out] | None, lora_a [M, r, d_in], lora_b [M, d_out, r], gates [T, M] (0 = unselected),
    scale=1.0, *, segments=None) -> y [..., d_out]``; with ``segments=S`` the gates are ``[S, M]`` per
    output segment (MoLA). Full documentation: :func:`mmts_fast.kernels.lora_mixture.lora_mixture`.
    """
    from mmts_fast.kernels.lora_mixture import lora_mixture as _op
    return _op(x, weight, bias, lora_a, lora_b, gates, scale, segments=segments)


def lora_amr(x, weight, bias, lora_c, lora_d, lora_b, gates, scale=1.0):
    """LoRA-AMR mixture: K2 with ``A_m = C_m D`` (D ``[r', d_in]`` frozen, C ``[M, r, r']`` trained), saving
    only ``D x`` for backward. ``lora_amr(x [..., d_in], weight, bias, lora_c, lora_d, lora_b [M, d_out, r],
    gates [T, M], scale=1.0) -> y [..., d_out]``.
    Full documentation: :func:`mmts_fast.kernels.lora_mixture.lora_amr`.
    """
    from mmts_fast.kernels.lora_mixture import lora_amr as _op
    return _op(x, weight, bias, lora_c, lora_d, lora_b, gates, scale)


def dequantize_nf4(packed, quant_state=None):
    """NF4 (bitsandbytes layout) -> dense tensor in ``quant_state.dtype``, bit for bit equal to
    ``bitsandbytes.functional.dequantize_4bit``. ``dequantize_nf4(packed, quant_state)`` or
    ``dequantize_nf4(params4bit)``. Full documentation: :func:`mmts_fast.kernels.lora_mixture.dequantize_nf4`.
    """
    from mmts_fast.kernels.lora_mixture import dequantize_nf4 as _op
    return _op(packed, quant_state)


def gqa_attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    """Grouped-query attention (K3): query head h reads kv head ``h // (Hq / Hkv)`` (by index, K/V never copied).

    ``gqa_attention(q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, D], *, causal=False,
    key_padding_mask [B, Lk] bool (True = attend) | None, scale=None (1/sqrt(D))) -> [B, Hq, Lq, D]``;
    causal is bottom-right aligned (query i sees keys ``j <= i + Lk - Lq``), a query that sees no key
    gets 0. Full documentation: :func:`mmts_fast.kernels.gqa_attention.gqa_attention`.
    """
    from mmts_fast.kernels.gqa_attention import gqa_attention as _op
    return _op(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
