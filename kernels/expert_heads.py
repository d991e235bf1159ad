"""K1: fused multi-expert linear heads (SPEC section 2, K1).

One file, one story: the eager reference (the spec, also the CPU and ONNX-export path), the Triton
forward and backward kernels with their launchers, and the ``torch.library`` registration
(``mmts_fast::expert_heads`` with fake and autograd implementations).

What it computes, for a series ``x`` of shape ``[B, L, C]`` and M linear experts, expert ``m``
reading only the last ``w_m`` steps of the lookback::

    x_hat         = RevIN(x)                    (optional, per sample and channel over time)
    e[b, m, :, c] = W_m x_hat[b, L-w_m:L, c] + bias_m          (per-expert outputs, [B, M, H, C])
    z[b, :, c]    = sum_m g[b, c, m] * e[b, m, :, c]           (gate per (sample, channel, expert)
                                                                or per (sample, expert))
    u             = gamma * z + beta            (optional FiLM epilogue, broadcast to [B, H, C])
    y             = RevIN^-1(u)                 (optional, with the same statistics)

The experts share one packed weight ``[M, H, L]``: expert ``m`` uses the columns ``[L-w_m, L)``
(windows right-aligned on the most recent steps); the columns left of its window are ignored and
get zero gradient. The fused kernel reads each x tile once per expert from cache, keeps the M
per-expert results in registers and writes them to memory only when ``return_experts=True``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from mmts_fast import backend
from mmts_fast.kernels import _common

try:  # Triton is optional: the reference runs everywhere.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on platforms without triton
    HAS_TRITON = False

DENORM_EPS = 1e-10  # RevIN denorm: (y - b) / (a + 1e-10), as in the public RevIN code


# ---------------------------------------------------------------------------------------------
# Input checks, shared by both paths
# ---------------------------------------------------------------------------------------------
def _normalize_windows(windows: Optional[Sequence[int]], M: int, L: int) -> list[int]:
    if windows is None:
        return [L] * M
    bad = [w for w in windows if isinstance(w, bool) or not float(w).is_integer()]
    if bad:
        raise ValueError(f"expert_heads: windows must be integers, got {bad[0]!r} in {list(windows)}")
    windows = [int(w) for w in windows]
    if len(windows) != M:
        raise ValueError(f"expert_heads: {len(windows)} windows given for {M} experts (weight.shape[0])")
    for m, w in enumerate(windows):
        if not 1 <= w <= L:
            raise ValueError(f"expert_heads: expert {m} has window {w} but the lookback is L={L}; "
                             f"every window must satisfy 1 <= w <= L")
    return windows


def _check(x, weight, bias, gates, windows, revin_weight, revin_bias, film_gamma, film_beta):
    if x.dim() != 3:
        raise ValueError(f"expert_heads: x must be [B, L, C], got shape {tuple(x.shape)}")
    _common.require_float("expert_heads", x=x, weight=weight, bias=bias, gates=gates, revin_weight=revin_weight,
                          revin_bias=revin_bias, film_gamma=film_gamma, film_beta=film_beta)
    B, L, C = x.shape
    if weight.dim() != 3 or weight.shape[2] != L:
        raise ValueError(f"expert_heads: weight must be [M, H, L={L}], got {tuple(weight.shape)}")
    M, H, _ = weight.shape
    if bias is not None and tuple(bias.shape) != (M, H):
        raise ValueError(f"expert_heads: bias must be [M={M}, H={H}], got {tuple(bias.shape)}")
    if tuple(gates.shape) not in ((B, C, M), (B, M)):
        raise ValueError(f"expert_heads: gates must be [B, C, M]=({B}, {C}, {M}) or [B, M]=({B}, {M}), "
                         f"got {tuple(gates.shape)}")
    for name, t in (("revin_weight", revin_weight), ("revin_bias", revin_bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"expert_heads: {name} must be [C={C}], got {tuple(t.shape)}")
    for name, t in (("film_gamma", film_gamma), ("film_beta", film_beta)):
        if t is not None:
            try:
                ok = torch.broadcast_shapes(tuple(t.shape), (B, H, C)) == (B, H, C)
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"expert_heads: {name} of shape {tuple(t.shape)} does not broadcast "
                                 f"to [B, H, C]=({B}, {H}, {C})")
    return _normalize_windows(windows, M, L)


# ---------------------------------------------------------------------------------------------
# Eager reference: the spec, the CPU path and the export path
# ---------------------------------------------------------------------------------------------
_INDEX_CACHE: dict = {}


def _window_index(windows: Sequence[int], L: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """For the concatenation of all experts' window columns (sum(w_m) entries): the lookback column,
    the expert owning it, and its index into the packed weight's ``[M * L]`` (expert, column) axis.
    Cached per (windows, L, device) so the hot path makes no host-to-device copy."""
    key = (tuple(windows), L, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        return hit
    cols = torch.cat([torch.arange(L - w, L) for w in windows])
    owner = torch.cat([torch.full((w,), m) for m, w in enumerate(windows)])
    out = tuple(t.to(device) for t in (cols, owner, owner * L + cols))
    if not torch.compiler.is_compiling():   # never cache tensors made while tracing
        _INDEX_CACHE[key] = out
    return out


def window_mask(windows: Sequence[int], L: int, device=None) -> Tensor:
    """``[M, 1, L]`` of 0/1: 1 on the columns ``[L - w_m, L)`` that expert m reads."""
    flat = _window_index(windows, L, device)[2]
    return torch.zeros(len(windows) * L, device=device).index_fill(0, flat, 1.0).view(len(windows), 1, L)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def revin_stats(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """RevIN statistics over time, detached, in fp32 (or fp64 for fp64 x): mean and
    sqrt(biased var + eps), each [B, 1, C]."""
    xf = x.detach().to(_compute_dtype(x))
    mean = xf.mean(dim=1, keepdim=True)
    # two-pass variance (as stable as torch.var): on a CPU, torch.var over the time axis of [B, L, C]
    # (a strided reduction) is ~4x slower than these two means (0.63 vs 0.17 ms at [32, 512, 7])
    var = (xf - mean).square().mean(dim=1, keepdim=True)
    std = torch.sqrt(var + eps)
    return mean, std


def revin_norm(x: Tensor, mean: Tensor, std: Tensor, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None) -> Tensor:
    """RevIN normalisation ``(x - mean) / std * weight + bias`` computed in fp32, returned in x's dtype."""
    cdt = _compute_dtype(x)
    out = (x.to(cdt) - mean) / std
    if weight is not None:
        out = out * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(x.dtype)


