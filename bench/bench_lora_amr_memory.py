#!/usr/bin/env python
"""Saved-activation memory of LoRA vs LoRA-AMR (SPEC 1.6) in a :class:`~mmts_fast.nn.lora.LoRAMixtureLinear`.

    python bench/bench_lora_amr_memory.py [--tokens 256,4096] [--d 576] [--rank 16] [--experts 1,8]
                                          [--top-n 2] [--bases dense,nf4] [--backends torch]
                                          [--out bench/results/lora_amr_memory_cpu.jsonl] [--append]

What is measured: every tensor that autograd saves for backward during ONE forward of the layer
(``torch.autograd.graph.saved_tensors_hooks``; nothing is timed). Each saved tensor is attributed to

* ``param``: storage shared with a parameter or buffer of the module (W, bias, A, B, C, D, NF4 state):
  these exist anyway, saving them costs nothing;
* ``input``: storage shared with the layer input x (kept alive by the layer; in a network it is often
  also saved by the previous op, so it may or may not be extra memory);
* ``activation``: everything else, i.e. memory that exists only because of this layer's backward.

Bytes count each storage once (``untyped_storage().nbytes()``, so a saved view keeps its whole storage).
The headline column is ``kept_bytes`` = input + activation: what this layer keeps alive until backward.
Plain LoRA must keep x (``T * d_in``) for dA; LoRA-AMR keeps ``z = D x`` (``T * r'``, r' = r // 2) instead.

Setup: ``d_in = d_out = d`` (576 = SmolLM2-135M), rank r (r' = r // 2 for AMR), fp32, x ``[T, d]`` with
``requires_grad=True`` (a layer inside a network). M = 1: gate 1 for every token. M > 1: top-n experts per
token (random logits, softmax over the selected). Base: a frozen dense ``nn.Linear`` or a bitsandbytes NF4
``Linear4bit`` (``--bases``). Backend: ``torch`` (the eager reference; default, what runs on CPU) or
``triton`` (the kernels; on CPU only under ``TRITON_INTERPRET=1`` and slow: small T only).

One JSON line per (backend, base, M, T, variant); a table is printed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

import mmts_fast
from mmts_fast.nn.lora import LoRAMixtureLinear

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "lora_amr_memory_cpu.jsonl"


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _module_storages(mod: nn.Module) -> set[int]:
    """Storage pointers of the module's parameters, buffers and NF4 quantisation state."""
    ptrs = set()
    for t in list(mod.parameters()) + list(mod.buffers()):
        ptrs.add(_storage(t)[0])
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for q in (qs.absmax, qs.code, getattr(getattr(qs, "state2", None), "absmax", None),
                      getattr(getattr(qs, "state2", None), "code", None), qs.offset):
                if torch.is_tensor(q):
                    ptrs.add(_storage(q)[0])
    return ptrs


def saved_tensor_bytes(mod: nn.Module, x: torch.Tensor, gates: torch.Tensor | None) -> dict:
    """Run one forward under saved_tensors_hooks and attribute the saved storages (module docstring)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(x, gates)
    own, xptr = _module_storages(mod), _storage(x)[0]
    seen: dict[int, tuple[str, int]] = {}
    for t in saved:
        ptr, nbytes = _storage(t)
        if ptr in seen or nbytes == 0:
            continue
        kind = "param" if ptr in own else "input" if ptr == xptr else "activation"
        seen[ptr] = (kind, nbytes)
    out = {f"{k}_bytes": sum(b for kk, b in seen.values() if kk == k) for k in ("param", "input", "activation")}
    out["kept_bytes"] = out["input_bytes"] + out["activation_bytes"]
    out["n_saved"] = len(saved)
    out["n_saved_storages"] = len(seen)
    y.sum().backward()            # the graph is complete and differentiable (sanity; frees the saved tensors)
    return out


def make_module(base_kind: str, d: int, rank: int, n_exp: int, amr: bool, seed: int) -> LoRAMixtureLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(d, d)
    if base_kind == "nf4":
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(d, d, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        lin = q.to("cpu")                                   # quantises
    mod = LoRAMixtureLinear(lin, n_experts=n_exp, rank=rank, alpha=2 * rank, amr=amr)
    with torch.no_grad():                                   # nonzero deltas (as after some training)
        if amr:
            mod.lora_C.normal_(std=0.1)
        else:
            mod.lora_B.normal_(std=0.1)
    return mod


def make_gates(T: int, n_exp: int, top_n: int, seed: int) -> torch.Tensor | None:
    if n_exp == 1:
        return None                                         # gate 1 for every token
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, n_exp, generator=g)
    idx = logits.topk(min(top_n, n_exp), dim=1).indices
    return torch.zeros(T, n_exp).scatter(1, idx, torch.softmax(logits.gather(1, idx), 1))


def _kib(b: int) -> str:
    return f"{b / 1024:,.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| backend | base | M | top-n | tokens | variant | input KiB | activation KiB | kept KiB "
             "| params saved KiB | kept vs LoRA |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    ref = {}
    for r in rows:
        if r["variant"] == "lora":
            ref[(r["backend"], r["base"], r["M"], r["tokens"])] = r["kept_bytes"]
    for r in rows:
        base = ref.get((r["backend"], r["base"], r["M"], r["tokens"]))
        ratio = f"{r['kept_bytes'] / base:.3f}" if base else "-"
        lines.append(f"| {r['backend']} | {r['base']} | {r['M']} | {r['top_n']} | {r['tokens']} | {r['variant']} | "
                     f"{_kib(r['input_bytes'])} | {_kib(r['activation_bytes'])} | {_kib(r['kept_bytes'])} | "
                     f"{_kib(r['param_bytes'])} | {ratio} |")
    return "\n".join(lines)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="256,4096")
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--experts", default="1,8")
    ap.add_argument("--top-n", type=int, default=2)
    ap.add_argument("--bases", default="dense,nf4")
    ap.add_argument("--backends", default="torch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    bases = [b for b in args.bases.split(",") if b]
    if "nf4" in bases:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("bitsandbytes missing: skipping the nf4 base", file=sys.stderr)
            bases.remove("nf4")
    rows = []
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for backend in [b for b in args.backends.split(",") if b]:
        for base in bases:
            for n_exp in _ints(args.experts):
                for T in _ints(args.tokens):
                    gates = make_gates(T, n_exp, args.top_n, seed=T)
                    for variant in ("lora", "amr"):
                        mod = make_module(base, args.d, args.rank, n_exp, variant == "amr", seed=0)
                        x = torch.randn(T, args.d, generator=torch.Generator().manual_seed(1), requires_grad=True)
                        with mmts_fast.use_backend(backend):
                            stats = saved_tensor_bytes(mod, x, gates)
                        row = dict(bench="lora_amr_memory", backend=backend, base=base, variant=variant,
                                   tokens=T, d_in=args.d, d_out=args.d, r=args.rank,
                                   r_inner=args.rank // 2 if variant == "amr" else None, M=n_exp,
                                   top_n=min(args.top_n, n_exp), dtype="float32", x_requires_grad=True,
                                   x_bytes=x.numel() * x.element_size(), **stats, date=date,
                                   torch=torch.__version__, device="cpu", python=platform.python_version())
                        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a" if args.append else "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(table(rows))
    print(f"\n{len(rows)} rows -> {out}")
    return rows


if __name__ == "__main__":
    main()
