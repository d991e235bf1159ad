#!/usr/bin/env python
"""Render benchmark rows (JSON lines) as markdown.

    python bench/render.py bench/results/expert_heads_cpu.jsonl > bench/results/expert_heads_cpu.md
    python bench/render.py bench/results/lora_mixture_cpu.jsonl > bench/results/lora_mixture_cpu.md
    python bench/render.py bench/results/gqa_attention_cpu.jsonl > bench/results/gqa_attention_cpu.md

Each file holds one benchmark (the rows' ``bench`` field: expert_heads, lora_mixture, gqa_attention).
expert_heads: one table per (device, dtype, shape group); one line per (H, windows, mode) with the
median ms of each impl and the speedup of k1 over each other impl (their median / k1's median: > 1
means k1 is faster). lora_mixture / gqa_attention: the same layout keyed by their shape fields, with
the speedup of k2 / k3. When a key appears more than once, only the latest row counts (by ``date``,
then by position in the files, later files last).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

IMPLS = ("k1", "reference", "compiled_reference", "per_expert_loop")
MODES = ("fwd", "fwd+bwd")


def load(paths) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"warning: {p}:{n}: skipped, not JSON ({e})", file=sys.stderr)
                    continue
                rows.append(row)
    return rows


def shape_group(r: dict) -> str:
    return r.get("shape") or f"B={r['B']} L={r['L']} C={r['C']}"


def latest(rows: list[dict]) -> list[dict]:
    """Keep the latest row per key (ISO dates sort as strings; ties: the later line wins)."""
    best = {}
    for pos, r in enumerate(rows):
        key = (r.get("device"), r.get("dtype"), shape_group(r), r["B"], r["L"], r["C"], r["H"], r["M"],
               tuple(r["windows"]), r["impl"], r["mode"])
        rank = (r.get("date") or "", pos)
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, r)
    return [r for _, r in sorted(best.values(), key=lambda t: t[0][1])]


def _ms(r) -> str:
    if r is None:
        return "-"
    if r.get("error") or r.get("median_ms") is None:
        return "error"
    m = r["median_ms"]
    return f"{m:.3f}" if m < 10 else f"{m:.1f}" if m < 1000 else f"{m:.0f}"


def _ratio(other, k1) -> str:
    if not other or not k1 or other.get("median_ms") is None or k1.get("median_ms") is None:
        return "-"
    return f"{other['median_ms'] / k1['median_ms']:.2f}x"


def render(rows: list[dict]) -> str:
    rows = latest(rows)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("device"), r.get("dtype"), shape_group(r)), []).append(r)
    out = ["# expert_heads (K1) benchmark", "",
           "Median wall time in ms per call; `k1 vs X` = X's median / k1's median (> 1: k1 is faster).",
           "`fwd` runs under `torch.no_grad()`; `fwd+bwd` is the forward plus `torch.autograd.grad` for "
           "x, weights, biases and gates.", ""]
    for (device, dtype, shape), grp in groups.items():
        impls = [i for i in IMPLS if any(r["impl"] == i for r in grp)]
        impls += sorted({r["impl"] for r in grp} - set(impls))
        k1_backends = sorted({r.get("backend") or "?" for r in grp if r["impl"] == "k1"})
        r0 = grp[0]
        dates = sorted(r.get("date") or "" for r in grp)
        out.append(f"## {shape} (B={r0['B']}, L={r0['L']}, C={r0['C']}, M={r0['M']}) - {device} - {dtype}")
        out.append("")
        meta = [f"k1 backend: {', '.join(k1_backends) or 'n/a'}",
                f"torch {r0.get('torch')}, triton {r0.get('triton')}",
                f"runs {dates[0][:16]} .. {dates[-1][:16]}"]
        loads = [r["loadavg"] for r in grp if r.get("loadavg") is not None]
        if loads:
            meta.append(f"load average {min(loads):.1f}-{max(loads):.1f}")
        out.append("; ".join(meta))
        out.append("")
        others = [i for i in impls if i != "k1"]
        head = ["H", "windows", "mode"] + [f"{i} ms" for i in impls]
        if "k1" in impls:
            head += [f"k1 vs {i}" for i in others]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---:", ":---", ":---"] + ["---:"] * (len(head) - 3)) + "|")
        by = {}
        for r in grp:
            by[(r["H"], tuple(r["windows"]), r["mode"], r["impl"])] = r
        lines = sorted({(r["H"], tuple(r["windows"]), r.get("window_set", ""), r["mode"]) for r in grp},
                       key=lambda t: (t[0], t[2] != "mole", t[1], MODES.index(t[3]) if t[3] in MODES else 9))
        errors = []
        for H, win, wset, mode in lines:
            cells = [str(H), (f"{wset} " if wset else "") + ",".join(map(str, win)), mode]
            for i in impls:
                r = by.get((H, win, mode, i))
                cells.append(_ms(r))
                if r is not None and r.get("error"):
                    errors.append(f"- {i}, H={H}, windows={','.join(map(str, win))}, {mode}: "
                                  f"{r['error'].splitlines()[0][:200]}")
            if "k1" in impls:
                k1 = by.get((H, win, mode, "k1"))
                cells += [_ratio(by.get((H, win, mode, i)), k1) for i in others]
            out.append("| " + " | ".join(cells) + " |")
        if any(r.get("device_type") == "cuda" and r.get("tflops") is not None for r in grp if r["impl"] == "k1"):
            out.append("")
            out.append("k1 throughput (model bytes / FLOPs, see bench_expert_heads.py):")
            out.append("")
            out.append("| H | windows | mode | GB/s | TFLOP/s | % peak BW | % peak FLOP/s |")
            out.append("|---:|:---|:---|---:|---:|---:|---:|")
            for H, win, wset, mode in lines:
                r = by.get((H, win, mode, "k1"))
                if not r or r.get("tflops") is None:
                    continue
                pb = f"{100 * r['frac_peak_bw']:.1f}" if r.get("frac_peak_bw") is not None else "-"
                pf = f"{100 * r['frac_peak_flops']:.1f}" if r.get("frac_peak_flops") is not None else "-"
                out.append(f"| {H} | {','.join(map(str, win))} | {mode} | {r['gbps']:.0f} | "
                           f"{r['tflops']:.2f} | {pb} | {pf} |")
        if errors:
            out.append("")
            out.append("Errors:")
            out.append("")
            out.extend(errors)
        out.append("")
    return "\n".join(out)


# Other benchmarks: (our impl, the fields that key a table line, a title).
GENERIC = {
    "lora_mixture": ("k2", ("d", "T"), "K2 grouped LoRA mixture (M=8, top-2, r=16)"),
    "gqa_attention": ("k3", ("shape", "B", "Hq", "Hkv", "Lq", "Lk", "D", "causal"), "K3 grouped-query attention"),
}


def render_generic(rows: list[dict], bench: str) -> str:
    ours, keys, title = GENERIC[bench]
    best = {}
    for pos, r in enumerate(rows):
        key = (r.get("device"), r.get("dtype"), *(r.get(k) for k in keys), r["impl"], r["mode"])
        if key not in best or (r.get("date") or "", pos) >= best[key][0]:
            best[key] = ((r.get("date") or "", pos), r)
    rows = [r for _, r in sorted(best.values(), key=lambda t: t[0][1])]
    out = [f"# {title} benchmark", "",
           f"Median wall time in ms per call; `{ours} vs X` = X's median / {ours}'s median (> 1: {ours} is faster).",
           "`fwd` under `torch.no_grad()`; `fwd+bwd` = forward + `torch.autograd.grad` (see the script's docstring).",
           ""]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("device"), r.get("dtype")), []).append(r)
    for (device, dtype), grp in groups.items():
        impls = list(dict.fromkeys([ours] + [r["impl"] for r in grp]))
        others = [i for i in impls if i != ours]
        dates = sorted(r.get("date") or "" for r in grp)
        loads = [r["loadavg"] for r in grp if r.get("loadavg") is not None]
        out += [f"## {device} - {dtype}", "",
                f"{ours} backend: {', '.join(sorted({r.get('backend') or '?' for r in grp if r['impl'] == ours}))}; "
                f"torch {grp[0].get('torch')}; runs {dates[0][:16]} .. {dates[-1][:16]}"
                + (f"; load average {min(loads):.1f}-{max(loads):.1f}" if loads else ""), ""]
        head = [*keys, "mode", *(f"{i} ms" for i in impls), *(f"{ours} vs {i}" for i in others)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---:"] * len(head)) + "|")
        by = {(tuple(r.get(k) for k in keys), r["mode"], r["impl"]): r for r in grp}
        lines = list(dict.fromkeys((tuple(r.get(k) for k in keys), r["mode"]) for r in grp))
        for kv, mode in lines:
            mine = by.get((kv, mode, ours))
            cells = [str(v) for v in kv] + [mode] + [_ms(by.get((kv, mode, i))) for i in impls]
            cells += [_ratio(by.get((kv, mode, i)), mine) for i in others]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    for p in argv:
        if not Path(p).exists():
            raise SystemExit(f"no such file: {p}")
    rows = load(argv)
    kinds = {r.get("bench") or ("expert_heads" if "impl" in r else "unknown") for r in rows}
    other = sorted(k for k in kinds if k != "expert_heads" and k not in GENERIC)
    if other:
        raise SystemExit(f"render.py renders the kernel benchmarks (expert_heads, {', '.join(GENERIC)}); "
                         f"{', '.join(argv)} holds other rows ({', '.join(other)}): bench/README.md reports "
                         f"those in its text")
    if len(kinds) > 1:
        raise SystemExit(f"rows of several benchmarks ({', '.join(sorted(kinds))}): render one at a time")
    kind = kinds.pop() if kinds else "expert_heads"
    text = render_generic(rows, kind) if kind in GENERIC else render(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
