#!/usr/bin/env python
"""Benchmark K2 (grouped LoRA mixture matmul) against the ways people compute it today.

    python bench/bench_lora_mixture.py [--quick] [--out bench/results/lora_mixture_<cpu|gpu-name>.jsonl]
                                       [--device cpu|cuda] [--dtype float32|bfloat16]
                                       [--impls k2,reference,compiled_reference,peft_loop,base_only]
                                       [--modes fwd,fwd+bwd] [--budget-s 4] [--reps N] [--threads N]

Problem: ``y = x W^T + bias + scale * sum_m g[t, m] (x A_m^T) B_m^T`` with M=8 LoRA experts of rank
r=16, top-2 routing per token (``gates`` zero elsewhere), ``d_in = d_out = d``; W and bias frozen.

Implementations (``impl`` field):

* ``k2``: ``mmts_fast.ops.lora_mixture`` under the ``auto`` backend: the Triton kernels on CUDA,
  the eager reference on CPU. The ``backend`` field says which one actually ran.
* ``reference``: ``lora_mixture_reference``, eager PyTorch: the selected (token, expert) pairs grouped
  per expert, one shrink and one expand matmul per expert that has any (index_add into y).
* ``compiled_reference``: ``torch.compile(lora_mixture_reference, dynamic=False)``, compiled during
  warm-up (``compile_s``); the data-dependent pair grouping makes graph breaks; a compile failure is
  recorded in ``error``.
* ``peft_loop``: what a router-driven mixture on top of peft-style LoRA modules does: a frozen
  ``nn.Linear`` base plus, for EVERY expert m, ``gates[:, m] * scale * lora_B[m](lora_A[m](x))``
  (``nn.Linear`` modules, no bias), the unselected experts masked by their zero gates.
* ``base_only``: the frozen base ``nn.functional.linear(x, W, bias)`` alone (the floor: LoRA costs zero).

Every impl's output is compared once (outside timing) against ``k2``; a row whose relative error
(max |a - b| / max |b|) is above 1e-3 (fp32; 3e-2 for bf16) is written with ``error`` and no timing.
``base_only`` computes a different function and is not compared.

Modes: ``fwd`` under ``torch.no_grad()``; ``fwd+bwd`` = forward with autograd, then
``torch.autograd.grad`` of ``y`` with a fixed random upstream gradient for x, the gates, A and B
(peft_loop: its LoRA modules' weights; base_only: x only). No ``.grad`` accumulation.

Timing: warm-up, then ``reps`` timed calls (CUDA events around each call on CUDA, after a
synchronize; ``time.perf_counter`` on CPU); ``reps`` adapts to a per-row budget (``--budget-s``).
Median and 20th/80th percentiles in ms. Rows are appended as JSON lines (see bench/README.md for the
K1 benchmark, whose format this follows).
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
from mmts_fast import ops
from mmts_fast.kernels.lora_mixture import lora_mixture_reference

HERE = Path(__file__).resolve().parent
IMPLS = ("k2", "reference", "compiled_reference", "peft_loop", "base_only")
MODES = ("fwd", "fwd+bwd")
M, TOP_N, RANK, SCALE = 8, 2, 16, 2.0

# Shape groups: (d, token counts). d_in = d_out = d. 576: SmolLM2-135M hidden size; 4096: Llama-7B.
SHAPES = {
    "full": [(576, (1, 16, 256, 4096)), (4096, (1, 16, 256, 4096))],
    "quick": [(576, (1, 256)), (4096, (16,))],
    "tiny": [(64, (1, 16))],
}


# Peak numbers (dense, no sparsity), by substring of torch.cuda.get_device_name(); first match wins.
PEAKS = [
    ("H200", dict(gbps=4800, fp32=67, tf32=495, bf16=989)),
    ("H100 PCIe", dict(gbps=2000, fp32=51, tf32=378, bf16=756)),
    ("H100 NVL", dict(gbps=3900, fp32=60, tf32=418, bf16=835)),
    ("H100", dict(gbps=3350, fp32=67, tf32=495, bf16=989)),
    ("A100-SXM4-80GB", dict(gbps=2039, fp32=19.5, tf32=156, bf16=312)),
    ("A100 80GB PCIe", dict(gbps=1935, fp32=19.5, tf32=156, bf16=312)),
    ("A100", dict(gbps=1555, fp32=19.5, tf32=156, bf16=312)),
]


def device_peak(name: str, dtype: torch.dtype) -> tuple[float | None, float | None]:
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
# Cost model: the useful work, the same for every impl (reads as effective throughput).
#   e = element size; T tokens; P = T * top_n selected pairs; k = experts selected by any token
#   fwd bytes   = e * (T*d x + d*d W + d bias + k*r*2d A,B of the selected experts + T*M gates + T*d y)
#   bwd bytes   = e * (T*d dy + d*d W + T*d x + k*r*2d A,B + T*M gates            read
#                      + T*d dx + M*r*2d dA,dB + T*M dgates)                        written
#   fwd flops   = 2*T*d*d (base) + 2*P*r*2d (shrink + expand of the selected pairs)
#   bwd flops   = 2*T*d*d (dx through W) + 3 * 2*P*r*2d (dx and dgates through B, A; dA; dB)
# The masked work of the all-experts loop (M/top_n times the LoRA flops) is not counted: overhead.
# ---------------------------------------------------------------------------------------------
def cost_model(T, d, k, esize):
    P = T * TOP_N
    fwd_bytes = esize * (T * d + d * d + d + k * RANK * 2 * d + T * M + T * d)
    bwd_bytes = esize * (T * d + d * d + T * d + k * RANK * 2 * d + T * M + T * d + M * RANK * 2 * d + T * M)
    lora = 2 * P * RANK * 2 * d
    fwd_flops = 2 * T * d * d + lora
    return {"fwd": (fwd_bytes, fwd_flops), "fwd+bwd": (fwd_bytes + bwd_bytes, fwd_flops + 2 * T * d * d + 3 * lora)}


# ---------------------------------------------------------------------------------------------
# The peft-style loop over all experts
# ---------------------------------------------------------------------------------------------
class PeftLoop(nn.Module):
    """Frozen ``nn.Linear`` base + per-expert ``lora_B[m](lora_A[m](x))`` for every expert, gate-masked."""

    def __init__(self, weight, bias, lora_a, lora_b, scale):
        super().__init__()
        n_exp, r, d_in = lora_a.shape
        d_out = lora_b.shape[1]
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.scale = scale
        self.base = nn.Linear(d_in, d_out, **kw)
        self.lora_A = nn.ModuleList(nn.Linear(d_in, r, bias=False, **kw) for _ in range(n_exp))
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False, **kw) for _ in range(n_exp))
        with torch.no_grad():
            self.base.weight.copy_(weight)
            self.base.bias.copy_(bias)
            for m in range(n_exp):
                self.lora_A[m].weight.copy_(lora_a[m])
                self.lora_B[m].weight.copy_(lora_b[m])
        self.base.requires_grad_(False)

    def forward(self, x, gates):
        y = self.base(x)
        for m, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
            y = y + gates[:, m:m + 1] * self.scale * b(a(x))
        return y


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def make_inputs(T, d, device, dtype, seed=0):
    """x [T, d], frozen W [d, d] and bias [d], A [M, r, d], B [M, d, r], top-2 gates [T, M]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(T, d)
    weight, bias = rnd(d, d, scale=d ** -0.5), rnd(d, scale=0.1)
    lora_a, lora_b = rnd(M, RANK, d, scale=d ** -0.5), rnd(M, d, RANK, scale=RANK ** -0.5)
    logits = torch.randn(T, M, generator=g)
    idx = logits.topk(TOP_N, dim=1).indices
    gates = torch.zeros(T, M).scatter(1, idx, torch.softmax(logits.gather(1, idx), 1)).to(device=device, dtype=dtype)
    return x, weight, bias, lora_a, lora_b, gates


