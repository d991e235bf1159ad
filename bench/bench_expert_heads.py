#!/usr/bin/env python
"""Benchmark K1 (fused multi-expert linear heads) against the ways people compute it today.

    python bench/bench_expert_heads.py [--quick] [--out bench/results/expert_heads_<device>.jsonl]
                                       [--device cpu|cuda] [--dtype float32|bfloat16]
                                       [--impls k1,reference,compiled_reference,per_expert_loop]
                                       [--budget-s 4] [--reps N] [--threads N]

Implementations (``impl`` field):

* ``k1``: ``mmts_fast.ops.expert_heads`` under the ``auto`` backend: the Triton kernels on CUDA, the
  eager packed reference on CPU. The ``backend`` field says which one actually ran.
* ``reference``: ``expert_heads_reference``, eager PyTorch: one GEMM for all experts, either against
  the packed ``[M*H, L]`` weight (off-window columns masked to zero) followed by the gate-weighted sum
  (the bias mixed apart as ``gates @ bias``), or, when smaller, on the gate-scaled window inputs
  ``[N, sum w]`` against the concatenated windows' weights.
* ``compiled_reference``: ``torch.compile(expert_heads_reference, dynamic=False)``; compiled during
  warm-up (``compile_s`` is the first call's wall time); a compile failure is recorded in ``error``.
* ``per_expert_loop``: what LeMoLE's public code does: an ``nn.ModuleList`` of ``nn.Linear(w_m, H)``,
  a Python loop over experts on ``x[:, L-w_m:, :].transpose(1, 2)``, ``torch.stack``, a weighted sum
  with the gates, transpose to ``[B, H, C]``. Its weights are slices copied from the packed ones.

Every impl's output is compared once (outside timing) against ``k1``; a row whose relative error
(max |a - b| / max |b|) is above 1e-3 (fp32; 3e-2 for bf16) is written with ``error`` and no timing.

Modes: ``fwd`` runs under ``torch.no_grad()`` (inference); ``fwd+bwd`` runs the forward with autograd
and ``torch.autograd.grad`` of ``y`` against a fixed random upstream gradient, for x, the weights,
the biases and the gates (no ``.grad`` accumulation).

Timing: warm-up, then ``reps`` timed calls (CUDA events around each call on CUDA, after a
synchronize; ``time.perf_counter`` on CPU). ``reps`` adapts to a per-row time budget
(``--budget-s``) between a minimum and a maximum, so slow rows get fewer repetitions. Median and
20th/80th percentiles are recorded in ms. Rows are appended as JSON lines; see bench/README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (Table, Timer, append_row, compile_static, default_out, device_name, measure_row,  # noqa: E402
                      print_cpu_note, run_fields, setup_device, timing_settings, triton_version,
                      split_choices)
from torch import nn

import mmts_fast
from mmts_fast import backend as _backend
from mmts_fast.kernels.expert_heads import expert_heads_reference

HERE = Path(__file__).resolve().parent
IMPLS = ("k1", "reference", "compiled_reference", "per_expert_loop")
MODES = ("fwd", "fwd+bwd")

# Shape groups: (name, B, L, C, M, horizons). LeMoLE-style windows are stated for L=336.
SHAPES = {
    "full": [("ETTh1-like", 32, 336, 7, 4, (96, 192, 336, 720)),
             ("ECL-like", 32, 336, 321, 4, (96, 720))],
    "quick": [("ETTh1-like", 32, 336, 7, 4, (96,)),
              ("ECL-like", 32, 336, 321, 4, (96,))],
    "tiny": [("tiny", 2, 24, 3, 2, (8,))],
}


def window_sets(L: int, M: int) -> list[tuple[str, list[int]]]:
    """('mole', all experts see L) and ('lemole', LeMoLE-style shrinking windows)."""
    if L == 336 and M == 4:
        lemole = [336, 192, 96, 96]
    else:  # same idea at other sizes: halve the window for each later expert, at least 1
        lemole = [max(1, L >> min(m, 2)) for m in range(M)]
    return [("mole", [L] * M), ("lemole", lemole)]


# Peak numbers (dense, no sparsity), by substring of torch.cuda.get_device_name(). Order matters:
# the first match wins. GB/s of HBM; TFLOP/s for fp32 on the CUDA cores (Triton's "ieee" dot, the
# default when torch.backends.cuda.matmul.allow_tf32 is False), TF32 and bf16 on the tensor cores.
PEAKS = [
    ("H200", dict(gbps=4800, fp32=67, tf32=495, bf16=989)),
    ("H100 PCIe", dict(gbps=2000, fp32=51, tf32=378, bf16=756)),
    ("H100 NVL", dict(gbps=3900, fp32=60, tf32=418, bf16=835)),
    ("H100", dict(gbps=3350, fp32=67, tf32=495, bf16=989)),          # SXM5 / HBM3
    ("A100-SXM4-80GB", dict(gbps=2039, fp32=19.5, tf32=156, bf16=312)),
    ("A100 80GB PCIe", dict(gbps=1935, fp32=19.5, tf32=156, bf16=312)),
    ("A100", dict(gbps=1555, fp32=19.5, tf32=156, bf16=312)),         # 40 GB parts
]


def device_peak(name: str, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(peak GB/s, peak TFLOP/s for this dtype) or (None, None) when the device is not in the table."""
    for key, p in PEAKS:
        if key.lower() in name.lower():
            if dtype == torch.bfloat16:
                fl = p["bf16"]
            elif torch.backends.cuda.matmul.allow_tf32:
                fl = p["tf32"]
            else:
                fl = p["fp32"]
            return float(p["gbps"]), float(fl)
    return None, None


