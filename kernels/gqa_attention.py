"""K3: grouped-query attention (SPEC section 2, K3).

One file, one story: the eager reference (the spec, also the CPU and export path), the Triton
forward and backward kernels with their launchers, and the ``torch.library`` registration
(``mmts_fast::gqa_attention`` and ``mmts_fast::gqa_attention_backward`` with fake and autograd
implementations).

What it computes, for queries ``q [B, Hq, Lq, D]`` and keys / values ``k, v [B, Hkv, Lk, D]`` with
``G = Hq / Hkv`` query heads per kv head (query head ``h`` reads kv head ``h // G``)::

    s[b, h, i, j] = scale * <q[b, h, i], k[b, h // G, j]>            (scale = 1/sqrt(D) by default)
    s[b, h, i, j] = -inf  where key j is not visible to query i:
                          key_padding_mask[b, j] is False, or (causal) j > i + Lk - Lq
    o[b, h, i]    = sum_j softmax_j(s[b, h, i, :]) v[b, h // G, j]

Causal attention is aligned bottom-right (flash-attention's convention): the LAST query sees every
key, query ``i`` sees the keys ``j <= i + (Lk - Lq)``; with ``Lq == Lk`` it is the usual lower
triangle. A query row that sees no key at all (every key padded, or ``Lq > Lk`` causal rows
``i < Lq - Lk``) gets output 0, not NaN, and zero gradients; its saved logsumexp is ``+inf``.

K and V are never repeated per query head: the reference views q as ``[B, Hkv, G*Lq, D]`` (the G
query heads of a group stacked along the rows) and multiplies against each kv head once; the kernels
look the kv head up by index.

Triton path (flash-attention style, fixed tiles, not autotuned):

* forward: one program per tile of query rows, online softmax over key tiles (exp2, fp32 running max
  and sum), output written once, logsumexp (natural log, fp32 ``[B, Hq, Lq]``) saved for backward.
  Causal tiles stop at their last visible key tile. Small-Lq packing: when Lq is small (decode,
  cross-attention from a few tokens; precisely, when it needs fewer tiles, see ``_tiles``) a tile's
  rows are the (group member g, query i) pairs of ONE kv head, ``r = g * Lq + i``, so each K/V tile is
  loaded once for the whole query group instead of once per query head; otherwise a tile is BLOCK_M
  queries of one query head.
* backward: a preprocess kernel ``delta = rowsum(dO * O)``; a dq kernel (the forward's tiling,
  recomputing ``P = exp(S - lse)``); a dk/dv kernel, one program per (key tile, kv head) looping over
  all the query rows of its group, so dk and dv are summed over the G query heads in registers (no
  atomics, deterministic). Causal dk/dv programs (unpacked layout) start at the first query that can
  see their keys.
* Validated under the Triton interpreter and compiled offline for sm_90 (ptxas, no register spills
  for the tile choices of ``_tiles``); not yet run or timed on a GPU.
* D up to 128, any value: the head-dim block is the next power of two (at least 16) with masked
  loads and stores. fp32 / bf16 / fp16 inputs; P and dS are rounded to the input dtype before their
  matmuls (as flash-attention does), accumulators are fp32.
"""
from __future__ import annotations

import math
from typing import Optional

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

MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # what the Triton path takes
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Input checks, shared by both paths
# ---------------------------------------------------------------------------------------------
def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> tuple[int, ...]:
    """Returns (B, Hq, Hkv, Lq, Lk, D); raises ValueError with the offending shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"gqa_attention: {name} must be 4-d [B, H, L, D], got shape {tuple(t.shape)}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"gqa_attention: k and v must have the same shape [B, Hkv, Lk, D], got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"gqa_attention: batch mismatch: q has B={B}, k and v have B={Bk}")
    if Dk != D:
        raise ValueError(f"gqa_attention: head dim mismatch: q has D={D}, k and v have D={Dk}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"gqa_attention: Hq={Hq} query heads must be a multiple of Hkv={Hkv} kv heads "
                         f"(Hq % Hkv == 0)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"gqa_attention: head dim D={D} is not supported: 1 <= D <= {MAX_HEAD_DIM}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"gqa_attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _common.require_float("gqa_attention", q=q)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"gqa_attention: key_padding_mask must be [B={B}, Lk={Lk}], got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"gqa_attention: key_padding_mask must be bool (True = attend, False = padding), "
                             f"got {key_padding_mask.dtype}")
    return B, Hq, Hkv, Lq, Lk, D


def _scale(scale: Optional[float], D: int) -> float:
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------
# Eager reference: the spec, the CPU path and the export path
# ---------------------------------------------------------------------------------------------
def visible_keys(Lq: int, Lk: int, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
                 device=None) -> Tensor:
    """Bool ``[B or 1, Lq, Lk]``: True where query i may attend to key j (key kept by the padding mask,
    and with ``causal`` ``j <= i + Lk - Lq``, i.e. bottom-right aligned)."""
    allowed = torch.ones(1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(diagonal=Lk - Lq)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return allowed


def gqa_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                            key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Plain PyTorch K3 (see :func:`gqa_attention`), in fp32 (fp64 for fp64 inputs), returned in q's dtype.

    The G query heads of a group are stacked along the rows (``q -> [B, Hkv, G*Lq, D]``, a view for a
    contiguous q), so query head ``h`` meets kv head ``h // G`` in an ordinary batched matmul: K and V are
    used as they are, never repeated or copied per query head.
    """
    B, Hq, Hkv, Lq, Lk, D = _check(q, k, v, key_padding_mask)
    G = Hq // Hkv
    cdt = torch.promote_types(q.dtype, torch.float32)
    scale = _scale(scale, D)
    qg = q.to(cdt).reshape(B, Hkv, G * Lq, D)                           # row g*Lq + i = query i of head kvh*G + g
    s = (qg @ k.to(cdt).transpose(-1, -2)) * scale                      # [B, Hkv, G*Lq, Lk]
    s = s.view(B, Hkv, G, Lq, Lk)
    allowed = visible_keys(Lq, Lk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    allowed = allowed[:, None, None]                                    # [B or 1, 1, 1, Lq, Lk]
    # Masked scores -> the most negative finite value: exp() makes them exactly 0 next to any visible
    # key, and a row with no visible key stays finite (uniform) and is then zeroed, so neither the
    # output nor the gradients see a NaN (softmax of an all -inf row would be NaN).
    s = s.masked_fill(~allowed, torch.finfo(cdt).min)
    p = torch.softmax(s, dim=-1)
    p = p * allowed.any(-1, keepdim=True)                               # rows that see no key: output 0
    out = p.view(B, Hkv, G * Lq, Lk) @ v.to(cdt)                        # [B, Hkv, G*Lq, D]
    return out.view(B, Hq, Lq, D).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    from mmts_fast.kernels._common import dot as _dot

    @triton.jit
    def _row_tile(pid_m, pid_h, Hq, Hkv, G, Lq, PACK: tl.constexpr, BLOCK_M: tl.constexpr):
        """The query rows of one forward / dq tile: (b, kv head, q head per row, query index per row, valid).
        PACK: pid_h is (b, kv head) and the rows are r = g*Lq + i over the whole query group;
        otherwise pid_h is (b, q head) and the rows are BLOCK_M queries of that head."""
        rm = tl.arange(0, BLOCK_M)
        if PACK:
            b = pid_h // Hkv
            kvh = pid_h % Hkv
            r = pid_m * BLOCK_M + rm
            ok = r < G * Lq
            i = r % Lq
            h = kvh * G + r // Lq
        else:
            b = pid_h // Hq
            hq = pid_h % Hq
            kvh = hq // G
            i = pid_m * BLOCK_M + rm
            ok = i < Lq
            h = hq + rm * 0
        return b, kvh, h, i, ok

    @triton.jit
    def _key_keep(mask_ptr, b, n, n_ok, smb, smn, HAS_MASK: tl.constexpr):
        """[BLOCK_N] bool: key n exists and is not padding."""
        if HAS_MASK:
            keep = tl.load(mask_ptr + b.to(tl.int64) * smb + n * smn, mask=n_ok, other=0) != 0
            return keep & n_ok
        return n_ok

    @triton.jit
    def _visible(i, n, keep, off, CAUSAL: tl.constexpr):
        """[BLOCK_M, BLOCK_N] (or [1, BLOCK_N]): query i may see key n (bottom-right causal: n <= i + off)."""
        vis = keep[None, :]
        if CAUSAL:
            vis = vis & (n[None, :] <= i[:, None] + off)
        return vis

    @triton.jit
    def _causal_end(i, ok, Lk, off, CAUSAL: tl.constexpr):
        """One past the last key any row of the tile can see."""
        if CAUSAL:
            return tl.minimum(tl.max(tl.where(ok, i, 0), axis=0) + off + 1, Lk)
        return Lk

    @triton.jit
    def _gqa_fwd(
        q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr,
        Hq, Hkv, G, Lq, Lk, D, qk_scale,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn, sob, soh, som, sod,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PACK: tl.constexpr, PREC: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b, kvh, h, i, ok = _row_tile(tl.program_id(0), tl.program_id(1), Hq, Hkv, G, Lq, PACK, BLOCK_M)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < D
        m2 = ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b64 * sqb + h64[:, None] * sqh + i[:, None].to(tl.int64) * sqm + rd[None, :] * sqd,
                    mask=m2, other=0.0)
        k_base = k_ptr + b64 * skb + kvh.to(tl.int64) * skh
        v_base = v_ptr + b64 * svb + kvh.to(tl.int64) * svh
        off = Lk - Lq
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        end = _causal_end(i, ok, Lk, off, CAUSAL)
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < Lk
            kt = tl.load(k_base + n[None, :].to(tl.int64) * skn + rd[:, None] * skd,
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)                 # [BLOCK_D, BLOCK_N]
            s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, UPCAST) * qk_scale
            vis = _visible(i, n, _key_keep(mask_ptr, b, n, n_ok, smb, smn, HAS_MASK), off, CAUSAL)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)     # no visible key yet: avoid -inf - -inf
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_base + n[:, None].to(tl.int64) * svn + rd[None, :] * svd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)                 # [BLOCK_N, BLOCK_D]
            acc = _dot(p.to(vt.dtype), vt, acc * alpha[:, None], PREC, UPCAST)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(o_ptr + b64 * sob + h64[:, None] * soh + i[:, None].to(tl.int64) * som + rd[None, :] * sod,
                 out.to(o_ptr.dtype.element_ty), mask=m2)
        lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(lse_ptr + (b64 * Hq + h64) * Lq + i, lse, mask=ok)

    @triton.jit
    def _gqa_bwd_delta(o_ptr, do_ptr, delta_ptr, Hq, Lq, D, sob, soh, som, sod, sdb, sdh, sdm, sdd,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (fp32)."""
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        m2 = (i < Lq)[:, None] & (rd < D)[None, :]
        i64 = i[:, None].to(tl.int64)
        o = tl.load(o_ptr + b * sob + h * soh + i64 * som + rd[None, :] * sod, mask=m2, other=0.0)
        do = tl.load(do_ptr + b * sdb + h * sdh + i64 * sdm + rd[None, :] * sdd, mask=m2, other=0.0)
        tl.store(delta_ptr + pid_bh.to(tl.int64) * Lq + i, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1),
                 mask=i < Lq)

    @triton.jit
    def _gqa_bwd_dq(
        q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        Hq, Hkv, G, Lq, Lk, D, scale,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
        sdb, sdh, sdm, sdd, sgb, sgh, sgm, sgd,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PACK: tl.constexpr, PREC: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dq = scale * sum_j dS[:, j] k_j with P = exp(S - lse), dS = P * (dO v^T - delta). Same tiles as
        the forward."""
        b, kvh, h, i, ok = _row_tile(tl.program_id(0), tl.program_id(1), Hq, Hkv, G, Lq, PACK, BLOCK_M)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        i64 = i.to(tl.int64)
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < D
        m2 = ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b64 * sqb + h64[:, None] * sqh + i64[:, None] * sqm + rd[None, :] * sqd,
                    mask=m2, other=0.0)
        do = tl.load(do_ptr + b64 * sdb + h64[:, None] * sdh + i64[:, None] * sdm + rd[None, :] * sdd,
                     mask=m2, other=0.0).to(q.dtype)
        row = (b64 * Hq + h64) * Lq + i64
        lse2 = tl.load(lse_ptr + row, mask=ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + row, mask=ok, other=0.0)
        k_base = k_ptr + b64 * skb + kvh.to(tl.int64) * skh
        v_base = v_ptr + b64 * svb + kvh.to(tl.int64) * svh
        off = Lk - Lq
        qk_scale = scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        end = _causal_end(i, ok, Lk, off, CAUSAL)
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < Lk
            mt = d_ok[:, None] & n_ok[None, :]
            kt = tl.load(k_base + n[None, :].to(tl.int64) * skn + rd[:, None] * skd, mask=mt, other=0.0)
            vt = tl.load(v_base + n[None, :].to(tl.int64) * svn + rd[:, None] * svd, mask=mt, other=0.0)
            s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, UPCAST) * qk_scale
            vis = _visible(i, n, _key_keep(mask_ptr, b, n, n_ok, smb, smn, HAS_MASK), off, CAUSAL)
            p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
            dp = _dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, PREC, UPCAST)
        tl.store(dq_ptr + b64 * sgb + h64[:, None] * sgh + i64[:, None] * sgm + rd[None, :] * sgd,
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _dkdv_rows(kk, vv, dk, dv, n, vis_keys, q_ptr, do_ptr, lse_ptr, delta_ptr, b64, h, i, ok, off,
                   Hq, Lq, D, qk_scale, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd,
                   CAUSAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Adds one tile of query rows (any heads of the group) to the key tile's dk, dv: transposed
        layout, P^T = exp(K Q^T - lse), dv += P^T dO, dS^T = P^T * (V dO^T - delta), dk += dS^T Q."""
        h64 = h.to(tl.int64)
        i64 = i.to(tl.int64)
        rd = tl.arange(0, BLOCK_D)
        mt = (rd < D)[:, None] & ok[None, :]
        qt = tl.load(q_ptr + b64 * sqb + h64[None, :] * sqh + i64[None, :] * sqm + rd[:, None] * sqd,
                     mask=mt, other=0.0)                                                # [BLOCK_D, BLOCK_M]
        dot_ = tl.load(do_ptr + b64 * sdb + h64[None, :] * sdh + i64[None, :] * sdm + rd[:, None] * sdd,
                       mask=mt, other=0.0).to(qt.dtype)                                 # [BLOCK_D, BLOCK_M]
        row = (b64 * Hq + h64) * Lq + i64
        lse2 = tl.load(lse_ptr + row, mask=ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + row, mask=ok, other=0.0)
        st = _dot(kk, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PREC, UPCAST) * qk_scale
        vis = vis_keys[:, None]
        if CAUSAL:
            vis = vis & (n[:, None] <= i[None, :] + off)
        pt = tl.where(vis, tl.math.exp2(st - lse2[None, :]), 0.0)                     # [BLOCK_N, BLOCK_M]
        dv = _dot(pt.to(qt.dtype), tl.trans(dot_), dv, PREC, UPCAST)
        dpt = _dot(vv, dot_, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, PREC, UPCAST)
        return dk, dv

    @triton.jit
    def _gqa_bwd_dkdv(
        q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        Hq, Hkv, G, Lq, Lk, D, scale,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
        sdb, sdh, sdm, sdd, sgb, sgh, sgn, sgd, swb, swh, swn, swd,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PACK: tl.constexpr, PREC: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (key tile, b, kv head): dk, dv summed over every query row of the G heads."""
        pid_n = tl.program_id(0)
        pid_h = tl.program_id(1)
        b = pid_h // Hkv
        kvh = pid_h % Hkv
        b64 = b.to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < Lk
        rd = tl.arange(0, BLOCK_D)
        m2 = n_ok[:, None] & (rd < D)[None, :]
        n64 = n[:, None].to(tl.int64)
        kk = tl.load(k_ptr + b64 * skb + kvh.to(tl.int64) * skh + n64 * skn + rd[None, :] * skd, mask=m2, other=0.0)
        vv = tl.load(v_ptr + b64 * svb + kvh.to(tl.int64) * svh + n64 * svn + rd[None, :] * svd, mask=m2, other=0.0)
        keep = _key_keep(mask_ptr, b, n, n_ok, smb, smn, HAS_MASK)
        off = Lk - Lq
        qk_scale = scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        rm = tl.arange(0, BLOCK_M)
        if PACK:
            for r0 in range(0, G * Lq, BLOCK_M):
                r = r0 + rm
                dk, dv = _dkdv_rows(kk, vv, dk, dv, n, keep, q_ptr, do_ptr, lse_ptr, delta_ptr, b64,
                                    kvh * G + r // Lq, r % Lq, r < G * Lq, off, Hq, Lq, D, qk_scale,
                                    sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd,
                                    CAUSAL, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        else:
            i_start = 0
            if CAUSAL:   # queries before n0 - off cannot see any key of this tile
                i_start = tl.maximum(pid_n * BLOCK_N - off, 0)
            for g in range(0, G):
                h = kvh * G + g + rm * 0
                for i0 in range(i_start, Lq, BLOCK_M):
                    i = i0 + rm
                    dk, dv = _dkdv_rows(kk, vv, dk, dv, n, keep, q_ptr, do_ptr, lse_ptr, delta_ptr, b64,
                                        h, i, i < Lq, off, Hq, Lq, D, qk_scale,
                                        sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd,
                                    CAUSAL, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        base_k = dk_ptr + b64 * sgb + kvh.to(tl.int64) * sgh + n64 * sgn + rd[None, :] * sgd
        base_v = dv_ptr + b64 * swb + kvh.to(tl.int64) * swh + n64 * swn + rd[None, :] * swd
        tl.store(base_k, (dk * scale).to(dk_ptr.dtype.element_ty), mask=m2)
        tl.store(base_v, dv.to(dv_ptr.dtype.element_ty), mask=m2)


# Tiles: BLOCK_M query rows x BLOCK_N keys x the head dim padded to BLOCK_D = max(16, next pow2 >= D)
# (tl.dot needs every dim >= 16). Fixed, not autotuned: chosen so that every kernel compiles for sm_90
# without register spills (checked offline with ptxas; no GPU timings yet). See _tiles().
BLOCK_M, BLOCK_N = 64, 64
FORCE_PACK: Optional[bool] = None   # tests: force the packed (True) or per-head (False) row layout
def _tiles(Lq: int, G: int, D: int, dtype: torch.dtype) -> dict:
    """PACK, BLOCK_M, BLOCK_N, BLOCK_D and num_warps for a problem.

    Packing (the G query heads of a group share the rows of a tile) is used when it needs fewer
    tiles than one head per tile, i.e. when Lq is small; a packed tile has the group's G*Lq rows
    rounded up to a power of two (at least 16, at most BLOCK_M; 32 for fp32, whose tiles take twice
    the registers). D > 64: half as many keys per tile and 8 warps."""
    bd = max(16, triton.next_power_of_2(D))
    cap = min(BLOCK_M, 32) if dtype == torch.float32 else BLOCK_M
    bm_pack = min(cap, max(16, triton.next_power_of_2(G * Lq)))
    pack = triton.cdiv(G * Lq, bm_pack) < G * triton.cdiv(Lq, BLOCK_M)
    if FORCE_PACK is not None:
        pack = FORCE_PACK
    return dict(PACK=pack, BLOCK_M=bm_pack if pack else BLOCK_M,
                BLOCK_N=BLOCK_N if bd <= 64 else max(16, BLOCK_N // 2), BLOCK_D=bd, num_warps=4 if bd <= 64 else 8)


def _row_grid(t: dict, B: int, Hq: int, Hkv: int, G: int, Lq: int) -> tuple[int, int]:
    """Forward / dq grid: (row tiles, b * kv head) packed, (row tiles, b * q head) otherwise."""
    if t["PACK"]:
        return triton.cdiv(G * Lq, t["BLOCK_M"]), B * Hkv
    return triton.cdiv(Lq, t["BLOCK_M"]), B * Hq


def _mask_args(mask: Optional[Tensor], like: Tensor) -> tuple:
    """(pointer, stride b, stride n): the bool mask viewed as uint8 (same bytes, no copy)."""
    if mask is None:
        return like.new_empty(1, dtype=torch.uint8), 0, 0
    return mask.view(torch.uint8), *mask.stride()


def _fwd_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = _common.alloc(B, Hq, Lq, D, like=q)
    lse = _common.alloc(B, Hq, Lq, like=q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    t = _tiles(Lq, G, D, q.dtype)
    mp, smb, smn = _mask_args(mask, q)
    _gqa_fwd[_row_grid(t, B, Hq, Hkv, G, Lq)](
        q, k, v, mp, out, lse, Hq, Hkv, G, Lq, Lk, D, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *out.stride(),
        CAUSAL=causal, HAS_MASK=mask is not None, PREC=_common.dot_precision(q), UPCAST=_common.upcast_dot(q), **t)
    return out, lse


def _bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                mask: Optional[Tensor], causal: bool, scale: float):
    """Returns dq, dk, dv in the inputs' dtypes (fp32 accumulation)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dq = _common.alloc(B, Hq, Lq, D, like=q)
    dk = _common.alloc(B, Hkv, Lk, D, like=k)
    dv = _common.alloc(B, Hkv, Lk, D, like=v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    t = _tiles(Lq, G, D, q.dtype)
    mp, smb, smn = _mask_args(mask, q)
    delta = _common.alloc(B, Hq, Lq, like=q, dtype=torch.float32)
    bm_delta = 64
    _gqa_bwd_delta[(triton.cdiv(Lq, bm_delta), B * Hq)](
        out, dout, delta, Hq, Lq, D, *out.stride(), *dout.stride(), BLOCK_M=bm_delta, BLOCK_D=t["BLOCK_D"])
    common = dict(CAUSAL=causal, HAS_MASK=mask is not None, PREC=_common.dot_precision(q), UPCAST=_common.upcast_dot(q), **t)
    strides = (*q.stride(), *k.stride(), *v.stride(), smb, smn, *dout.stride())
    _gqa_bwd_dq[_row_grid(t, B, Hq, Hkv, G, Lq)](
        q, k, v, mp, dout, lse, delta, dq, Hq, Hkv, G, Lq, Lk, D, scale, *strides, *dq.stride(), **common)
    _gqa_bwd_dkdv[(triton.cdiv(Lk, t["BLOCK_N"]), B * Hkv)](
        q, k, v, mp, dout, lse, delta, dk, dv, Hq, Hkv, G, Lq, Lk, D, scale,
        *strides, *dk.stride(), *dv.stride(), **common)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library registration: mmts_fast::gqa_attention (Triton), fake and autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mmts_fast::gqa_attention", mutates_args=())
def _gqa_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                      scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out [B, Hq, Lq, D] in q's dtype, logsumexp [B, Hq, Lq] fp32, +inf on rows with no visible key)."""
    if not HAS_TRITON:
        raise RuntimeError("mmts_fast::gqa_attention needs triton; use the torch backend instead")
    return _fwd_triton(q, k, v, key_padding_mask, causal, scale)


@_gqa_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale):
    B, Hq, Lq, D = q.shape
    return q.new_empty(B, Hq, Lq, D), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("mmts_fast::gqa_attention_backward", mutates_args=())
def _gqa_attention_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          key_padding_mask: Optional[Tensor], causal: bool,
                          scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_triton(dout, q, k, v, out, lse, key_padding_mask, causal, scale)


@_gqa_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)


def _backward(ctx, dout, dlse_unused):
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.mmts_fast.gqa_attention_backward(dout, q, k, v, out, lse, mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_gqa_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def gqa_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                  key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Grouped-query attention (K3): ``softmax(scale * q k^T + mask) v`` with query head h reading kv head
    ``h // (Hq / Hkv)``.

    Args:
        q: ``[B, Hq, Lq, D]`` (any strides, e.g. a transposed ``[B, Lq, Hq, D]`` projection).
        k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0``; ``Lk`` may differ from ``Lq`` (cross-attention).
            Same dtype as q: fp32 / bf16 / fp16 (the reference also takes fp64).
        causal: bottom-right aligned causal mask: query i sees keys ``j <= i + Lk - Lq`` (the last query
            sees every key, as in flash-attention; the usual lower triangle when ``Lq == Lk``).
        key_padding_mask: ``[B, Lk]`` bool, True = attend, False = padding (the opposite of
            ``nn.MultiheadAttention``'s ``key_padding_mask``); None = every key.
        scale: score scale; None means ``1 / sqrt(D)``.

    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype (contiguous). Rows whose query sees no key get 0 (not NaN) and
        pass zero gradient.

    Head dim ``1 <= D <= 128``. Runs the Triton kernels or the eager reference as the backend switch
    says (:mod:`mmts_fast.backend`). Differentiable in q, k and v. No dropout.
    """
    if backend.resolve(q, k, v) == "torch":
        return gqa_attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    D = _check(q, k, v, key_padding_mask)[5]
    if q.dtype not in _DTYPES:
        raise ValueError(f"gqa_attention: the Triton path takes fp32/bf16/fp16 inputs, got {q.dtype}")
    out, _ = torch.ops.mmts_fast.gqa_attention(q, k, v, key_padding_mask, bool(causal), _scale(scale, D))
    return out
