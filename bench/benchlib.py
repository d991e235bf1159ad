"""Helpers shared by the benchmark scripts: device names, timing, simple statistics, measuring rows."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """Short device name for result files: cpu, h200, h100, a100, else the GPU's name slugged."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((t for t in ("h200", "h100", "a100") if t in name), re.sub(r"[^a-z0-9]+", "-", name).strip("-"))


def default_out(bench: str, device, quick: bool = False) -> Path:
    """Where a bench appends its rows without ``--out``: ``bench/results/<bench>_<device>.jsonl`` (the
    committed results, whatever the working directory); a quick or tiny run (few reps, small shapes) goes to
    ``runs/bench/<bench>_<device>_quick.jsonl`` instead (not tracked), so it never mixes into those."""
    tag = device_tag(device)
    if quick:
        return HERE.parent / "runs" / "bench" / f"{bench}_{tag}_quick.jsonl"
    return HERE / "results" / f"{bench}_{tag}.jsonl"


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile, q in [0, 100]."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        """Wall time of one call in ms (CUDA events on CUDA)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def time_step(step, timer, *, warmup, budget_s, min_reps, max_reps, fixed_reps=None):
    """Warm up, choose reps from the budget and the warm-up's last call, time. Returns (times_ms, reps)."""
    last = 0.0
    for _ in range(max(1, warmup)):
        last = timer.once(step)
    if fixed_reps:
        reps = fixed_reps
    else:
        reps = int(budget_s * 1e3 / max(last, 1e-3))
        reps = max(min_reps, min(max_reps, reps))
    times = [timer.once(step) for _ in range(reps)]
    return times, reps


