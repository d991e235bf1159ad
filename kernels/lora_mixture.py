"""K2: grouped LoRA / D-LoRA mixture matmul (SPEC section 2, K2; variants 1.3 MoLA and 1.6 LoRA-AMR).

One file, one story: the eager reference (the spec, also the CPU and export path), the Triton
kernels (NF4 dequantisation, base matmul, LoRA shrink / expand, grouped outer products for dA / dB)
with their launchers, the ``torch.library`` registration (``mmts_fast::lora_mixture`` with fake and
autograd implementations, ``mmts_fast::dequantize_nf4``) and LoRA-AMR as an autograd function.

What it computes, for T rows ``x [T, d_in]`` and M LoRA experts (rank r)::

    y = x W^T + bias + scale * sum_m g[row, m] * (x A_m^T) B_m^T

with ``W [d_out, d_in]`` frozen (dense fp32 / bf16 / fp16, or NF4 in bitsandbytes' layout),
``A [M, r, d_in]``, ``B [M, d_out, r]`` and gates ``g [T, M]`` that are zero for unselected experts
(top-n per row). Work scales with the selected (row, expert) pairs, not with M:

* the selected pairs are sorted into per-expert segments (Punica / vLLM SGMV style);
* shrink: ``u_p = x[row_p] A_m^T`` for every pair p, ``[P, r]``, one tensor-core tile per (expert, rows);
* expand: ``y[row_p] += scale * g_p * u_p B_m^T``. A row has up to n pairs, so the pairs are also
  ranked within their row ("slot" j = the row's j-th selected expert) and the expand runs once per
  slot: within a slot every row appears at most once, so tiles add into the output without atomics
  and the result is deterministic;
* the base ``x W^T + bias`` is its own tiled kernel (NF4 tiles dequantised on load with the same
  jitted helper as the standalone ``dequantize_nf4`` kernel) writing the fp32 accumulator that the
  expand slots add into (bf16/fp16 outputs are rounded once, at the end).

Backward: recompute u (shrink of x), ``w = dy B_m`` (shrink of dy), ``dgates = scale <w, u>``,
``du = scale g w``; dx = ``dy W`` (the base kernel on the transposed weight, NF4 too) plus the expand of
du through A; dA and dB are grouped outer products over each expert's segment of pairs.

Host syncs per call (forward, and again in backward): the pair count, the slot count and the tile
counts (like vLLM's LoRA metadata preparation). Tile sizes are fixed, not autotuned; the Triton path
has been validated under the interpreter only (no GPU timings in this repository yet).
NF4: only ``quant_type="nf4"`` (bitsandbytes' fp4 is rejected); blocksize any power of two bnb allows.

Segment variant (MoLA, ``segments=S``): d_out is split into S contiguous segments (the
``torch.tensor_split`` convention: the first ``d_out % S`` segments are one longer) and the gates are
``[S, M]``, shared by all rows: ``y[:, seg s] = x W_s^T + b_s + scale * sum_m g[s, m] (x A_m^T) B_m[seg s]^T``.
Triton runs it with the same kernels: every row is paired with each expert that some segment uses,
and the expand reads ``B_eff[m, o] = scale * g[seg(o), m] * B_m[o]``.

Gradients: dx, dA, dB, dgates, dbias. The base weight is frozen: no dW (the public functions raise
if ``weight.requires_grad`` while grad mode is on). Token gates: the zero pattern of ``gates`` is
the routing decision and is treated as a constant, so dgates is the true gradient at the selected
(nonzero) entries and 0 elsewhere (as after a top-n scatter). Segment gates: dgates is the full
gradient for every expert that some segment uses, 0 for experts no segment uses.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmts_fast import backend
from mmts_fast.kernels import _common

try:  # Triton is optional: the reference runs everywhere.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on platforms without triton
    HAS_TRITON = False

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # dtype codes 0, 1, 2 (NF4 dequant targets)


# ---------------------------------------------------------------------------------------------
# Inputs: the NF4 weight format and the shape checks, shared by both paths
# ---------------------------------------------------------------------------------------------
class NF4State(NamedTuple):
    """An NF4 tensor in bitsandbytes' layout, as flat tensors: what the kernels and the op schema take.

    ``packed``: flat uint8, two 4-bit codes per byte (the first value in the high nibble), row-major.
    ``state``: ``[absmax fp32, code fp32[16]]``, or with double quantisation
    ``[absmax uint8, code fp32[16], absmax2 fp32, code2 fp32[256], offset fp32[1]]``
    (then ``absmax = code2[absmax_q] * absmax2[block // blocksize2] + offset``).
    """
    packed: Tensor
    state: list
    shape: tuple
    blocksize: int
    blocksize2: int        # 0 without double quantisation
    dtype: torch.dtype     # the dequantised dtype (bitsandbytes' quant_state.dtype)


CPU_BLOCK_N = 32   # the row-block size of bitsandbytes' CPU layout (its default, what Linear4bit.forward uses)


def nf4_dtype(quant_state) -> torch.dtype:
    """The dtype an NF4 ``QuantState`` dequantises to: ``quant_state.dtype``, except in bitsandbytes' CPU layout
    (:func:`nf4_unpack_cpu_format`), which sets it to bf16 and keeps the original in ``original_dtype``."""
    if getattr(quant_state, "packing_format_for_cpu", False):
        return getattr(quant_state, "original_dtype", None) or quant_state.dtype
    return quant_state.dtype


def nf4_unpack_cpu_format(packed: Tensor, quant_state) -> tuple[Tensor, Tensor, torch.dtype]:
    """Undo bitsandbytes' CPU-only NF4 layout (``quant_state.packing_format_for_cpu``), leaving both arguments as
    they are. Returns ``(bytes, absmax, dtype)``: the flat uint8 data in the standard layout, the per-block
    scales as fp32 ``[d_out * d_in // blocksize]`` (not nested) and the original dequantised dtype.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in inference (eval, input without grad) runs
    ``bitsandbytes.functional._convert_weight_packed_for_cpu`` once: the codes of every 32 rows are interleaved
    into ``[N, K/2]`` bytes, the absmax is de-nested (double quantisation dropped) and stored as bf16
    ``[K/blocksize, N]`` (transposed), and ``quant_state.dtype`` becomes bf16 (the original kept in
    ``original_dtype``). The codes come back exactly; the absmax went through bf16, which is lossy (8 bits of
    mantissa, not recoverable): the result is the NF4 tensor the repacked layer holds, i.e.
    ``code[nibble] * bf16(absmax)``, which differs from the weights before the repack by up to 2^-8 relative.
    (bitsandbytes' own inverse, ``_convert_weight_packed_for_cpu_inverse``, leaves the absmax bf16 and transposed
    when the original state was not nested, and re-quantises it with a new double quantisation when it was,
    which adds a second error.)"""
    qs = quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("nf4_unpack_cpu_format: the quant_state is not in bitsandbytes' CPU layout")
    N, K = (int(s) for s in qs.shape)
    bs = int(qs.blocksize)
    data = packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)
    absmax = qs.absmax
    if (len(qs.shape) != 2 or N % CPU_BLOCK_N or K % 2 or K % bs or data.numel() != N * K // 2
            or tuple(absmax.shape) != (K // bs, N)):
        raise ValueError(f"NF4 weights in bitsandbytes' CPU layout: unexpected sizes (shape {tuple(qs.shape)}, "
                         f"{data.numel()} bytes, absmax {tuple(absmax.shape)}, blocksize {bs}); expected "
                         f"N % {CPU_BLOCK_N} == 0, K % blocksize == 0, N*K/2 bytes and absmax [K/blocksize, N]")
    # bytes: rows of 32, each the low nibbles then the high nibbles of the [B=32, 2] codes of one
    # (row block, column pair), in (row, column parity) order
    rows = data.reshape(-1, CPU_BLOCK_N)
    codes = torch.cat([rows & 15, rows >> 4], dim=-1)                         # [N/32 * K/2, 64]
    codes = codes.reshape(N // CPU_BLOCK_N, K // 2, CPU_BLOCK_N, 2).transpose(1, 2).reshape(-1)  # row-major [N*K]
    std = (codes[0::2] << 4) | codes[1::2]                                    # first value in the high nibble
    return std.contiguous(), absmax.T.reshape(-1).float(), nf4_dtype(qs)


def nf4_state(packed: Tensor, quant_state) -> NF4State:
    """Read a bitsandbytes ``(packed, QuantState)`` pair (``quantize_4bit(..., quant_type="nf4")``); also one in
    bitsandbytes' CPU-only layout (:func:`nf4_unpack_cpu_format`), read as the NF4 tensor it holds."""
    qs = quant_state
    if getattr(qs, "quant_type", None) != "nf4":
        raise ValueError(f"NF4 weights: only NF4 4-bit weights are supported (quant_type='nf4'), got quant_type="
                         f"{getattr(qs, 'quant_type', None)!r}")
    dtype = nf4_dtype(qs)
    if dtype not in _DTYPES:
        raise ValueError(f"NF4 weights: the dequantised dtype must be fp32/bf16/fp16, got {dtype}")
    shape = tuple(int(s) for s in qs.shape)
    code = qs.code.float()
    if getattr(qs, "packing_format_for_cpu", False):
        flat, absmax, _ = nf4_unpack_cpu_format(packed, qs)
        return NF4State(flat, [absmax, code], shape, int(qs.blocksize), 0, dtype)
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:          # quant_storage other than uint8: same bytes
        flat = flat.contiguous().view(torch.uint8)
    n = math.prod(shape)
    if flat.numel() != (n + 1) // 2:
        raise ValueError(f"lora_mixture: packed NF4 data has {flat.numel()} bytes, expected "
                         f"{(n + 1) // 2} for shape {shape}")
    if qs.nested:
        offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=flat.device).reshape(1)
        state = [qs.absmax, code, qs.state2.absmax.float(), qs.state2.code.float(), offset]
        bs2 = int(qs.state2.blocksize)
    else:
        state = [qs.absmax.float(), code]
        bs2 = 0
    return NF4State(flat, state, shape, int(qs.blocksize), bs2, dtype)


def _as_nf4(weight) -> Optional[NF4State]:
    """``bitsandbytes.nn.Params4bit`` (quantised) or a ``(packed, QuantState)`` pair -> NF4State;
    anything else (a dense tensor, None) -> None."""
    if isinstance(weight, NF4State):
        return weight
    if isinstance(weight, (tuple, list)) and len(weight) == 2:
        return nf4_state(weight[0], weight[1])
    qs = getattr(weight, "quant_state", None)
    if qs is not None and isinstance(weight, Tensor) and not weight.is_floating_point():
        return nf4_state(weight, qs)
    return None


class _Dims(NamedTuple):
    T: int
    d_in: int
    d_out: int
    M: int
    r: int
    lead: tuple
    nf4: Optional[NF4State]


def _check(x, weight, bias, lora_a, lora_b, gates, segments, name="lora_mixture") -> _Dims:
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be [..., d_in] with at least 2 dims, got shape {tuple(x.shape)}")
    d_in = x.shape[-1]
    lead = tuple(x.shape[:-1])
    T = math.prod(lead)
    if lora_a.dim() != 3:
        raise ValueError(f"{name}: lora_a must be [M, r, d_in], got shape {tuple(lora_a.shape)}")
    M, r, a_in = lora_a.shape
    if a_in != d_in:
        raise ValueError(f"{name}: d_in mismatch: x has d_in={d_in} but lora_a is {tuple(lora_a.shape)} "
                         f"([M, r, d_in])")
    if lora_b.dim() != 3 or lora_b.shape[0] != M:
        raise ValueError(f"{name}: lora_b must be [M={M}, d_out, r], got shape {tuple(lora_b.shape)}")
    if lora_b.shape[2] != r:
        raise ValueError(f"{name}: rank mismatch: lora_a has r={r} but lora_b is {tuple(lora_b.shape)} "
                         f"([M, d_out, r])")
    d_out = lora_b.shape[1]
    nf4 = _as_nf4(weight)
    _common.require_float(name, x=x, lora_a=lora_a, lora_b=lora_b, gates=gates, bias=bias,
                          weight=weight if nf4 is None else None)
    if nf4 is not None:
        wshape = nf4.shape
    elif weight is not None:
        wshape = tuple(weight.shape)
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: the base weight is frozen (no dW is computed); pass weight.detach() "
                             f"or call weight.requires_grad_(False)")
    if weight is not None and wshape != (d_out, d_in):
        raise ValueError(f"{name}: weight must be [d_out={d_out}, d_in={d_in}] (d_out from lora_b, d_in from x), "
                         f"got {wshape}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"{name}: bias must be [d_out={d_out}], got {tuple(bias.shape)}")
    if segments is None:
        if tuple(gates.shape) not in ((T, M), lead + (M,)):
            raise ValueError(f"{name}: gates must be [T, M]=({T}, {M}) (or x's leading dims + [M]), "
                             f"got {tuple(gates.shape)}")
    else:
        if isinstance(segments, bool) or not isinstance(segments, int) or not 1 <= segments <= d_out:
            raise ValueError(f"{name}: segments must be an int in [1, d_out={d_out}], got {segments!r}")
        if tuple(gates.shape) != (segments, M):
            raise ValueError(f"{name}: gates must be [segments, M]=({segments}, {M}) with segments={segments}, "
                             f"got {tuple(gates.shape)}")
    return _Dims(T, d_in, d_out, M, r, lead, nf4)


_INDEX_CACHE: dict = {}


def segment_ids(d_out: int, segments: int, device=None) -> Tensor:
    """``[d_out]`` int64: the output segment of each column (``torch.tensor_split`` sizes). Cached."""
    key = (d_out, segments, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        return hit
    sizes = [d_out // segments + (1 if s < d_out % segments else 0) for s in range(segments)]
    ids = torch.repeat_interleave(torch.arange(segments), torch.tensor(sizes)).to(device)
    if not torch.compiler.is_compiling():   # never cache tensors made while tracing
        _INDEX_CACHE[key] = ids
    return ids


# ---------------------------------------------------------------------------------------------
# Eager reference: the spec, the CPU path and the export path
# ---------------------------------------------------------------------------------------------
def _nf4_absmax_reference(st: NF4State) -> Tensor:
    """Per-block fp32 scales; with double quantisation ``code2[q] * absmax2[block // bs2] + offset``
    (a product, then a sum, in fp32, exactly as bitsandbytes does it)."""
    if st.blocksize2 == 0:
        return st.state[0]
    qabs, _, absmax2, code2, offset = st.state
    blk = torch.arange(qabs.numel(), device=qabs.device)
    return code2[qabs.long()] * absmax2[blk // st.blocksize2] + offset


def dequantize_nf4_reference(packed, quant_state=None) -> Tensor:
    """NF4 -> dense in ``quant_state.dtype``: ``code[nibble] * absmax[i // blocksize]`` in fp32, then cast
    (equal, bit for bit, to ``bitsandbytes.functional.dequantize_4bit``). ``packed`` may also be a
    Params4bit, or an :class:`NF4State` (then no quant_state)."""
    st = _as_nf4(packed) if quant_state is None else nf4_state(packed, quant_state)
    if st is None:
        raise ValueError("dequantize_nf4: expected (packed, QuantState), a quantised Params4bit or an NF4State")
    n = math.prod(st.shape)
    i = torch.arange(n, device=st.packed.device)
    byte = st.packed[i // 2]
    nibble = torch.where(i % 2 == 0, byte >> 4, byte & 15)             # first value in the high nibble
    values = st.state[1][nibble.long()] * _nf4_absmax_reference(st)[i // st.blocksize]
    return values.to(st.dtype).reshape(st.shape)


def _base_reference(x2: Tensor, weight, nf4: Optional[NF4State], bias: Optional[Tensor], d_out: int) -> Tensor:
    """``x W^T + bias`` in x's dtype (W dequantised first when NF4; zeros + bias when weight is None)."""
    dtype = x2.dtype
    b = bias.to(dtype) if bias is not None else None
    if weight is None and nf4 is None:
        y = x2.new_zeros(x2.shape[0], d_out)
        return y + b if b is not None else y
    w = dequantize_nf4_reference(nf4) if nf4 is not None else weight
    return F.linear(x2, w.to(dtype), b)


def _token_delta_reference(y: Tensor, x2: Tensor, A: Tensor, B: Tensor, g: Tensor, scale: float) -> Tensor:
    """``y + scale * sum_m g[:, m] (x A_m^T) B_m^T``, computing only the selected (row, expert) pairs:
    gather them, group them by expert, then one shrink and one expand matmul per expert that has any."""
    M = A.shape[0]
    rows, experts = g.nonzero(as_tuple=True)                  # the selected pairs, row by row
    order = torch.argsort(experts, stable=True)               # ... grouped into per-expert segments
    rows, experts = rows[order], experts[order]
    coef = scale * g[rows, experts]                           # gradient flows to the selected gates only
    counts = torch.bincount(experts, minlength=M).tolist()
    for m, (rows_m, coef_m) in enumerate(zip(rows.split(counts), coef.split(counts))):
        if counts[m] == 0:
            continue                                          # unselected expert: never touched
        u = x2[rows_m] @ A[m].T                               # shrink  [P_m, r]
        y.index_add_(0, rows_m, (coef_m[:, None] * u) @ B[m].T)   # expand  [P_m, d_out], added per row
    return y


def _segment_delta_reference(y: Tensor, x2: Tensor, A: Tensor, B: Tensor, g: Tensor, scale: float) -> Tensor:
    """MoLA: ``y[:, seg s] += scale * sum_m g[s, m] (x A_m^T) B_m[seg s]^T`` over the experts that some
    segment uses: one shrink for them all, then one matmul against the gate-scaled stacked B."""
    S, M = g.shape
    d_out, r = B.shape[1], B.shape[2]
    coef = scale * g[segment_ids(d_out, S, g.device)]         # [d_out, M]: gate of each column's segment
    if not torch.compiler.is_compiling():   # compile/export keep every expert (static shapes; unused weigh 0)
        used = g.ne(0).any(0).nonzero().squeeze(1)            # experts used by at least one segment
        if used.numel() == 0:
            return y
        A, B, coef = A[used], B[used], coef[:, used]
    k = A.shape[0]
    u = x2 @ A.reshape(k * r, -1).T                           # [T, k*r]: all used experts' shrinks
    b_mix = (B.permute(1, 0, 2) * coef[:, :, None]).reshape(d_out, k * r)
    return y + u @ b_mix.T


def _dense_delta_reference(y, x2, A, B, g, scale):
    """The same sum over ALL experts with static shapes (compile / export: no data-dependent shapes).
    ``g * (g != 0)`` keeps the gradient convention (zero at unselected entries)."""
    T, M = g.shape
    r = A.shape[1]
    u = (x2 @ A.reshape(M * r, -1).T).view(T, M, r) * (scale * g * g.ne(0))[:, :, None]
    return y + u.reshape(T, M * r) @ B.permute(0, 2, 1).reshape(M * r, -1)


def lora_mixture_reference(x: Tensor, weight, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                           gates: Tensor, scale: float = 1.0, *, segments: Optional[int] = None) -> Tensor:
    """Plain PyTorch K2 (see :func:`lora_mixture`). Differentiable in x, lora_a, lora_b, gates, bias.

    Token gates: only the selected pairs are computed (a Python loop over the experts that have any,
    one host sync for the segment sizes). Under ``torch.compile`` and ``torch.export`` the dense all-expert
    form is used instead (static shapes, no host sync; unselected experts weigh 0).
    """
    d = _check(x, weight, bias, lora_a, lora_b, gates, segments)
    dtype = x.dtype
    x2 = x.reshape(d.T, d.d_in)
    y = _base_reference(x2, weight, d.nf4, bias, d.d_out)
    A, B = lora_a.to(dtype), lora_b.to(dtype)
    if segments is not None:
        y = _segment_delta_reference(y, x2, A, B, gates.to(dtype), scale)
    elif torch.compiler.is_compiling():
        y = _dense_delta_reference(y, x2, A, B, gates.reshape(d.T, d.M).to(dtype), scale)
    else:
        y = _token_delta_reference(y, x2, A, B, gates.reshape(d.T, d.M).to(dtype), scale)
    return y.reshape(*d.lead, d.d_out)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    from mmts_fast.kernels._common import dot as _dot

    @triton.jit
    def _nf4_values(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat, mask,
                    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
        """fp32 values of an NF4 tensor at flat row-major indices ``flat`` (any tile shape; 0 where masked):
        ``code[nibble] * absmax[flat // BLOCKSIZE]``, two codes per byte with the first in the high nibble.
        NESTED: absmax itself is 8-bit, ``code2[q] * absmax2[block // BLOCKSIZE2] + offset``."""
        byte = tl.load(q_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        val = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        blk = flat // BLOCKSIZE
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            am = tl.load(code2_ptr + qa, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // BLOCKSIZE2,
                                                                         mask=mask, other=0.0)
            am = am + tl.load(offset_ptr)
        else:
            am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return tl.where(mask, val * am, 0.0)

    @triton.jit
    def _to_dtype_code(v, CODE: tl.constexpr):
        """Round fp32 values to dtype code 0 fp32, 1 bf16, 2 fp16 (the NF4 tensor's dequantised dtype),
        to nearest even. bf16 by hand on the bits (finite values): the interpreter's fp32 -> bf16 cast
        truncates, and bitsandbytes / PyTorch round to nearest even."""
        # one return statement: Triton's code generator rejects returns of different types (the
        # interpreter does not), even under constexpr conditions
        if CODE == 1:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        elif CODE == 2:
            out = v.to(tl.float16)
        else:
            out = v
        return out

    @triton.jit
    def _nf4_dequant_kernel(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, N,
                            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                            CODE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        v = _nf4_values(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs, mask,
                        BLOCKSIZE, BLOCKSIZE2, NESTED)
        tl.store(out_ptr + offs, _to_dtype_code(v, CODE), mask=mask)

    @triton.jit
    def _lora_base_mm(x_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, out_ptr,
                      T, N, K, sxt, sxk, swn, swk, sot, son,
                      HAS_BIAS: tl.constexpr, NF4: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                      BLOCKSIZE2: tl.constexpr, WCODE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[t, n] = sum_k x[t, k] w[n, k] (+ bias[n]) with fp32 accumulation, in x's dtype.
        w is dense at ``n * swn + k * swk`` or NF4 at that flat index, dequantised tile by tile on load
        (forward: w = W, swn = d_in, swk = 1; backward dx = dy W: swn = 1, swk = d_in)."""
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_t = rt < T
        mask_n = rn < N
        xdt = x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            xt = tl.load(x_ptr + rt[:, None].to(tl.int64) * sxt + rk[None, :] * sxk,
                         mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            woff = rk[:, None].to(tl.int64) * swk + rn[None, :].to(tl.int64) * swn          # [BLOCK_K, BLOCK_N]
            wmask = mask_k[:, None] & mask_n[None, :]
            if NF4:
                wt = _nf4_values(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, woff, wmask,
                                 BLOCKSIZE, BLOCKSIZE2, NESTED)
                wt = _to_dtype_code(wt, WCODE)
            else:
                wt = tl.load(w_ptr + woff, mask=wmask, other=0.0)
            acc = _dot(xt, wt.to(xdt), acc, PREC, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(xdt).to(tl.float32)[None, :]
        tl.store(out_ptr + rt[:, None].to(tl.int64) * sot + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_n[None, :])

    @triton.jit
    def _tile_setup(tile, rows_ptr, tstart_ptr, tend_ptr, texp_ptr, BLOCK_P: tl.constexpr):
        """A tile: up to BLOCK_P consecutive pairs of one expert. Returns pair ids, mask, rows, expert."""
        start = tl.load(tstart_ptr + tile)
        end = tl.load(tend_ptr + tile)
        m = tl.load(texp_ptr + tile)
        rp = start + tl.arange(0, BLOCK_P)
        mask_p = rp < end
        rows = tl.load(rows_ptr + rp, mask=mask_p, other=0).to(tl.int64)
        return rp, mask_p, rows, m

    @triton.jit
    def _lora_shrink(x_ptr, a_ptr, rows_ptr, tstart_ptr, tend_ptr, texp_ptr, u_ptr,
                     K, R, sxt, sxk, sam, sar, sak, sup,
                     PREC: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """u[p, j] = sum_k x[row_p, k] a[m_p, j, k] for the pairs of one tile (all of expert m), fp32.
        Forward: a = A (u = x A_m^T); backward: a = B viewed [M, r, d_out] (w = dy B_m)."""
        rp, mask_p, rows, m = _tile_setup(tl.program_id(0), rows_ptr, tstart_ptr, tend_ptr, texp_ptr, BLOCK_P)
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        xdt = x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            xt = tl.load(x_ptr + rows[:, None] * sxt + rk[None, :] * sxk, mask=mask_p[:, None] & mask_k[None, :],
                         other=0.0)
            at = tl.load(a_ptr + m * sam + rr[None, :] * sar + rk[:, None].to(tl.int64) * sak,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)            # [BLOCK_K, BLOCK_R]
            acc = _dot(xt, at.to(xdt), acc, PREC, UPCAST)
        tl.store(u_ptr + rp[:, None] * sup + rr[None, :], acc, mask=mask_p[:, None] & mask_r[None, :])

    @triton.jit
    def _lora_expand(u_ptr, coef_ptr, b_ptr, rows_ptr, tstart_ptr, tend_ptr, texp_ptr, y_ptr, tile0,
                     N, R, sup, sbm, sbn, sbr, syt, syn,
                     HAS_COEF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[row_p, n] += sum_j (coef_p u[p, j]) b[m_p, n, j] for the tiles of ONE slot (each row at most
        once per slot, so no two programs touch the same output element). y is the fp32 accumulator.
        Forward: b = B (coef = scale * g); backward dx: b = A viewed [M, d_in, r], u = du."""
        rp, mask_p, rows, m = _tile_setup(tile0 + tl.program_id(0), rows_ptr, tstart_ptr, tend_ptr, texp_ptr,
                                          BLOCK_P)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        u = tl.load(u_ptr + rp[:, None] * sup + rr[None, :], mask=mask_p[:, None] & mask_r[None, :], other=0.0)
        if HAS_COEF:
            u = u * tl.load(coef_ptr + rp, mask=mask_p, other=0.0)[:, None]
        bt = tl.load(b_ptr + m * sbm + rn[None, :].to(tl.int64) * sbn + rr[:, None] * sbr,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)                  # [BLOCK_R, BLOCK_N]
        v = _dot(u.to(bt.dtype), bt, tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32), PREC, UPCAST)
        yoff = rows[:, None] * syt + rn[None, :] * syn
        m2 = mask_p[:, None] & mask_n[None, :]
        tl.store(y_ptr + yoff, tl.load(y_ptr + yoff, mask=m2, other=0.0) + v, mask=m2)

    @triton.jit
    def _lora_grouped_outer(big_ptr, small_ptr, rows_ptr, eptr_ptr, out_ptr,
                            D, R, sbt, sbd, ssp, som, sod, sor,
                            PREC: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[m, i, j] = sum_{p in expert m's segment} big[row_p, i] small[p, j] (fp32; 0 for an expert
        with no pairs). dA: big = x, small = du; dB: big = dy, small = scale * g * u."""
        m = tl.program_id(0)
        rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = rd < D
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        start = tl.load(eptr_ptr + m)
        end = tl.load(eptr_ptr + m + 1)
        bdt = big_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            rp = p0 + tl.arange(0, BLOCK_P)
            mask_p = rp < end
            rows = tl.load(rows_ptr + rp, mask=mask_p, other=0).to(tl.int64)
            bt = tl.load(big_ptr + rows[:, None] * sbt + rd[None, :] * sbd, mask=mask_p[:, None] & mask_d[None, :],
                         other=0.0)                                                     # [BLOCK_P, BLOCK_D]
            st = tl.load(small_ptr + rp[:, None] * ssp + rr[None, :], mask=mask_p[:, None] & mask_r[None, :],
                         other=0.0)                                                     # [BLOCK_P, BLOCK_R]
            acc = _dot(tl.trans(bt), st.to(bdt), acc, PREC, UPCAST)
        tl.store(out_ptr + m * som + rd[:, None].to(tl.int64) * sod + rr[None, :] * sor, acc,
                 mask=mask_d[:, None] & mask_r[None, :])


# Tiles: base matmul [BLOCK_T, BLOCK_N] over BLOCK_K; LoRA tiles of BLOCK_P pairs (one expert each);
# the rank is padded to BLOCK_R = max(16, next power of two >= r) (tl.dot needs every dim >= 16).
BLOCK_T, BLOCK_N, BLOCK_K = 32, 64, 32
BLOCK_D = 64
DEQUANT_BLOCK = 1024
def _dummy(x: Tensor) -> Tensor:
    return x.new_empty(1, dtype=torch.float32)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _block_p(P: int) -> int:
    return 16 if P <= 4096 or backend.interpreter_enabled() else 64


def _nf4_args(state: list, x: Tensor) -> tuple:
    """(absmax, code, absmax2, code2, offset) pointers for the kernels; dummies where absent."""
    d = _dummy(x)
    if len(state) == 5:
        return tuple(state)
    if len(state) == 2:
        return state[0], state[1], d, d, d
    return d, d, d, d, d


def _dequant_triton(packed: Tensor, state: list, shape: list, blocksize: int, blocksize2: int, code: int) -> Tensor:
    n = math.prod(shape)
    out = _common.alloc(n, like=packed, dtype=_DTYPES[code])
    _nf4_dequant_kernel[(triton.cdiv(n, DEQUANT_BLOCK),)](
        packed, *_nf4_args(state, packed), out, n,
        BLOCKSIZE=blocksize, BLOCKSIZE2=max(blocksize2, 1), NESTED=blocksize2 > 0, CODE=code, BLOCK=DEQUANT_BLOCK,
        enable_fp_fusion=False)   # code2 * absmax2 + offset must not become an FMA: bnb rounds the product
    return out.view(shape)


def _base_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], state: list, meta: list,
                 out: Tensor, transpose: bool = False) -> Tensor:
    """out = x W^T + bias ([T, d_out]), or with ``transpose`` out = x W ([T, d_in]: dx from dy, no bias).
    W is dense [d_out, d_in] or NF4 (``state``/``meta`` non-empty: packed flat in ``weight``)."""
    T, K = x.shape
    nf4 = len(state) > 0
    if nf4:
        d_out, d_in, blocksize, blocksize2, wcode = meta
        sw = (d_in, 1)
    else:
        (d_out, d_in), sw = weight.shape, weight.stride()
        blocksize = blocksize2 = 1
        wcode = 0
    N = d_in if transpose else d_out
    swn, swk = (sw[1], sw[0]) if transpose else sw
    d = _dummy(x)
    _lora_base_mm[(triton.cdiv(T, BLOCK_T), triton.cdiv(N, BLOCK_N))](
        x, weight, *_nf4_args(state, x), bias if bias is not None else d, out,
        T, N, K, *x.stride(), swn, swk, *out.stride(),
        HAS_BIAS=bias is not None, NF4=nf4, NESTED=nf4 and blocksize2 > 0, BLOCKSIZE=blocksize,
        BLOCKSIZE2=max(blocksize2, 1), WCODE=wcode, PREC=_common.dot_precision(x),
        UPCAST=_common.upcast_dot(x),
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        enable_fp_fusion=not (nf4 and blocksize2 > 0))   # as in _dequant_triton: the same weights as bnb
    return out


class _Pairs(NamedTuple):
    """The selected (row, expert) pairs in expert-major order (within an expert: by slot, then row)."""
    rows: Tensor          # [P] int32
    experts: Tensor       # [P] int64
    expert_ptr: Tensor    # [M+1] int32: expert m's pairs are [expert_ptr[m], expert_ptr[m+1])
    tile_start: Tensor    # [n_tiles] int32: tiles of <= block_p pairs of one (expert, slot) group,
    tile_end: Tensor      #   listed slot by slot
    tile_expert: Tensor
    slot_tiles: list      # [(first tile, number of tiles)] per slot
    block_p: int


def _pairs(sel: Tensor) -> Optional[_Pairs]:
    """Sort the nonzero entries of ``sel [T, M]`` into per-expert segments and per-slot tile lists
    (slot j = the row's j-th selected expert). Host syncs: the pair count, the slot count, the tile
    counts. None when nothing is selected."""
    T, M = sel.shape
    dev = sel.device
    rows, experts = sel.nonzero(as_tuple=True)                          # row-major
    P = rows.numel()
    if P == 0:
        return None
    slot = (sel.cumsum(1) - 1)[rows, experts]
    S = int(slot.max()) + 1
    key = experts * S + slot                                            # group = (expert, slot)
    order = torch.argsort(key, stable=True)                             # rows stay ascending in a group
    rows, experts, key = rows[order], experts[order], key[order]
    counts = torch.bincount(key, minlength=M * S)
    starts = counts.cumsum(0) - counts
    expert_ptr = F.pad(counts.view(M, S).sum(1).cumsum(0), (1, 0))
    cnt = counts.view(M, S).t().reshape(-1)                             # groups in (slot, expert) order
    beg = starts.view(M, S).t().reshape(-1)
    block_p = _block_p(P)
    ntiles = (cnt + block_p - 1) // block_p
    per_slot = ntiles.view(S, M).sum(1).tolist()
    total = sum(per_slot)
    grp = torch.repeat_interleave(torch.arange(S * M, device=dev), ntiles, output_size=total)
    first = ntiles.cumsum(0) - ntiles
    tile_start = beg[grp] + (torch.arange(total, device=dev) - first[grp]) * block_p
    tile_end = beg[grp] + cnt[grp]
    offs = [0]
    for n in per_slot:
        offs.append(offs[-1] + n)
    i32 = torch.int32
    return _Pairs(rows.to(i32), experts, expert_ptr.to(i32), tile_start.to(i32), tile_end.to(i32),
                  (grp % M).to(i32), [(offs[j], per_slot[j]) for j in range(S)], block_p)


def _plan(gates: Tensor, lora_b: Tensor, scale: float, segments: int, T: int):
    """What the LoRA kernels run on: (selected mask [T, M], the expand's B, coefficient per pair or None,
    segment column coefficients [M, d_out] or None)."""
    if segments == 0:
        return gates != 0, lora_b, None
    S, M = gates.shape
    coef = scale * gates.float()[segment_ids(lora_b.shape[1], S, gates.device)].t()      # [M, d_out]
    used = (gates != 0).any(0)
    b_eff = lora_b.float() * coef[:, :, None]                  # B_eff[m, o] = scale g[seg(o), m] B_m[o]
    return used[None, :].expand(T, M), b_eff, coef


def _shrink(x: Tensor, a: Tensor, a_strides, R: int, pairs: _Pairs, like: Tensor) -> Tensor:
    """u[p] = x[row_p] a[m_p]^T ([P, R] fp32); a_strides = (per expert, per output j, per input k)."""
    P = pairs.rows.numel()
    u = _common.alloc(P, R, like=like, dtype=torch.float32)
    K = x.shape[1]
    _lora_shrink[(pairs.tile_start.numel(),)](
        x, a, pairs.rows, pairs.tile_start, pairs.tile_end, pairs.tile_expert, u,
        K, R, *x.stride(), *a_strides, u.stride(0),
        PREC=_common.dot_precision(x), UPCAST=_common.upcast_dot(x), BLOCK_P=pairs.block_p, BLOCK_R=_block_r(R), BLOCK_K=BLOCK_K)
    return u


def _expand(u: Tensor, coef: Optional[Tensor], b: Tensor, b_strides, N: int, pairs: _Pairs, y32: Tensor):
    """y32[row_p] += (coef_p u_p) b[m_p]^T, one launch per slot; b_strides = (per expert, per n, per j)."""
    R = u.shape[1]
    for tile0, n_tiles in pairs.slot_tiles:
        if n_tiles == 0:
            continue
        _lora_expand[(n_tiles, triton.cdiv(N, BLOCK_N))](
            u, coef if coef is not None else u, b, pairs.rows, pairs.tile_start, pairs.tile_end,
            pairs.tile_expert, y32, tile0, N, R, u.stride(0), *b_strides, *y32.stride(),
            HAS_COEF=coef is not None, PREC=_common.dot_precision(y32) if b.dtype == torch.float32 else "ieee",
            UPCAST=_common.upcast_dot(b), BLOCK_P=pairs.block_p, BLOCK_R=_block_r(R), BLOCK_N=BLOCK_N)


def _outer(big: Tensor, small: Tensor, pairs: _Pairs, M: int, out: Tensor, out_strides):
    """out[m, i, j] = sum over expert m's pairs of big[row_p, i] small[p, j] (out_strides: m, i, j)."""
    D, R = big.shape[1], small.shape[1]
    _lora_grouped_outer[(M, triton.cdiv(D, BLOCK_D))](
        big, small, pairs.rows, pairs.expert_ptr, out, D, R, *big.stride(), small.stride(0), *out_strides,
        PREC=_common.dot_precision(big), UPCAST=_common.upcast_dot(big), BLOCK_P=pairs.block_p, BLOCK_R=_block_r(R), BLOCK_D=BLOCK_D)
    return out


def _fwd_triton(x, weight, bias, lora_a, lora_b, gates, scale, segments, state, meta):
    T, d_in = x.shape
    M, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    f32 = torch.float32
    y = _common.alloc(T, d_out, like=x)
    y32 = y if x.dtype == f32 else _common.alloc(T, d_out, like=x, dtype=f32)
    if weight is not None:
        _base_triton(x, weight, bias, state, meta, y32)
    else:
        y32.copy_(bias.to(x.dtype).to(f32).expand(T, d_out) if bias is not None else x.new_zeros(T, d_out))
    sel, b_eff, _ = _plan(gates, lora_b, scale, segments, T)
    pairs = _pairs(sel)
    if pairs is not None:
        u = _shrink(x, lora_a, lora_a.stride(), r, pairs, x)
        coef = None if segments else (scale * gates[pairs.rows.long(), pairs.experts].float()).contiguous()
        _expand(u, coef, b_eff, b_eff.stride(), d_out, pairs, y32)
    if y32 is not y:
        y.copy_(y32)
    return y


def _bwd_triton(dy, x, weight, lora_a, lora_b, gates, scale, segments, state, meta, need_dx):
    """Returns dx [T, d_in] fp32 (empty unless need_dx), dA [M, r, d_in], dB [M, d_out, r], dgates fp32."""
    T, d_in = x.shape
    M, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    f32 = torch.float32
    dy = dy.to(x.dtype).contiguous()
    dx = x.new_empty(0, dtype=f32)
    if need_dx:
        dx = _common.alloc(T, d_in, like=x, dtype=f32)
        if weight is not None:
            _base_triton(dy, weight, None, state, meta, dx, transpose=True)
        else:
            dx.zero_()
    dA = _common.alloc(M, r, d_in, like=x, dtype=f32)
    dB = _common.alloc(M, d_out, r, like=x, dtype=f32)
    dg = torch.zeros(gates.shape, device=x.device, dtype=f32)
    sel, b_eff, seg_coef = _plan(gates, lora_b, scale, segments, T)
    pairs = _pairs(sel)
    if pairs is None:
        return dx, dA.zero_(), dB.zero_(), dg
    rows, experts = pairs.rows.long(), pairs.experts
    u = _shrink(x, lora_a, lora_a.stride(), r, pairs, x)                              # x A_m^T
    be = b_eff.stride()
    w = _shrink(dy, b_eff, (be[0], be[2], be[1]), r, pairs, x)                        # dy B_m (B_eff when segmented)
    if segments == 0:
        coef = scale * gates[rows, experts].float()
        dg[rows, experts] = scale * (w * u).sum(1)
        du = coef[:, None] * w
        _outer(dy, coef[:, None] * u, pairs, M, dB, dB.stride())
    else:
        du = w
        G = _outer(dy, u, pairs, M, _common.alloc(M, d_out, r, like=x, dtype=f32), (d_out * r, r, 1))
        used = (gates != 0).any(0).nonzero().squeeze(1)
        dB.copy_(seg_coef[:, :, None] * G)
        per_col = (G[used] * lora_b[used].float()).sum(-1).t()                          # [d_out, k]
        dg[:, used] = scale * torch.zeros(segments, used.numel(), device=x.device, dtype=f32).index_add_(
            0, segment_ids(d_out, segments, x.device), per_col)
    _outer(x, du, pairs, M, dA, (r * d_in, 1, d_in))                                  # dA[m, j, i]
    if need_dx:
        sa = lora_a.stride()
        _expand(du, None, lora_a, (sa[0], sa[2], sa[1]), d_in, pairs, dx)              # dx += du A_m
    return dx, dA, dB, dg


# ---------------------------------------------------------------------------------------------
# torch.library registration: mmts_fast::lora_mixture (Triton), fake and autograd;
# mmts_fast::dequantize_nf4
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mmts_fast::dequantize_nf4", mutates_args=())
def _dequantize_nf4_op(packed: Tensor, state: list[Tensor], shape: list[int], blocksize: int, blocksize2: int,
                       dtype_code: int) -> Tensor:
    if not HAS_TRITON:
        raise RuntimeError("mmts_fast::dequantize_nf4 needs triton; use the torch backend instead")
    return _dequant_triton(packed, state, shape, blocksize, blocksize2, dtype_code)


@_dequantize_nf4_op.register_fake
def _(packed, state, shape, blocksize, blocksize2, dtype_code):
    return packed.new_empty(shape, dtype=_DTYPES[dtype_code])


@torch.library.custom_op("mmts_fast::lora_mixture", mutates_args=())
def _lora_mixture_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                     gates: Tensor, scale: float, segments: int, nf4_state: list[Tensor],
                     nf4_meta: list[int]) -> Tensor:
    """x [T, d_in] -> y [T, d_out]. segments = 0: token gates [T, M]; else gates [segments, M].
    NF4 base: weight = flat packed uint8, nf4_state/nf4_meta = NF4 tensors / [d_out, d_in, blocksize,
    blocksize2, dtype code]; both empty for a dense weight (or None: no base matmul)."""
    if not HAS_TRITON:
        raise RuntimeError("mmts_fast::lora_mixture needs triton; use the torch backend instead")
    return _fwd_triton(x, weight, bias, lora_a, lora_b, gates, scale, segments, nf4_state, nf4_meta)


@_lora_mixture_op.register_fake
def _(x, weight, bias, lora_a, lora_b, gates, scale, segments, nf4_state, nf4_meta):
    return x.new_empty(x.shape[0], lora_b.shape[1])


@torch.library.custom_op("mmts_fast::lora_mixture_backward", mutates_args=())
def _lora_mixture_bwd_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                         gates: Tensor, scale: float, segments: int, nf4_state: list[Tensor], nf4_meta: list[int],
                         need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd_triton(dy, x, weight, lora_a, lora_b, gates, scale, segments, nf4_state, nf4_meta, need_dx)


@_lora_mixture_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, gates, scale, segments, nf4_state, nf4_meta, need_dx):
    T, d_in = x.shape
    M, r, _ = lora_a.shape
    f = torch.float32
    dx = x.new_empty(T, d_in, dtype=f) if need_dx else x.new_empty(0, dtype=f)
    return dx, x.new_empty(M, r, d_in, dtype=f), x.new_empty(M, lora_b.shape[1], r, dtype=f), \
        x.new_empty(gates.shape, dtype=f)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, gates, scale, segments, nf4_state, nf4_meta = inputs
    ctx.scale, ctx.segments, ctx.nf4_meta = scale, segments, nf4_meta
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, lora_a, lora_b, gates, *nf4_state)


def _backward(ctx, dy):
    x, weight, lora_a, lora_b, gates, *nf4_state = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA, dB, dg = torch.ops.mmts_fast.lora_mixture_backward(
        dy, x, weight, lora_a, lora_b, gates, ctx.scale, ctx.segments, nf4_state, ctx.nf4_meta, need[0])
    dbias = dy.float().sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None
    # list inputs: one None per tensor of nf4_state; nf4_meta (ints) is one leaf, or an empty list when empty
    return (dx.to(x.dtype) if need[0] else None, None, dbias, dA.to(lora_a.dtype), dB.to(lora_b.dtype),
            dg.to(gates.dtype), None, None, [None] * len(nf4_state), None if ctx.nf4_meta else [])


_lora_mixture_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def _op_weight(weight, nf4: Optional[NF4State]):
    """(weight tensor, nf4_state, nf4_meta) as the op takes them."""
    if nf4 is None:
        return weight, [], []
    d_out, d_in = nf4.shape
    return nf4.packed, list(nf4.state), [d_out, d_in, nf4.blocksize, nf4.blocksize2, _DTYPES.index(nf4.dtype)]


def dequantize_nf4(packed, quant_state=None) -> Tensor:
    """Dense tensor of an NF4 tensor in bitsandbytes' layout, equal bit for bit to
    ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)`` (also with double quantisation,
    ``compress_statistics=True``). ``packed`` may be a quantised ``Params4bit`` (then no quant_state).
    Triton kernel or torch reference as the backend switch says; not differentiable."""
    st = _as_nf4(packed) if quant_state is None else nf4_state(packed, quant_state)
    if st is None:
        raise ValueError("dequantize_nf4: expected (packed, QuantState) or a quantised Params4bit")
    if backend.resolve(st.packed) == "torch":
        return dequantize_nf4_reference(st)
    return torch.ops.mmts_fast.dequantize_nf4(st.packed, list(st.state), list(st.shape), st.blocksize,
                                              st.blocksize2, _DTYPES.index(st.dtype))


def lora_mixture(x: Tensor, weight, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, gates: Tensor,
                 scale: float = 1.0, *, segments: Optional[int] = None) -> Tensor:
    """Grouped LoRA mixture matmul (K2): ``y = x W^T + bias + scale * sum_m g[row, m] (x A_m^T) B_m^T``.

    Args:
        x: ``[..., d_in]`` (leading dims flattened to T rows and restored; any strides), fp32/bf16/fp16.
        weight: the frozen base ``[d_out, d_in]``: a dense tensor (any float dtype, cast to x's), an NF4
            weight (a quantised ``bitsandbytes.nn.Params4bit`` or a ``(packed uint8, QuantState)`` pair
            from ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``, with or without
            ``compress_statistics``), or None (no base term: bias + LoRA only).
        bias: ``[d_out]`` or None.
        lora_a: ``[M, r, d_in]``; lora_b: ``[M, d_out, r]``.
        gates: ``[T, M]`` (or x's leading dims + ``[M]``), zero for unselected experts (top-n per row);
            with ``segments=S``: ``[S, M]`` per output segment, shared by all rows (MoLA).
        scale: LoRA scaling (e.g. alpha / r).
        segments: None, or S: d_out split into S contiguous segments (``torch.tensor_split`` sizes).

    Returns:
        ``[..., d_out]`` in x's dtype.

    Gradients for x, lora_a, lora_b, gates and bias. The weight is frozen: raises ValueError if it
    requires grad while grad mode is on. dgates is zero at unselected (zero) token gates; see the
    module docstring. Triton path (CUDA, or forced with TRITON_INTERPRET=1): every case, including
    segments and NF4 weights; the reference otherwise. When no token gate is non-zero, the reference
    leaves lora_a, lora_b and gates out of the graph (their ``.grad`` stays None, so an optimiser skips
    them, as for experts a router did not pick; with nothing else requiring grad the output has no
    grad_fn), where the Triton op gives zero gradients.
    """
    if backend.resolve(x) == "torch":
        return lora_mixture_reference(x, weight, bias, lora_a, lora_b, gates, scale, segments=segments)
    d = _check(x, weight, bias, lora_a, lora_b, gates, segments)
    if x.dtype not in _DTYPES:
        raise ValueError(f"lora_mixture: the Triton path takes fp32/bf16/fp16 x, got {x.dtype}")
    w, state, meta = _op_weight(weight, d.nf4)
    g = gates if segments is not None else gates.reshape(d.T, d.M)
    # As the reference: the adapters are used in x's dtype (a no-op when they match; autograd casts their
    # gradients back), and the kernels read the bias at unit stride.
    y = torch.ops.mmts_fast.lora_mixture(x.reshape(d.T, d.d_in), w, bias.contiguous() if bias is not None else None,
                                         lora_a.to(x.dtype), lora_b.to(x.dtype), g, float(scale),
                                         int(segments or 0), state, meta)
    return y.reshape(*d.lead, d.d_out)


# ---------------------------------------------------------------------------------------------
# LoRA-AMR (SPEC 1.6): A_m = C_m D with D frozen and shared; only D x is kept for backward
# ---------------------------------------------------------------------------------------------
def _base_apply(x2: Tensor, weight, nf4: Optional[NF4State], bias: Optional[Tensor], d_out: int,
                transpose: bool = False) -> Tensor:
    """x W^T + bias, or (transpose) x W, through the backend's implementation; no autograd."""
    if backend.resolve(x2) == "torch" or (weight is None and nf4 is None):
        if not transpose:
            return _base_reference(x2, weight, nf4, bias, d_out)
        w = dequantize_nf4_reference(nf4) if nf4 is not None else weight
        return x2 @ w.to(x2.dtype)
    w, state, meta = _op_weight(weight, nf4)
    d_in = meta[1] if nf4 is not None else weight.shape[1]
    out = _common.alloc(x2.shape[0], d_in if transpose else d_out, like=x2)
    bias = bias.contiguous() if bias is not None and not transpose else None     # read at unit stride
    return _base_triton(x2.contiguous(), w, bias, state, meta, out, transpose)


class _LoraAMR(torch.autograd.Function):
    """y = x W^T + bias + scale * sum_m g_m ((x D^T) C_m^T) B_m^T. Saves z = x D^T ([T, r']), C, D, B and
    the gates; the frozen base weight is referenced, not saved; x itself is not kept. The backward runs on
    the forward's backend (a backward called outside a ``use_backend`` block stays on it) and is not
    itself differentiable (a backward with ``create_graph=True`` raises)."""

    @staticmethod
    def forward(ctx, x2, bias, lora_c, lora_d, lora_b, gates, weight, nf4, scale):
        ctx.backend = backend.resolve(x2)
        with backend.use_backend(ctx.backend):
            return _LoraAMR._forward(ctx, x2, bias, lora_c, lora_d, lora_b, gates, weight, nf4, scale)

    @staticmethod
    def _forward(ctx, x2, bias, lora_c, lora_d, lora_b, gates, weight, nf4, scale):
        d_out = lora_b.shape[1]
        z = F.linear(x2, lora_d.to(x2.dtype))                                       # [T, r']
        y = _base_apply(x2, weight, nf4, bias, d_out)
        y = y + lora_mixture(z, None, None, lora_c, lora_b, gates, scale)
        ctx.weight, ctx.nf4, ctx.scale = weight, nf4, scale
        ctx.has_bias = bias is not None
        ctx.save_for_backward(z, lora_c, lora_d, lora_b, gates)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():   # create_graph=True: the grads below would be detached constants
            raise RuntimeError("lora_amr is not twice differentiable (its backward was asked for a graph, "
                               "create_graph=True); use lora_mixture with lora_a = C_m D for higher derivatives")
        with backend.use_backend(ctx.backend):
            return _LoraAMR._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        z, lora_c, lora_d, lora_b, gates = ctx.saved_tensors
        need = ctx.needs_input_grad
        leaves = [t.detach().requires_grad_(n) for t, n in
                  ((z, need[0]), (lora_c, need[2]), (lora_b, need[4]), (gates, need[5]))]
        with torch.enable_grad():
            out = lora_mixture(leaves[0], None, None, leaves[1], leaves[2], leaves[3], ctx.scale)
            wanted = [t for t in leaves if t.requires_grad]
            if wanted and out.requires_grad:   # no selected pair at all: out is a constant, grads are zero
                grads = torch.autograd.grad(out, wanted, dy, allow_unused=True)
            else:
                grads = [None] * len(wanted)
            grads = iter([torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads)])
        dz, dc, db, dg = (next(grads) if t.requires_grad else None for t in leaves)
        dx = None
        if need[0]:
            dx = dz @ lora_d.to(dz.dtype)
            if ctx.weight is not None or ctx.nf4 is not None:
                dx = dx + _base_apply(dy.contiguous(), ctx.weight, ctx.nf4, None, lora_b.shape[1], transpose=True)
        dbias = dy.sum(0) if ctx.has_bias and need[1] else None
        return dx, dbias, dc, None, db, dg, None, None, None


def lora_amr(x: Tensor, weight, bias: Optional[Tensor], lora_c: Tensor, lora_d: Tensor, lora_b: Tensor,
             gates: Tensor, scale: float = 1.0) -> Tensor:
    """LoRA-AMR mixture (SPEC 1.6): K2 with ``A_m = C_m D``:
    ``y = x W^T + bias + scale * sum_m g[row, m] (x D^T C_m^T) B_m^T``.

    Shapes: x ``[..., d_in]``, weight as in :func:`lora_mixture` (dense / NF4 / None), bias ``[d_out]``,
    lora_c ``[M, r, r']`` (trained), lora_d ``[r', d_in]`` (frozen, shared), lora_b ``[M, d_out, r]``,
    gates ``[T, M]`` (token gates only). The activation saved for backward is ``D x`` (``[T, r']``),
    never x. Gradients: x, lora_c, gates, bias, and lora_b if it requires grad (SPEC: frozen).
    W and D are frozen: raises ValueError if either requires grad while grad mode is on.
    The LoRA part runs through :func:`lora_mixture` on ``D x`` (Triton or reference by backend). Under
    ``torch.compile`` it runs as :func:`lora_mixture` with ``A_m = C_m D`` (equal values, but x is saved).
    Not twice differentiable.
    """
    if lora_d.dim() != 2 or lora_d.shape[1] != x.shape[-1]:
        raise ValueError(f"lora_amr: lora_d must be [r', d_in={x.shape[-1]}], got {tuple(lora_d.shape)}")
    if lora_c.dim() != 3 or lora_c.shape[2] != lora_d.shape[0]:
        raise ValueError(f"lora_amr: lora_c must be [M, r, r'={lora_d.shape[0]}], got {tuple(lora_c.shape)}")
    if lora_d.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_amr: D is frozen (no dD is computed); pass lora_d.detach()")
    _common.require_float("lora_amr", lora_c=lora_c, lora_d=lora_d)
    a_shape = torch.empty(lora_c.shape[0], lora_c.shape[1], x.shape[-1], device="meta")
    d = _check(x, weight, bias, a_shape, lora_b, gates, None, name="lora_amr")
    if torch.compiler.is_compiling():   # the same sum with A_m = C_m D made explicit: a graph Dynamo traces
        return lora_mixture(x, weight, bias, torch.einsum("mrk,kd->mrd", lora_c, lora_d.to(lora_c.dtype)),
                            lora_b, gates, scale)
    y = _LoraAMR.apply(x.reshape(d.T, d.d_in), bias, lora_c, lora_d, lora_b, gates.reshape(d.T, d.M),
                       weight if d.nf4 is None else None, d.nf4, float(scale))
    return y.reshape(*d.lead, d.d_out)