# ---------------------------------------------------------------------------------------------
# Cost model (the same for every impl: "useful" work, so it reads as effective throughput).
#   e   = element size of the dtype (x, weight, bias, gates and y all share it here)
#   fwd bytes   = e * (B*L*C          x, read once
#                      + H*sum(w_m)  packed weight, only the window columns
#                      + M*H         bias
#                      + B*C*M       gates
#                      + B*H*C)      y written
#   bwd bytes   = e * (B*H*C dy + B*L*C x + H*sum(w_m) weight + B*C*M gates       read
#                      + B*L*C dx + M*H*L dW + M*H dbias + B*C*M dgates)          written
#   fwd+bwd bytes = fwd + bwd (about 2-3x fwd; the intermediates, e.g. the per-expert outputs
#                   that the eager paths materialise, are not counted: they are the overhead).
#   fwd flops     = 2*B*C*sum(w_m)*H   (the masked zeros the packed reference multiplies don't count)
#   fwd+bwd flops = 3 * fwd flops      (dx and dW each cost one forward GEMM)
# ---------------------------------------------------------------------------------------------
def cost_model(B, L, C, H, M, windows, esize):
    sw = sum(windows)
    fwd_bytes = esize * (B * L * C + H * sw + M * H + B * C * M + B * H * C)
    bwd_bytes = esize * (B * H * C + B * L * C + H * sw + B * C * M
                         + B * L * C + M * H * L + M * H + B * C * M)
    fwd_flops = 2 * B * C * sw * H
    return {"fwd": (fwd_bytes, fwd_flops), "fwd+bwd": (fwd_bytes + bwd_bytes, 3 * fwd_flops)}