def split_choices(parser, text: str, allowed, what: str) -> list[str]:
    """A comma-separated command-line subset, each item checked against ``allowed``."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    for s in items:
        if s not in allowed:
            parser.error(f"unknown {what} {s!r}; choose from {', '.join(allowed)}")
    return items


def setup_device(args) -> torch.device:
    """Applies ``--threads`` and checks that a requested CUDA device exists."""
    if args.threads is not None and args.threads < 0:
        raise SystemExit(f"--threads must be >= 0 (0: leave as is), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmts_fast.train import resolve_device   # the package's own check (unknown name, no CUDA)
    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None


def time_stats(times: list[float]) -> dict:
    """Median and 20th/80th percentiles of timings in ms."""
    return dict(median_ms=percentile(times, 50), p20_ms=percentile(times, 20), p80_ms=percentile(times, 80))


def measure_row(row: dict, step, timer: Timer, timing: dict, *, cost: tuple, peaks: tuple, ours: str,
                expected: torch.Tensor, output, rel_errs: dict, tol: float, compiled: bool = False,
                quiet: bool = False) -> None:
    """Measures one (impl, mode) row of a kernel benchmark; fills ``row`` in place, never raises.

    step: the call to time. timing: warmup, budget_s, min_reps, max_reps, fixed_reps for ``time_step``.
    compiled: the first call compiles (torch.compile); its wall time goes into ``compile_s``.
    output: () -> this impl's output, compared once per impl (the result kept in ``rel_errs``, keyed by
        impl) against ``expected``, the output of our kernel ``ours``, into ``rel_err_vs_<ours>``; above
        ``tol`` the row fails. None: not compared (an impl that computes something else).
    cost: (model bytes, model flops) -> ``gbps``, ``tflops``; bytes None where only flops are modelled.
    peaks: (peak GB/s, peak TFLOP/s), recorded with the fractions of them on CUDA.
    A failure is recorded in ``row["error"]``; one that is not expected (not a mismatch against ours,
    not a ``quiet`` impl) is also printed to stderr.
    """
    try:
        if compiled:
            t0 = time.perf_counter()
            step()          # compile for this shape and grad mode
            timer.sync()
            row["compile_s"] = round(time.perf_counter() - t0, 2)
        if output is not None:
            impl = row["impl"]
            if impl not in rel_errs:    # once per impl, outside timing
                with torch.no_grad():
                    rel_errs[impl] = rel_err(output(), expected)
            check = row[f"rel_err_vs_{ours}"] = rel_errs[impl]
            if check > tol:
                raise RuntimeError(f"output differs from {ours}: rel err {check:.2e} > {tol:g}")
        times, reps = time_step(step, timer, **timing)
        row.update(time_stats(times))
        row.update(reps=reps, warmup=timing["warmup"])
        nbytes, flops = cost
        sec = row["median_ms"] * 1e-3
        # two updates each below, so the keys keep the order of the rows in bench/results/
        if nbytes is not None:
            row.update(model_bytes=nbytes, model_flops=flops, gbps=nbytes / sec / 1e9)
        row.update(model_flops=flops, tflops=flops / sec / 1e12)
        if timer.cuda:
            peak_gbps, peak_tflops = peaks
            if nbytes is not None:
                row.update(peak_gbps=peak_gbps, peak_tflops=peak_tflops,
                           frac_peak_bw=row["gbps"] / peak_gbps if peak_gbps else None)
            row.update(peak_tflops=peak_tflops, frac_peak_flops=row["tflops"] / peak_tflops if peak_tflops else None)
    except Exception as e:  # noqa: BLE001 - a failed row is data, not a crash
        msg = f"{type(e).__name__}: {e}"
        row["error"] = msg[:2000]
        if not quiet and f"differs from {ours}" not in msg:
            print(f"# unexpected failure in {row['impl']}: {msg.splitlines()[0]}", file=sys.stderr)


def append_row(out, row: dict) -> None:
    """Appends ``row`` as one JSON line to the file ``out``."""
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


class Table:
    """Console table of benchmark rows: ``cols`` = [(row key, width)], ``left`` = keys aligned left;
    lists print comma-joined, floats with 3 decimals. The last column lists errors, throughput on CUDA
    and compile time."""

    def __init__(self, cols, left):
        self.cols, self.left = list(cols), set(left)

    def _cell(self, row, key, width):
        v = row.get(key)
        if isinstance(v, list):
            v = ",".join(str(w) for w in v)
        elif isinstance(v, float):
            v = f"{v:.3f}"
        s = "-" if v is None else str(v)
        return s[:width].ljust(width) if key in self.left else s[:width].rjust(width)

    def header(self):
        print("          " + " ".join(self._cell({k: k}, k, w) for k, w in self.cols) + "  extra", flush=True)

    def row(self, row, i, n):
        extra = []
        if row.get("error"):
            extra.append("ERROR: " + row["error"].splitlines()[0][:80])
        if row.get("gbps") is not None and row.get("device_type") == "cuda":
            extra.append(f"{row['gbps']:.0f} GB/s {row['tflops']:.2f} TFLOP/s")
        if row.get("compile_s") is not None:
            extra.append(f"compile {row['compile_s']:.1f}s")
        print(f"[{i:3d}/{n}] " + " ".join(self._cell(row, k, w) for k, w in self.cols) + "  " + "; ".join(extra),
              flush=True)


def timing_settings(args, cuda: bool, tiny: bool, quick: bool) -> dict:
    """Keyword arguments for :func:`time_step` / :func:`measure_row` from the common command-line options
    (``--budget-s``, ``--reps``) and the shape group: warm-up, per-row time budget and rep bounds."""
    budget_s = args.budget_s if args.budget_s is not None else (1.0 if cuda else 4.0) * (0.25 if quick else 1.0)
    return dict(warmup=1 if tiny else (10 if cuda else 2), budget_s=budget_s, min_reps=3 if quick else 5,
                max_reps=(50 if quick else 200) if cuda else (10 if quick else 30),
                fixed_reps=args.reps if args.reps else (2 if tiny else None))


def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def print_cpu_note(cuda: bool) -> None:
    """On CPU, say how many cores/threads there are and how loaded the machine is."""
    if not cuda:
        print(f"# CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
              f"load average {os.getloadavg()[0]:.2f} (other processes may share the cores)", flush=True)


def compile_static(fn):
    """``torch.compile(fn, dynamic=False)`` with dynamo's recompile limit raised: one graph per shape."""
    for k in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, k):
            setattr(torch._dynamo.config, k, max(getattr(torch._dynamo.config, k), 256))
    return torch.compile(fn, dynamic=False)


def run_fields(triton_v) -> dict:
    """The fields every benchmark row ends with: threads, 1-minute load average, UTC time, versions."""
    return {"threads": torch.get_num_threads(),
            "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton_v}