def build_impl(impl, weight, bias, lora_a, lora_b, compiled_ref):
    """Returns (fn(x, gates) -> y, trainable params besides x and gates, backend label)."""
    if impl == "k2":
        with mmts_fast.use_backend("auto"):
            label = _backend.resolve(lora_a)

        def fn(x, g):
            with mmts_fast.use_backend("auto"):
                return ops.lora_mixture(x, weight, bias, lora_a, lora_b, g, SCALE)
        return fn, [lora_a, lora_b], label
    if impl == "reference":
        return (lambda x, g: lora_mixture_reference(x, weight, bias, lora_a, lora_b, g, SCALE)), [lora_a, lora_b], "torch"
    if impl == "compiled_reference":
        return (lambda x, g: compiled_ref(x, weight, bias, lora_a, lora_b, g, SCALE)), [lora_a, lora_b], "inductor"
    if impl == "peft_loop":
        mod = PeftLoop(weight, bias, lora_a.detach(), lora_b.detach(), SCALE)
        params = [p for p in mod.parameters() if p.requires_grad]
        return mod, params, "torch"
    if impl == "base_only":
        return (lambda x, g: nn.functional.linear(x, weight, bias)), [], "torch"
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
            return torch.autograd.grad(y, leaves, dy, allow_unused=True)
    return step


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
TABLE = Table([("impl", 18), ("backend", 8), ("mode", 7), ("T", 5), ("d", 5), ("median_ms", 10), ("p20_ms", 9),
               ("p80_ms", 9), ("reps", 4)], left=("impl", "backend", "mode"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d=576 with T in {1, 256} and d=4096 with T=16, fewer reps")
    p.add_argument("--out", default=None, help="JSON-lines file to append to "
                                               "(default bench/results/lora_mixture_<cpu|gpu-name>.jsonl)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--budget-s", type=float, default=None,
                   help="target timed seconds per row (default 4 on CPU, 1 on CUDA; quick: a quarter)")
    p.add_argument("--reps", type=int, default=None, help="fixed number of timed reps (overrides the budget)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--shapes", default=None, choices=sorted(SHAPES),
                   help="shape group (default: quick with --quick, else full; 'tiny' is a smoke test)")
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
    quick = args.quick or args.shapes == "quick"
    timing = timing_settings(args, cuda, tiny, quick)
    budget_s = timing["budget_s"]
    tol = 1e-3 if dtype == torch.float32 else 3e-2

    triton_v = triton_version()
    dev_name = device_name(device)
    peak_gbps, peak_tflops = device_peak(dev_name, dtype) if cuda else (None, None)
    esize = torch.empty(0, dtype=dtype).element_size()

    compiled_ref = None
    if "compiled_reference" in args.impls:
        compiled_ref = compile_static(lora_mixture_reference)

    configs = [(d, T) for d, tokens in SHAPES[args.shapes] for T in tokens]
    n_rows = len(configs) * len(args.impls) * len(args.modes)
    out = Path(args.out) if args.out else default_out("lora_mixture", device, quick=args.shapes != "full")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"# lora_mixture bench: {dev_name}, {args.dtype}, torch {torch.__version__}, triton {triton_v}, "
          f"M={M} top-{TOP_N} r={RANK}, {n_rows} rows, budget {budget_s:g}s/row -> {out}", flush=True)
    print_cpu_note(cuda)
    TABLE.header()

    rows, i = [], 0
    t_start = time.perf_counter()
    for d, T in configs:
        x, weight, bias, lora_a, lora_b, gates = make_inputs(T, d, device, dtype)
        x.requires_grad_(True)
        gates.requires_grad_(True)
        lora_a.requires_grad_(True)
        lora_b.requires_grad_(True)
        k_used = int((gates != 0).any(0).sum())
        timer = Timer(device)
        with torch.no_grad(), mmts_fast.use_backend("auto"):
            y_k2 = ops.lora_mixture(x, weight, bias, lora_a, lora_b, gates, SCALE)
        dy = torch.randn(y_k2.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        cost = cost_model(T, d, k_used, esize)
        rel_errs = {}
        for impl in args.impls:
            err, fn, params, label = None, None, [], None
            try:
                fn, params, label = build_impl(impl, weight, bias, lora_a, lora_b, compiled_ref)
            except Exception as e:  # noqa: BLE001 - record, don't crash
                err = f"{type(e).__name__}: {e}"
            for mode in args.modes:
                i += 1
                row = {
                    "bench": "lora_mixture", "impl": impl, "backend": label, "mode": mode,
                    "device": dev_name, "device_type": device.type, "dtype": args.dtype,
                    "T": T, "d_in": d, "d_out": d, "d": d, "M": M, "top_n": TOP_N, "r": RANK, "scale": SCALE,
                    "experts_used": k_used,
                    "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0,
                    **run_fields(triton_v),
                }
                if err is None:
                    measure_row(row, make_step(mode, fn, x, gates, params, dy), timer, timing,
                                cost=cost[mode], peaks=(peak_gbps, peak_tflops), ours="k2", expected=y_k2,
                                output=None if impl == "base_only" else partial(fn, x, gates),
                                rel_errs=rel_errs, tol=tol,
                                compiled=impl == "compiled_reference", quiet=impl == "compiled_reference")
                else:
                    row["error"] = err[:2000]
                append_row(out, row)
                rows.append(row)
                TABLE.row(row, i, n_rows)
        del x, weight, bias, lora_a, lora_b, gates, y_k2, dy
        if cuda:
            torch.cuda.empty_cache()
    print(f"# done: {len(rows)} rows in {time.perf_counter() - t_start:.0f}s -> {out}", flush=True)
    return rows


if __name__ == "__main__":
    main()