def revin_denorm(y: Tensor, mean: Tensor, std: Tensor, weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None) -> Tensor:
    """RevIN denormalisation ``(y - bias) / (weight + 1e-10) * std + mean``, in y's dtype."""
    cdt = _compute_dtype(y)
    out = y.to(cdt)
    if bias is not None:
        out = out - bias.to(cdt)
    if weight is not None:
        out = out / (weight.to(cdt) + DENORM_EPS)
    return (out * std + mean).to(y.dtype)


def expert_heads_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                           windows: Optional[Sequence[int]] = None, *, revin: bool = False,
                           revin_weight: Optional[Tensor] = None, revin_bias: Optional[Tensor] = None,
                           eps: float = 1e-5, film_gamma: Optional[Tensor] = None,
                           film_beta: Optional[Tensor] = None, return_experts: bool = False):
    """Plain PyTorch K1: all experts in one GEMM, no Python loop over experts.

    Two equal forms of the same sum, picked by the size of the intermediate: the per-expert outputs
    ``[N, M*H]`` (needed for ``return_experts``), or the gate-scaled window inputs ``[N, sum (w_m + 1)]``
    (the +1: a column of ones per expert that carries its bias).
    """
    windows = _check(x, weight, bias, gates, windows, revin_weight, revin_bias, film_gamma, film_beta)
    B, L, C = x.shape
    M, H, _ = weight.shape
    dtype = x.dtype
    if revin:
        mean, std = revin_stats(x, eps)
        x = revin_norm(x, mean, std, revin_weight, revin_bias)
    N = B * C
    g = (gates if gates.dim() == 3 else gates[:, None, :]).expand(B, C, M).reshape(N, M).to(dtype)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else w.new_zeros(M, H)
    full = all(wm == L for wm in windows)                                 # MoLE: every expert reads all L steps
    if return_experts or sum(windows) > M * H:
        # Expert-output form: one GEMM for all experts [N, L] x [L, M*H] (off-window weights masked),
        # then the gate-weighted sum over experts; the bias mixed apart, sum_m g_m b_m = g @ bias.
        rows = x.transpose(1, 2).reshape(N, L)                            # one row per (sample, channel)
        wm = w if full else w * window_mask(windows, L, x.device).to(dtype)
        e = torch.nn.functional.linear(rows, wm.reshape(M * H, L)).view(N, M, H)
        z = (e * g[:, :, None]).sum(1) + g @ b                            # [N, H]
        e = e + b if return_experts else e
    else:
        # Gate-scaled-input form, the same sum reassociated: sum_m g_m (W_m x_m + b_m) =
        # [g_m x_m, g_m]_m @ [W_m^T; b_m]_m, the bias as one more input column of ones per expert.
        # One GEMM [N, sum(w+1)] x [sum(w+1), H] doing exactly the experts' FLOPs; no [N, M, H] tensor.
        rows = torch.cat([x.transpose(1, 2), x.new_ones(B, C, 1)], dim=2).view(N, L + 1)    # [x, 1] per row
        wcat = torch.cat([w.transpose(1, 2), b[:, None, :]], dim=1).reshape(M * (L + 1), H)  # [M*(L+1), H]
        if full:                                                          # a broadcast, no gather
            xs = (rows[:, None, :] * g[:, :, None]).reshape(N, M * (L + 1))
        else:                                                             # only the window columns (+ the 1)
            cols, owner, flat = _window_index([wm + 1 for wm in windows], L + 1, x.device)
            xs = rows.index_select(1, cols) * g.index_select(1, owner)    # [N, sum(w+1)]
            wcat = wcat.index_select(0, flat)                             # [sum(w+1), H]
        z = xs @ wcat
    z = z.view(B, C, H).transpose(1, 2)                                   # [B, H, C]
    u = z
    if film_gamma is not None:
        u = u * film_gamma.to(dtype)
    if film_beta is not None:
        u = u + film_beta.to(dtype)
    y = revin_denorm(u, mean, std, revin_weight, revin_bias) if revin else u
    if return_experts:
        return y, e.view(B, C, M, H).permute(0, 2, 3, 1)                  # [B, M, H, C]
    return y


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    from mmts_fast.kernels._common import dot as _dot

    @triton.jit
    def _load_xhat(x_ptr, b, c, rk, mask_n, mk, sxb, sxl, sxc, mean, std, ra, rb,
                   HAS_REVIN: tl.constexpr, HAS_RA: tl.constexpr, HAS_RB: tl.constexpr):
        """x_hat tile [BLOCK_N, BLOCK_K] in fp32, zero where masked."""
        m2 = mask_n[:, None] & mk[None, :]
        xt = tl.load(x_ptr + b[:, None] * sxb + rk[None, :] * sxl + c[:, None] * sxc, mask=m2, other=0.0)
        xt = xt.to(tl.float32)
        if HAS_REVIN:
            xt = (xt - mean[:, None]) / std[:, None]
            if HAS_RA:
                xt = xt * ra[:, None]
            if HAS_RB:
                xt = xt + rb[:, None]
            xt = tl.where(m2, xt, 0.0)
        return xt

    @triton.jit
    def _load_dz(dy_ptr, gam_ptr, b, c, rh, mask_n, mask_h, syb, syh, syc, sfb, sfh, sfc, dscale,
                 HAS_GAMMA: tl.constexpr):
        """dL/dz tile [BLOCK_N, BLOCK_H] in fp32: dy * std / (a + eps) * gamma."""
        m2 = mask_n[:, None] & mask_h[None, :]
        dz = tl.load(dy_ptr + b[:, None] * syb + rh[None, :] * syh + c[:, None] * syc, mask=m2, other=0.0)
        dz = dz.to(tl.float32) * dscale[:, None]
        if HAS_GAMMA:
            gm = tl.load(gam_ptr + b[:, None] * sfb + rh[None, :] * sfh + c[:, None] * sfc, mask=m2, other=0.0)
            dz = dz * gm.to(tl.float32)
        return dz

    @triton.jit
    def _row_setup(pid_n, N, C, mean_ptr, std_ptr, ra_ptr, rb_ptr, BLOCK_N: tl.constexpr,
                   HAS_REVIN: tl.constexpr, HAS_RA: tl.constexpr, HAS_RB: tl.constexpr):
        """Rows are (b, c) pairs. Returns their indices and RevIN terms (ones/zeros when off)."""
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        b = rn // C
        c = rn % C
        mean = tl.zeros([BLOCK_N], dtype=tl.float32)
        std = tl.zeros([BLOCK_N], dtype=tl.float32) + 1.0
        ra = tl.zeros([BLOCK_N], dtype=tl.float32) + 1.0
        rb = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_REVIN:
            mean = tl.load(mean_ptr + rn, mask=mask_n, other=0.0)
            std = tl.load(std_ptr + rn, mask=mask_n, other=1.0)
            if HAS_RA:
                ra = tl.load(ra_ptr + c, mask=mask_n, other=1.0).to(tl.float32)
            if HAS_RB:
                rb = tl.load(rb_ptr + c, mask=mask_n, other=0.0).to(tl.float32)
        return rn, mask_n, b, c, mean, std, ra, rb

    @triton.jit
    def _expert_heads_fwd(
        x_ptr, w_ptr, bias_ptr, g_ptr, starts_ptr, mean_ptr, std_ptr, ra_ptr, rb_ptr, gam_ptr, bet_ptr,
        y_ptr, z_ptr, e_ptr,
        N, C, L, H, M,
        sxb, sxl, sxc, swm, swh, swl, sbm, sbh, sgb, sgc, sgm,
        sfb, sfh, sfc, stb, sth, stc, syb, syh, syc, seb, sem, seh, sec,
        HAS_BIAS: tl.constexpr, HAS_REVIN: tl.constexpr, HAS_RA: tl.constexpr, HAS_RB: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, STORE_E: tl.constexpr, STORE_Z: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_h = tl.program_id(1)
        rn, mask_n, b, c, mean, std, ra, rb = _row_setup(pid_n, N, C, mean_ptr, std_ptr, ra_ptr, rb_ptr,
                                                         BLOCK_N, HAS_REVIN, HAS_RA, HAS_RB)
        rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = rh < H
        m2 = mask_n[:, None] & mask_h[None, :]
        out = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        for m in range(0, M):
            start = tl.load(starts_ptr + m)
            acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
            for k0 in range(start, L, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mk = rk < L
                xt = _load_xhat(x_ptr, b, c, rk, mask_n, mk, sxb, sxl, sxc, mean, std, ra, rb,
                                HAS_REVIN, HAS_RA, HAS_RB)
                wt = tl.load(w_ptr + m * swm + rh[None, :] * swh + rk[:, None] * swl,
                             mask=mk[:, None] & mask_h[None, :], other=0.0)
                acc = _dot(xt.to(wt.dtype), wt, acc, PREC, UPCAST)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + m * sbm + rh * sbh, mask=mask_h, other=0.0).to(tl.float32)[None, :]
            if STORE_E:
                tl.store(e_ptr + b[:, None] * seb + m * sem + rh[None, :] * seh + c[:, None] * sec,
                         acc.to(e_ptr.dtype.element_ty), mask=m2)
            gm = tl.load(g_ptr + b * sgb + c * sgc + m * sgm, mask=mask_n, other=0.0).to(tl.float32)
            out += gm[:, None] * acc
        yoff = b[:, None] * syb + rh[None, :] * syh + c[:, None] * syc
        if STORE_Z:
            tl.store(z_ptr + yoff, out.to(z_ptr.dtype.element_ty), mask=m2)
        if HAS_GAMMA:
            out *= tl.load(gam_ptr + b[:, None] * sfb + rh[None, :] * sfh + c[:, None] * sfc,
                           mask=m2, other=0.0).to(tl.float32)
        if HAS_BETA:
            out += tl.load(bet_ptr + b[:, None] * stb + rh[None, :] * sth + c[:, None] * stc,
                           mask=m2, other=0.0).to(tl.float32)
        if HAS_REVIN:
            out = (out - rb[:, None]) / (ra[:, None] + 1e-10) * std[:, None] + mean[:, None]
        tl.store(y_ptr + yoff, out.to(y_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _expert_heads_bwd_dx(
        x_ptr, w_ptr, bias_ptr, g_ptr, starts_ptr, mean_ptr, std_ptr, ra_ptr, rb_ptr, gam_ptr,
        dy_ptr, de_ptr, dx_ptr, dgp_ptr,
        N, C, L, H, M,
        sxb, sxl, sxc, swm, swh, swl, sbm, sbh, sgb, sgc, sgm,
        sfb, sfh, sfc, syb, syh, syc, seb, sem, seh, sec,
        HAS_BIAS: tl.constexpr, HAS_REVIN: tl.constexpr, HAS_RA: tl.constexpr, HAS_RB: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_DE: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """dx_hat[n, k] = sum_m (g_m dz + dE_m) @ W_m and partial dg[n, m] = <x_hat, dz @ W_m> (+ dz.bias_m)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn, mask_n, b, c, mean, std, ra, rb = _row_setup(pid_n, N, C, mean_ptr, std_ptr, ra_ptr, rb_ptr,
                                                         BLOCK_N, HAS_REVIN, HAS_RA, HAS_RB)
        dscale = std / (ra + 1e-10)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        in_l = rk < L
        xt = _load_xhat(x_ptr, b, c, rk, mask_n, in_l, sxb, sxl, sxc, mean, std, ra, rb,
                        HAS_REVIN, HAS_RA, HAS_RB)
        dx = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for m in range(0, M):
            start = tl.load(starts_ptr + m)
            mk = in_l & (rk >= start)
            h_stop = tl.where(pid_k * BLOCK_K + BLOCK_K > start, H, 0)   # skip tiles left of the window
            if HAS_BIAS:
                if pid_k == 0:
                    h_stop = H                                           # ... but dg's bias term needs all h
            v = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            q = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            dgb = tl.zeros([BLOCK_N], dtype=tl.float32)
            for h0 in range(0, h_stop, BLOCK_H):
                rh = h0 + tl.arange(0, BLOCK_H)
                mask_h = rh < H
                dz = _load_dz(dy_ptr, gam_ptr, b, c, rh, mask_n, mask_h, syb, syh, syc, sfb, sfh, sfc,
                              dscale, HAS_GAMMA)
                wt = tl.load(w_ptr + m * swm + rh[:, None] * swh + rk[None, :] * swl,
                             mask=mask_h[:, None] & mk[None, :], other=0.0)
                v = _dot(dz.to(wt.dtype), wt, v, PREC, UPCAST)
                if HAS_DE:
                    de = tl.load(de_ptr + b[:, None] * seb + m * sem + rh[None, :] * seh + c[:, None] * sec,
                                 mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                    q = _dot(de.to(wt.dtype), wt, q, PREC, UPCAST)
                if HAS_BIAS:
                    if pid_k == 0:
                        bias = tl.load(bias_ptr + m * sbm + rh * sbh, mask=mask_h, other=0.0).to(tl.float32)
                        dgb += tl.sum(dz * bias[None, :], axis=1)
            gm = tl.load(g_ptr + b * sgb + c * sgc + m * sgm, mask=mask_n, other=0.0).to(tl.float32)
            dx += gm[:, None] * v + q
            dgp = tl.sum(tl.where(mk[None, :], xt, 0.0) * v, axis=1) + dgb
            tl.store(dgp_ptr + (pid_k * N + rn) * M + m, dgp, mask=mask_n)
        tl.store(dx_ptr + b[:, None] * (L * C) + rk[None, :] * C + c[:, None], dx,
                 mask=mask_n[:, None] & in_l[None, :])

    @triton.jit
    def _expert_heads_bwd_dw(
        x_ptr, g_ptr, starts_ptr, mean_ptr, std_ptr, ra_ptr, rb_ptr, gam_ptr,
        dy_ptr, de_ptr, dw_ptr, db_ptr,
        N, C, L, H, M,
        sxb, sxl, sxc, sgb, sgc, sgm,
        sfb, sfh, sfc, syb, syh, syc, seb, sem, seh, sec,
        HAS_REVIN: tl.constexpr, HAS_RA: tl.constexpr, HAS_RB: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_DE: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """dW[m, h, k] = sum_n G[n, m, h] x_hat[n, k] on the window; dbias[m, h] = sum_n G[n, m, h];
        with G = g[n, m] dz[n, h] + dE[n, m, h]."""
        m = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_k = tl.program_id(2)
        start = tl.load(starts_ptr + m)
        rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = rh < H
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = (rk < L) & (rk >= start)
        n_stop = tl.where(pid_k * BLOCK_K + BLOCK_K > start, N, 0)   # tiles left of the window: zeros
        if pid_k == 0:
            n_stop = N                                               # ... but dbias needs every row
        acc = tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32)
        dbias = tl.zeros([BLOCK_H], dtype=tl.float32)
        for n0 in range(0, n_stop, BLOCK_N):
            rn, mask_n, b, c, mean, std, ra, rb = _row_setup(n0 // BLOCK_N, N, C, mean_ptr, std_ptr, ra_ptr,
                                                             rb_ptr, BLOCK_N, HAS_REVIN, HAS_RA, HAS_RB)
            dz = _load_dz(dy_ptr, gam_ptr, b, c, rh, mask_n, mask_h, syb, syh, syc, sfb, sfh, sfc,
                          std / (ra + 1e-10), HAS_GAMMA)
            gm = tl.load(g_ptr + b * sgb + c * sgc + m * sgm, mask=mask_n, other=0.0).to(tl.float32)
            gg = gm[:, None] * dz
            if HAS_DE:
                gg += tl.load(de_ptr + b[:, None] * seb + m * sem + rh[None, :] * seh + c[:, None] * sec,
                              mask=mask_n[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
            xt = _load_xhat(x_ptr, b, c, rk, mask_n, mk, sxb, sxl, sxc, mean, std, ra, rb,
                            HAS_REVIN, HAS_RA, HAS_RB)
            xdt = x_ptr.dtype.element_ty
            acc = _dot(tl.trans(gg.to(xdt)), xt.to(xdt), acc, PREC, UPCAST)
            if pid_k == 0:
                dbias += tl.sum(gg, axis=0)
        tl.store(dw_ptr + m * (H * L) + rh[:, None] * L + rk[None, :], acc,
                 mask=mask_h[:, None] & (rk < L)[None, :])
        if pid_k == 0:
            tl.store(db_ptr + m * H + rh, dbias, mask=mask_h)


BLOCK_N, BLOCK_H, BLOCK_K = 32, 32, 32
def _strides3(t: Optional[Tensor], shape) -> tuple[int, int, int]:
    """Strides of t broadcast to ``shape`` (0 along broadcast dims); zeros when t is None."""
    if t is None:
        return (0, 0, 0)
    return tuple(torch.broadcast_to(t, shape).stride())


def _gate_strides(gates: Tensor) -> tuple[int, int, int]:
    if gates.dim() == 3:
        return tuple(gates.stride())
    return (gates.stride(0), 0, gates.stride(1))


def _dummy(x: Tensor) -> Tensor:
    return x.new_empty(1, dtype=torch.float32)


def _stats(x: Tensor, revin: bool, eps: float) -> tuple[Tensor, Tensor]:
    if not revin:
        return x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    mean, std = revin_stats(x, eps)
    return mean[:, 0].float().contiguous(), std[:, 0].float().contiguous()          # [B, C]


def _starts(windows: Sequence[int], L: int, device) -> Tensor:
    """First column of each expert's window, int32 on the device, cached (no per-call copy)."""
    key = ("starts", tuple(windows), L, str(device))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = torch.tensor([L - w for w in windows], dtype=torch.int32, device=device)
    return _INDEX_CACHE[key]


def _fwd_triton(x, weight, bias, gates, windows, revin, revin_weight, revin_bias, eps,
                film_gamma, film_beta, return_experts, store_z):
    B, L, C = x.shape
    M, H, _ = weight.shape
    N = B * C
    weight = weight.to(x.dtype)
    mean, std = _stats(x, revin, eps)
    y = _common.alloc(B, H, C, like=x)
    z = _common.alloc(B, H, C, like=x, dtype=torch.float32) if store_z else _dummy(x)
    e = _common.alloc(B, M, H, C, like=x) if return_experts else _dummy(x)
    d = _dummy(x)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(H, BLOCK_H))
    _expert_heads_fwd[grid](
        x, weight, bias if bias is not None else d, gates, _starts(windows, L, x.device),
        mean if revin else d, std if revin else d,
        revin_weight if revin_weight is not None else d, revin_bias if revin_bias is not None else d,
        film_gamma if film_gamma is not None else d, film_beta if film_beta is not None else d,
        y, z, e, N, C, L, H, M,
        *x.stride(), *weight.stride(), *(bias.stride() if bias is not None else (0, 0)),
        *_gate_strides(gates), *_strides3(film_gamma, (B, H, C)), *_strides3(film_beta, (B, H, C)),
        *y.stride(), *(e.stride() if return_experts else (0, 0, 0, 0)),
        HAS_BIAS=bias is not None, HAS_REVIN=revin, HAS_RA=revin and revin_weight is not None,
        HAS_RB=revin and revin_bias is not None, HAS_GAMMA=film_gamma is not None,
        HAS_BETA=film_beta is not None, STORE_E=return_experts, STORE_Z=store_z,
        PREC=_common.dot_precision(x), UPCAST=_common.upcast_dot(x), BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
    )
    return y, (e if return_experts else x.new_empty(0)), (z if store_z else x.new_empty(0, dtype=torch.float32)), mean, std


def _bwd_triton(dy, de, x, weight, bias, gates, windows, revin, revin_weight, revin_bias,
                film_gamma, mean, std):
    """Returns dx_hat [B, L, C] fp32, dW [M, H, L] fp32, dbias [M, H] fp32, dg [B*C, M] fp32."""
    B, L, C = x.shape
    M, H, _ = weight.shape
    N = B * C
    weight = weight.to(x.dtype)
    d = _dummy(x)
    starts = _starts(windows, L, x.device)
    has_de = de is not None
    n_k = triton.cdiv(L, BLOCK_K)
    f32 = torch.float32
    dx = _common.alloc(B, L, C, like=x, dtype=f32)
    dgp = _common.alloc(n_k, N, M, like=x, dtype=f32)
    dw = _common.alloc(M, H, L, like=x, dtype=f32)
    db = _common.alloc(M, H, like=x, dtype=f32)
    common = dict(HAS_REVIN=revin, HAS_RA=revin and revin_weight is not None,
                  HAS_RB=revin and revin_bias is not None, HAS_GAMMA=film_gamma is not None,
                  HAS_DE=has_de, PREC=_common.dot_precision(x), UPCAST=_common.upcast_dot(x), BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
    rv = (mean if revin else d, std if revin else d,
          revin_weight if revin_weight is not None else d, revin_bias if revin_bias is not None else d,
          film_gamma if film_gamma is not None else d)
    gs = (*_gate_strides(gates), *_strides3(film_gamma, (B, H, C)), *dy.stride(),
          *(de.stride() if has_de else (0, 0, 0, 0)))
    _expert_heads_bwd_dx[(triton.cdiv(N, BLOCK_N), n_k)](
        x, weight, bias if bias is not None else d, gates, starts, *rv,
        dy, de if has_de else d, dx, dgp, N, C, L, H, M,
        *x.stride(), *weight.stride(), *(bias.stride() if bias is not None else (0, 0)), *gs,
        HAS_BIAS=bias is not None, **common)
    _expert_heads_bwd_dw[(M, triton.cdiv(H, BLOCK_H), n_k)](
        x, gates, starts, *rv, dy, de if has_de else d, dw, db, N, C, L, H, M,
        *x.stride(), *gs, **common)
    return dx, dw, db, dgp.sum(0)


# ---------------------------------------------------------------------------------------------
# torch.library registration: mmts_fast::expert_heads (Triton), fake and autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mmts_fast::expert_heads", mutates_args=())
def _expert_heads_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, windows: list[int],
                     revin: bool, revin_weight: Optional[Tensor], revin_bias: Optional[Tensor], eps: float,
                     film_gamma: Optional[Tensor], film_beta: Optional[Tensor], return_experts: bool,
                     store_z: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y [B,H,C], experts [B,M,H,C] or empty, z [B,H,C] fp32 or empty, mean [B,C], std [B,C])."""
    if not HAS_TRITON:
        raise RuntimeError("mmts_fast::expert_heads needs triton; use the torch backend instead")
    return _fwd_triton(x, weight, bias, gates, windows, revin, revin_weight, revin_bias, eps,
                       film_gamma, film_beta, return_experts, store_z)


@_expert_heads_op.register_fake
def _(x, weight, bias, gates, windows, revin, revin_weight, revin_bias, eps, film_gamma, film_beta,
      return_experts, store_z):
    B, L, C = x.shape
    M, H, _ = weight.shape
    y = x.new_empty(B, H, C)
    e = x.new_empty(B, M, H, C) if return_experts else x.new_empty(0)
    z = x.new_empty(B, H, C, dtype=torch.float32) if store_z else x.new_empty(0, dtype=torch.float32)
    st = (B, C) if revin else (0,)
    return y, e, z, x.new_empty(st, dtype=torch.float32), x.new_empty(st, dtype=torch.float32)


@torch.library.custom_op("mmts_fast::expert_heads_backward", mutates_args=())
def _expert_heads_bwd_op(dy: Tensor, de: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         gates: Tensor, windows: list[int], revin: bool, revin_weight: Optional[Tensor],
                         revin_bias: Optional[Tensor], film_gamma: Optional[Tensor], mean: Tensor,
                         std: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd_triton(dy, de, x, weight, bias, gates, windows, revin, revin_weight, revin_bias,
                       film_gamma, mean, std)


@_expert_heads_bwd_op.register_fake
def _(dy, de, x, weight, bias, gates, windows, revin, revin_weight, revin_bias, film_gamma, mean, std):
    B, L, C = x.shape
    M, H, _ = weight.shape
    f = torch.float32
    return (x.new_empty(B, L, C, dtype=f), x.new_empty(M, H, L, dtype=f), x.new_empty(M, H, dtype=f),
            x.new_empty(B * C, M, dtype=f))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, gates, windows, revin, revin_weight, revin_bias, eps, film_gamma, film_beta,
     return_experts, store_z) = inputs
    y, e, z, mean, std = output
    ctx.windows, ctx.revin = windows, revin
    ctx.flags = (bias is not None, revin_weight is not None, revin_bias is not None,
                 film_gamma is not None, film_beta is not None)
    ctx.save_for_backward(x, weight, bias, gates, revin_weight, revin_bias, film_gamma, film_beta, z, mean, std)


def _backward(ctx, dy, de, dz_unused, dmean_unused, dstd_unused):
    x, weight, bias, gates, ra, rb, gamma, beta, z, mean, std = ctx.saved_tensors
    B, L, C = x.shape
    M, H, _ = weight.shape
    if de is not None and de.numel() == 0:
        de = None
    dy = dy.contiguous()
    dxh, dw, db, dg = torch.ops.mmts_fast.expert_heads_backward(
        dy, de, x, weight, bias, gates, ctx.windows, ctx.revin, ra, rb, gamma, mean, std)
    # Everything below is elementwise or a reduction over [B, H, C] / [B, L, C] tensors.
    need = ctx.needs_input_grad
    dx = dxh
    d_ra = d_rb = d_gamma = d_beta = None
    if ctx.revin:
        mean3, std3 = mean[:, None, :], std[:, None, :]
        scale = std3 / ((ra.float() + 1e-10) if ra is not None else 1.0)      # dL/du = dy * scale
        du = dy.float() * scale
        if ra is not None:
            dx = dx * ra.float()
        dx = dx / std3
        if ra is not None and need[6]:
            if z.numel() == 0:
                raise RuntimeError("expert_heads: revin_weight needs a gradient but z was not stored "
                                   "(call with store_z=True)")
            u = z
            if gamma is not None:
                u = u * gamma.float()
            if beta is not None:
                u = u + beta.float()
            xn = (x.float() - mean3) / std3
            d_ra = (dxh * xn).sum((0, 1)) - (du * (u - (rb.float() if rb is not None else 0.0))
                                             / (ra.float() + 1e-10)).sum((0, 1))
            d_ra = d_ra.to(ra.dtype)
        if rb is not None and need[7]:
            d_rb = (dxh.sum((0, 1)) - du.sum((0, 1))).to(rb.dtype)
    else:
        du = dy.float()
    if gamma is not None and need[9]:
        if z.numel() == 0:
            raise RuntimeError("expert_heads: film_gamma needs a gradient but z was not stored "
                               "(call with store_z=True)")
        d_gamma = (du * z).sum_to_size(gamma.shape).to(gamma.dtype)
    if beta is not None and need[10]:
        d_beta = du.sum_to_size(beta.shape).to(beta.dtype)
    dg = dg.view(B, C, M)
    if gates.dim() == 2:
        dg = dg.sum(1)
    return (dx.to(x.dtype), dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None,
            dg.to(gates.dtype), None, None, d_ra, d_rb, None, d_gamma, d_beta, None, None)


_expert_heads_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def expert_heads(x: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                 windows: Optional[Sequence[int]] = None, *, revin: bool = False,
                 revin_weight: Optional[Tensor] = None, revin_bias: Optional[Tensor] = None,
                 eps: float = 1e-5, film_gamma: Optional[Tensor] = None, film_beta: Optional[Tensor] = None,
                 return_experts: bool = False):
    """Fused multi-expert linear heads (K1). Shapes: B batch, L lookback, C channels, H horizon, M experts.

    Args:
        x: ``[B, L, C]`` series (any strides), fp32 / bf16 / fp16 (fp64: the torch backend only).
        weight: ``[M, H, L]`` packed expert weights; expert ``m`` uses columns ``[L - w_m, L)``.
        bias: ``[M, H]`` or None.
        gates: ``[B, C, M]`` (per sample and channel) or ``[B, M]`` (per sample); used as given
            (apply softmax / head dropout before).
        windows: M ints ``w_m`` with ``1 <= w_m <= L``; None means every expert sees all L steps.
        revin: RevIN-normalise x per (sample, channel) over time (statistics detached, fp32) and
            denormalise the output. ``revin_weight``/``revin_bias``: the affine ``[C]`` parameters.
        eps: RevIN variance epsilon.
        film_gamma, film_beta: FiLM epilogue ``gamma * z + beta`` (before RevIN denorm), each
            broadcastable to ``[B, H, C]``.
        return_experts: also return the per-expert outputs ``[B, M, H, C]`` (normalised space,
            before gating, FiLM and denorm).

    Returns:
        ``y`` of shape ``[B, H, C]`` in x's dtype, or ``(y, experts)`` when ``return_experts``.

    Runs the Triton kernels or the eager reference as the backend switch says
    (:mod:`mmts_fast.backend`). Both are differentiable in every tensor input but the RevIN
    statistics (detached, as in RevIN).
    """
    if backend.resolve(x) == "torch":
        return expert_heads_reference(x, weight, bias, gates, windows, revin=revin, revin_weight=revin_weight,
                                      revin_bias=revin_bias, eps=eps, film_gamma=film_gamma,
                                      film_beta=film_beta, return_experts=return_experts)
    windows = _check(x, weight, bias, gates, windows, revin_weight, revin_bias, film_gamma, film_beta)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"expert_heads: the Triton path takes fp32/bf16/fp16 x, got {x.dtype} "
                         f"(the torch backend takes fp64)")
    if not revin:
        revin_weight = revin_bias = None
    # The kernels read the [C] RevIN parameters at unit stride (the other tensors pass their strides).
    revin_weight = revin_weight.contiguous() if revin_weight is not None else None
    revin_bias = revin_bias.contiguous() if revin_bias is not None else None
    store_z = torch.is_grad_enabled() and ((revin and revin_weight is not None and revin_weight.requires_grad)
                                           or (film_gamma is not None and film_gamma.requires_grad))
    y, e, _, _, _ = torch.ops.mmts_fast.expert_heads(
        x, weight, bias, gates, windows, revin, revin_weight, revin_bias, eps, film_gamma, film_beta,
        return_experts, store_z)
    return (y, e) if return_experts else y
