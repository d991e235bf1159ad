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
