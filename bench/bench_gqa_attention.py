#!/usr/bin/env python
"""Benchmark K3 (grouped-query attention) against PyTorch's attention paths.

    python bench/bench_gqa_attention.py [--quick] [--out bench/results/gqa_attention_<device>.jsonl]
                                        [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                        [--impls k3,reference,sdpa_math,sdpa_flash,sdpa_efficient]
                                        [--modes fwd,fwd+bwd] [--budget-s S] [--reps N] [--threads N]
                                        [--max-scores-gb G]

Implementations (``impl`` field):

* ``k3``: ``mmts_fast.ops.gqa_attention`` under the ``auto`` backend: the Triton kernels on CUDA, the
  eager reference on CPU. The ``backend`` field says which one actually ran.
* ``reference``: ``gqa_attention_reference``, the explicit eager math in fp32 (query group stacked
  along the rows, one batched matmul per kv head, masked softmax, matmul with V).
* ``sdpa_math``: ``F.scaled_dot_product_attention(q, k, v, is_causal=..., enable_gqa=True)`` restricted to
  the math backend with ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.
* ``sdpa_flash`` / ``sdpa_efficient`` (CUDA only, in the default list there): the same call restricted to
  the flash-attention / memory-efficient kernels. A backend that refuses the inputs (e.g. flash with
  fp32) is recorded in ``error``.

Shapes: ``smollm2``: SmolLM2-135M attention (Hq=9, Hkv=3, D=64), causal self-attention, B in {1, 2, 4, 8},
L in {128, 512, 1024, 2048, 4096}; ``cross``: variate tokens attending to text tokens (B=8, same heads,
not causal), Lq in {7, 64, 862}, Lk in {32, 128, 512}. Causal rows have Lq == Lk, where K3's bottom-right
alignment and SDPA's ``is_causal`` (top-left) agree. No key padding mask (flash SDPA takes none).

FLOPs (``model_flops``, the same for every impl): fwd = 4 * B * Hq * Lq * Lk * D (two matmuls), halved
when causal; fwd+bwd = 3.5 x fwd (backward = 2.5 x forward: dV, dP, dQ, dK plus the recomputed QK^T,
flash-attention's accounting). ``tflops`` = model_flops / median time.

Every impl's output is compared once (outside timing) against ``k3``; a row whose relative error
(max |a - b| / max |b|) is above 1e-3 (fp32; 3e-2 for bf16/fp16) is written with ``error`` and no timing.
Impls that materialise the ``[B, Hq, Lq, Lk]`` scores (``reference``, ``sdpa_math``) are skipped (an
``error`` row) when the scores would take more than ``--max-scores-gb`` in fp32.

Modes: ``fwd`` under ``torch.no_grad()``; ``fwd+bwd``: the forward with autograd and
``torch.autograd.grad`` of the output for q, k and v against a fixed random upstream gradient.
Timing: warm-up, then ``reps`` timed calls (CUDA events on CUDA, ``time.perf_counter`` on CPU); ``reps``
adapts to a per-row budget (``--budget-s``). Median and 20th/80th percentiles in ms. Rows are appended
as JSON lines.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (Table, Timer, append_row, default_out, device_name, measure_row,  # noqa: E402
                      print_cpu_note, run_fields, setup_device, timing_settings, triton_version,
                      split_choices)
import torch.nn.functional as F

import mmts_fast
from mmts_fast import backend as _backend
from mmts_fast.kernels.gqa_attention import gqa_attention_reference

HERE = Path(__file__).resolve().parent
IMPLS = ("k3", "reference", "sdpa_math", "sdpa_flash", "sdpa_efficient")
CPU_IMPLS = ("k3", "reference", "sdpa_math")
MODES = ("fwd", "fwd+bwd")
MATERIALISE = ("reference", "sdpa_math")   # impls that hold the [B, Hq, Lq, Lk] scores

HQ, HKV, D = 9, 3, 64   # SmolLM2-135M
# Shape groups: lists of (shape name, B, Lq, Lk, causal).
SHAPES = {
    "full": [("smollm2", B, L, L, True) for B in (1, 2, 4, 8) for L in (128, 512, 1024, 2048, 4096)]
            + [("cross", 8, lq, lk, False) for lq in (7, 64, 862) for lk in (32, 128, 512)],
    "quick": [("smollm2", B, L, L, True) for B, L in ((1, 128), (1, 512), (4, 1024))]
             + [("cross", 8, lq, lk, False) for lq, lk in ((7, 128), (862, 128))],
    "tiny": [("smollm2", 1, 32, 32, True), ("cross", 2, 7, 16, False)],
    "cross": [("cross", 8, lq, lk, False) for lq in (7, 64, 862) for lk in (32, 128, 512)],
}

# Peak numbers (dense), by substring of torch.cuda.get_device_name(); the first match wins.
PEAKS = [
    ("H200", dict(fp32=67, tf32=495, bf16=989)),
    ("H100 PCIe", dict(fp32=51, tf32=378, bf16=756)),
    ("H100 NVL", dict(fp32=60, tf32=418, bf16=835)),
    ("H100", dict(fp32=67, tf32=495, bf16=989)),
    ("A100", dict(fp32=19.5, tf32=156, bf16=312)),
]


def device_peak(name: str, dtype: torch.dtype) -> float | None:
    for key, p in PEAKS:
        if key.lower() in name.lower():
            if dtype in (torch.bfloat16, torch.float16):
                return float(p["bf16"])
            return float(p["tf32"] if torch.backends.cuda.matmul.allow_tf32 else p["fp32"])
    return None


def model_flops(B: int, Lq: int, Lk: int, causal: bool, mode: str) -> float:
    fwd = 4 * B * HQ * Lq * Lk * D / (2 if causal else 1)
    return fwd if mode == "fwd" else 3.5 * fwd


# ---------------------------------------------------------------------------------------------
# Helpers (as in bench_expert_heads.py)
# ---------------------------------------------------------------------------------------------
def build_impl(impl: str, q: torch.Tensor, causal: bool):
    """Returns (fn(q, k, v) -> out, backend label)."""
    if impl == "k3":
        with mmts_fast.use_backend("auto"):
            label = _backend.resolve(q)

        def fn(q, k, v):
            with mmts_fast.use_backend("auto"):
                return mmts_fast.ops.gqa_attention(q, k, v, causal=causal)
        return fn, label
    if impl == "reference":
        return (lambda q, k, v: gqa_attention_reference(q, k, v, causal=causal)), "torch"
    if impl.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        which = {"sdpa_math": SDPBackend.MATH, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[impl]

        def fn(q, k, v):
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return fn, impl[5:]
    raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")


def make_step(mode, fn, q, k, v, dout):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        def step():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    return step


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
TABLE = Table([("impl", 14), ("backend", 9), ("mode", 7), ("shape", 8), ("B", 2), ("Lq", 5), ("Lk", 5),
               ("median_ms", 10), ("p20_ms", 9), ("p80_ms", 9), ("reps", 4), ("tflops", 8)],
              left=("impl", "backend", "mode", "shape"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few shapes of each group, fewer reps")
    p.add_argument("--out", default=None, help="JSON-lines file to append to "
                   "(default bench/results/gqa_attention_<device>.jsonl)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--impls", default=None, help="comma-separated subset of " + ",".join(IMPLS)
                   + " (default: all on CUDA, " + ",".join(CPU_IMPLS) + " on CPU)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--budget-s", type=float, default=None,
                   help="target timed seconds per row (default 4 on CPU, 1 on CUDA; quick: a quarter)")
    p.add_argument("--reps", type=int, default=None, help="fixed number of timed reps (overrides the budget)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--max-scores-gb", type=float, default=None,
                   help="skip reference/sdpa_math rows whose fp32 scores exceed this (default: 1/8 of the "
                        "GPU's memory on CUDA, 2 on CPU)")
    p.add_argument("--shapes", default=None, choices=sorted(SHAPES),
                   help="shape group: full (default), quick (--quick), cross (cross-attention only), tiny")
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = "quick" if args.quick else "full"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.impls is None:
        args.impls = ",".join(IMPLS if args.device == "cuda" else CPU_IMPLS)
    args.impls = split_choices(p, args.impls, IMPLS, "impl")
    args.modes = split_choices(p, args.modes, MODES, "mode")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = setup_device(args)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    tiny, quick = args.shapes == "tiny", args.shapes == "quick"
    timing = timing_settings(args, cuda, tiny, quick)
    budget_s = timing["budget_s"]
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    if args.max_scores_gb is not None:
        max_scores = args.max_scores_gb * 1e9
    else:
        max_scores = torch.cuda.get_device_properties(device).total_memory / 8 if cuda else 2e9
    triton_v = triton_version()
    dev_name = device_name(device)
    peak = device_peak(dev_name, dtype) if cuda else None
    out = Path(args.out) if args.out else default_out("gqa_attention", device, quick=args.shapes != "full")
    out.parent.mkdir(parents=True, exist_ok=True)

    configs = SHAPES[args.shapes]
    n_rows = len(configs) * len(args.impls) * len(args.modes)
    print(f"# gqa_attention bench: {dev_name}, {args.dtype}, torch {torch.__version__}, triton {triton_v}, "
          f"Hq={HQ} Hkv={HKV} D={D}, {n_rows} rows, budget {budget_s:g}s/row -> {out}", flush=True)
    print_cpu_note(cuda)
    TABLE.header()

    rows, i = [], 0
    t_start = time.perf_counter()
    for shape, B, Lq, Lk, causal in configs:
        assert not causal or Lq == Lk, "causal rows need Lq == Lk (top-left == bottom-right alignment)"
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
                   for h, L in ((HQ, Lq), (HKV, Lk), (HKV, Lk)))
        dout = torch.randn(B, HQ, Lq, D, generator=g).to(device=device, dtype=dtype)
        timer = Timer(device)
        with torch.no_grad(), mmts_fast.use_backend("auto"):
            out_k3 = mmts_fast.ops.gqa_attention(q, k, v, causal=causal)
        scores_bytes = 4 * B * HQ * Lq * Lk
        rel_errs = {}
        for impl in args.impls:
            err, fn, label = None, None, None
            try:
                fn, label = build_impl(impl, q, causal)
                if impl in MATERIALISE and scores_bytes > max_scores:
                    raise RuntimeError(f"skipped: fp32 scores take {scores_bytes / 1e9:.1f} GB > "
                                       f"--max-scores-gb {max_scores / 1e9:.1f}")
            except Exception as e:  # noqa: BLE001 - record, don't crash
                err = f"{type(e).__name__}: {e}"
            for mode in args.modes:
                i += 1
                row = {
                    "bench": "gqa_attention", "impl": impl, "backend": label, "mode": mode,
                    "device": dev_name, "device_type": device.type, "dtype": args.dtype, "shape": shape,
                    "B": B, "Hq": HQ, "Hkv": HKV, "Lq": Lq, "Lk": Lk, "D": D, "causal": causal,
                    "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0,
                    "model_flops": model_flops(B, Lq, Lk, causal, mode), "tflops": None,
                    **run_fields(triton_v),
                }
                if err is None:
                    measure_row(row, make_step(mode, fn, q, k, v, dout), timer, timing,
                                cost=(None, row["model_flops"]), peaks=(None, peak), ours="k3", expected=out_k3,
                                output=partial(fn, q, k, v), rel_errs=rel_errs, tol=tol,
                                quiet=impl not in CPU_IMPLS)
                else:
                    row["error"] = err[:2000]
                append_row(out, row)
                rows.append(row)
                TABLE.row(row, i, n_rows)
        del q, k, v, dout, out_k3
        if cuda:
            torch.cuda.empty_cache()
    print(f"# done: {len(rows)} rows in {time.perf_counter() - t_start:.0f}s -> {out}", flush=True)
    return rows


if __name__ == "__main__":
    main()
