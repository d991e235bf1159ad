"""Top-k routed SwiGLU experts computed as one grouped computation (MoME's expert layer).

``grouped_swiglu`` sorts the (token, slot) pairs by expert into a capacity-padded buffer
``[E, cap, d]`` and runs three batched matmuls: no Python loop over experts, and the work is
``E * cap`` rows, which is ``T * k`` when routing is balanced (``cap = max tokens per expert``;
worst case ``T`` when one expert takes every token). ``dense_swiglu`` computes every expert on every
token and gathers the selected ones: the same result, used as the test oracle and for export
(data-dependent shapes do not export).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dense_swiglu(x: Tensor, idx: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """x [T, d], idx [T, k] expert ids, weights [E, d, f], [E, d, f], [E, f, d] -> [T, k, d]."""
    h = F.silu(torch.einsum("td,edf->etf", x, w_gate)) * torch.einsum("td,edf->etf", x, w_up)
    out = torch.einsum("etf,efd->etd", h, w_down)                       # [E, T, d]
    return out.permute(1, 0, 2).gather(1, idx[..., None].expand(-1, -1, out.shape[-1]))


def grouped_swiglu(x: Tensor, idx: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Same contract as :func:`dense_swiglu`, computing only the selected (token, expert) pairs."""
    T, k = idx.shape
    E, d = w_gate.shape[0], x.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    counts = torch.bincount(flat, minlength=E)
    cap = int(counts.max())
    pos = torch.arange(T * k, device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]
    buf = x.new_zeros(E, cap, d)
    buf = buf.index_put((expert, pos), x[order // k])
    h = F.silu(torch.bmm(buf, w_gate)) * torch.bmm(buf, w_up)
    out_sorted = torch.bmm(h, w_down)[expert, pos]                      # [T*k, d] in sorted order
    return torch.empty_like(out_sorted).index_copy(0, order, out_sorted).view(T, k, d)


def routed_swiglu(x: Tensor, idx: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Grouped in eager and compiled code; dense while exporting (static shapes)."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return dense_swiglu(x, idx, w_gate, w_up, w_down)
    return grouped_swiglu(x, idx, w_gate, w_up, w_down)