# ---------------------------------------------------------------------------------------------
# The per-expert loop, as in LeMoLE's public code
# ---------------------------------------------------------------------------------------------
class PerExpertLoop(nn.Module):
    """``nn.ModuleList`` of ``nn.Linear(w_m, H)``; loop, stack, gate-weighted sum, [B, H, C]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, windows: list[int]):
        super().__init__()
        M, H, L = weight.shape
        self.L, self.windows = L, list(windows)
        self.heads = nn.ModuleList()
        with torch.no_grad():
            for m, w in enumerate(windows):
                lin = nn.Linear(w, H, device=weight.device, dtype=weight.dtype)
                lin.weight.copy_(weight[m, :, L - w:])
                lin.bias.copy_(bias[m])
                self.heads.append(lin)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        outs = [head(x[:, self.L - w:, :].transpose(1, 2))            # [B, C, H] each
                for head, w in zip(self.heads, self.windows)]
        e = torch.stack(outs, dim=-1)                                  # [B, C, H, M]
        y = (e * gates.unsqueeze(2)).sum(-1)                           # [B, C, H]
        return y.transpose(1, 2)                                       # [B, H, C]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def make_inputs(B, L, C, H, M, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(B, L, C)
    weight = rnd(M, H, L, scale=L ** -0.5)
    bias = rnd(M, H, scale=0.1)
    gates = torch.softmax(torch.randn(B, C, M, generator=g), dim=-1).to(device=device, dtype=dtype)
    return x, weight, bias, gates


def build_impl(impl, x, weight, bias, gates, windows, compiled_ref):
    """Returns (fn(x, gates) -> y, params list for the gradients, backend label)."""
    if impl == "k1":
        with mmts_fast.use_backend("auto"):
            label = _backend.resolve(x)

        def fn(x, g):
            with mmts_fast.use_backend("auto"):
                return mmts_fast.ops.expert_heads(x, weight, bias, g, windows)
        return fn, [weight, bias], label
    if impl == "reference":
        return (lambda x, g: expert_heads_reference(x, weight, bias, g, windows)), [weight, bias], "torch"
    if impl == "compiled_reference":
        return (lambda x, g: compiled_ref(x, weight, bias, g, windows)), [weight, bias], "inductor"
    if impl == "per_expert_loop":
        mod = PerExpertLoop(weight.detach(), bias.detach(), windows)
        return mod, list(mod.parameters()), "torch"
    raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")


def make_step(mode, fn, x, gates, params, dy):
    leaves = [x, gates, *params]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, gates)
    else:
        def step():
            y = fn(x, gates)
            return torch.autograd.grad(y, leaves, dy)
    return step


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
TABLE = Table([("impl", 18), ("backend", 8), ("mode", 7), ("shape", 10), ("H", 4), ("windows", 16),
               ("median_ms", 10), ("p20_ms", 9), ("p80_ms", 9), ("reps", 4)],
              left=("impl", "backend", "mode", "shape"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only H=96 for both shapes, fewer reps")
    p.add_argument("--out", default=None, help="JSON-lines file to append to (default bench/results/"
                   "expert_heads_<device>.jsonl; quick/tiny runs: runs/bench/..._quick.jsonl)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--budget-s", type=float, default=None,
                   help="target timed seconds per row (default 4 on CPU, 1 on CUDA; quick: a quarter)")
    p.add_argument("--reps", type=int, default=None, help="fixed number of timed reps (overrides the budget)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (default: leave torch's default)")
    p.add_argument("--shapes", default=None, choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = "quick" if args.quick else "full"
    args.impls = split_choices(p, args.impls, IMPLS, "impl")
    args.modes = split_choices(p, args.modes, MODES, "mode")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = setup_device(args)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    tiny = args.shapes == "tiny"
    quick = args.shapes == "quick"
    timing = timing_settings(args, cuda, tiny, quick)
    budget_s = timing["budget_s"]
    tol = 1e-3 if dtype == torch.float32 else 3e-2

    triton_v = triton_version()
    dev_name = device_name(device)
    peak_gbps, peak_tflops = device_peak(dev_name, dtype) if cuda else (None, None)
    esize = torch.empty(0, dtype=dtype).element_size()

    compiled_ref = None
    if "compiled_reference" in args.impls:
        compiled_ref = compile_static(expert_heads_reference)   # one graph per shape/windows/mode

    configs = []
    for shape, B, L, C, M, horizons in SHAPES[args.shapes]:
        for H in horizons:
            for wname, windows in window_sets(L, M):
                configs.append((shape, B, L, C, H, M, wname, windows))
    n_rows = len(configs) * len(args.impls) * len(args.modes)
    out = Path(args.out) if args.out else default_out("expert_heads", device, quick=args.shapes != "full")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"# expert_heads bench: {dev_name}, {args.dtype}, torch {torch.__version__}, triton {triton_v}, "
          f"{n_rows} rows, budget {budget_s:g}s/row -> {out}", flush=True)
    print_cpu_note(cuda)
    TABLE.header()

    rows, i = [], 0
    t_start = time.perf_counter()
    for shape, B, L, C, H, M, wname, windows in configs:
        x0, weight0, bias0, gates0 = make_inputs(B, L, C, H, M, device, dtype)
        x = x0.requires_grad_(True)
        weight, bias, gates = (t.requires_grad_(True) for t in (weight0, bias0, gates0))
        timer = Timer(device)
        with torch.no_grad(), mmts_fast.use_backend("auto"):
            y_k1 = mmts_fast.ops.expert_heads(x, weight, bias, gates, windows)
        dy = torch.randn(y_k1.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        cost = cost_model(B, L, C, H, M, windows, esize)
        rel_errs = {}
        for impl in args.impls:
            err, fn, params, label = None, None, [], None
            try:
                fn, params, label = build_impl(impl, x, weight, bias, gates, windows, compiled_ref)
            except Exception as e:  # noqa: BLE001 - record, don't crash
                err = f"{type(e).__name__}: {e}"
            for mode in args.modes:
                i += 1
                row = {
                    "bench": "expert_heads", "impl": impl, "backend": label, "mode": mode,
                    "device": dev_name, "device_type": device.type, "dtype": args.dtype, "shape": shape,
                    "B": B, "L": L, "C": C, "H": H, "M": M, "windows": windows, "window_set": wname,
                    "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0,
                    **run_fields(triton_v),
                }
                if err is None:
                    measure_row(row, make_step(mode, fn, x, gates, params, dy), timer, timing,
                                cost=cost[mode], peaks=(peak_gbps, peak_tflops),
                                ours="k1", expected=y_k1, output=partial(fn, x, gates), rel_errs=rel_errs, tol=tol,
                                compiled=impl == "compiled_reference", quiet=impl == "compiled_reference")
                else:
                    row["error"] = err[:2000]
                append_row(out, row)
                rows.append(row)
                TABLE.row(row, i, n_rows)
        del x, weight, bias, gates, y_k1, dy
        if cuda:
            torch.cuda.empty_cache()
    print(f"# done: {len(rows)} rows in {time.perf_counter() - t_start:.0f}s -> {out}", flush=True)
    return rows


if __name__ == "__main__":
    main()
