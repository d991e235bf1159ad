"""Model-level benchmarks (issue: text conditioning).

    python bench/bench_models.py [--device cpu|cuda] [--out bench/results/models_<device>.jsonl] [--quick]
                                 [--threads N] [--batch-sizes B ...] [--cold-cache ETTh1.csv]

- ``train_step``: one optimiser step (forward, MSE backward, Adam) of RLinearMoLE and LeMoLE at the
  same shapes, the models interleaved (rounds of one warm-up and 5 timed steps of each in turn) so that
  machine drift cancels in the ratios, LeMoLE fed precomputed (cached) text embeddings, so the ratio is the cost of the text
  branches alone (the LLM never runs per batch). The per-step timestamp embeddings come from a table of
  ``T=8640`` rows (ETTh1's training rows) read by B windows at random starts, as in training:
  ``dynamic="table"`` passes what the training loop passes (the rows the batch spans + each step's row);
  ``dynamic="per_window"`` passes ``[B, L, d]`` gathered beforehand (the gather, which the loader would
  have to do each batch, is not timed). ``lemole_static`` has the static prompt only (``--no-dynamic-prompt``,
  the form that meets the accuracy target on ETTh1), ``lemole_no_text`` both text branches off.
  Each row also counts the step's floating-point work (forward + backward, matmuls and convolutions, by
  ``torch.utils.flop_counter`` on the eager reference path with the same shapes): ``gflop`` and
  ``flop_ratio_vs_rlinear_mole``, the ratio any implementation of these computations pays where matmuls
  bound the time. LeMoLE rows add ``gflop_floor``: the same step without the work an implementation
  could skip, the off-window weights of its experts (K1's eager path multiplies them by zero; its
  Triton kernel skips those tiles) and the projection of table rows no window reads, and its ratio
  ``floor_flop_ratio_vs_rlinear_mole``.
- ``mome_throughput``: MoME inference samples/s, batched vs one sample at a time (the public code's
  batch-size-1 limitation).
- ``lemole_first_epoch`` (with ``--cold-cache CSV``): LeMoLE's first training epoch (L=512, H=96, batch 8,
  MiniLM) with an empty embedding cache (every static and per-step timestamp prompt of the file is
  encoded once, then cached), and the same with the cache now warm: the seconds spent getting the text
  inputs (``text_s``) and the epoch itself (``epoch_s``), timed separately.
Rows are JSON lines with device, shapes and medians, also printed as they are measured.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Timer, append_row, default_out, device_name, setup_device, time_step  # noqa: E402

from mmts_fast import use_backend
from mmts_fast.models import LeMoLE, LeMoLEConfig, MoME, MoMEConfig, RLinearMoLE, RLinearMoLEConfig


def timeit(fn, device: str, reps: int, warmup: int = 3) -> list[float]:   # one model at a time
    """``reps`` timed calls in ms after ``warmup`` calls (benchlib's timer: CUDA events on CUDA)."""
    return time_step(fn, Timer(torch.device(device)), warmup=warmup, budget_s=0, min_reps=reps, max_reps=reps,
                     fixed_reps=reps)[0]


BLOCK = 5           # timed steps per model and round (train_step)
TABLE_ROWS = 8640   # ETTh1's training rows: the timestamp embeddings a LeMoLE batch reads from


def train_step_rows(device, B, L, H, C, d_llm, reps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, C, generator=g).to(device)
    xm = (torch.rand(B, L, 4, generator=g) - 0.5).to(device)
    y = torch.randn(B, H, C, generator=g).to(device)
    table = torch.randn(TABLE_ROWS, d_llm, generator=g)
    index = torch.randint(0, TABLE_ROWS - L + 1, (B, 1), generator=g) + torch.arange(L)    # [B, L] rows
    lo, hi = int(index.min()), int(index.max())
    static = torch.randn(d_llm, generator=g).to(device)
    shared = {"static_emb": static, "dynamic_table": table[lo:hi + 1].to(device), "dynamic_index": (index - lo).to(device)}
    per_window = {"static_emb": static, "dynamic_emb": table[index].to(device)}
    def lemole(**options):
        return lambda: LeMoLE(LeMoLEConfig(lookback=L, horizon=H, channels=C, d_llm=d_llm, **options))

    models = [   # (name, how the dynamic prompts are fed, builder, text inputs)
        ("rlinear_mole", None, lambda: RLinearMoLE(RLinearMoLEConfig(lookback=L, horizon=H, channels=C, n_experts=4)), {}),
        ("lemole", "table", lemole(), shared),
        ("lemole", "per_window", lemole(), per_window),
        ("lemole_static", None, lemole(use_dynamic=False), {"static_emb": static}),   # --no-dynamic-prompt
        ("lemole_no_text", None, lemole(use_static=False, use_dynamic=False), {}),
    ]
    steps, rows = [], []
    for (name, dynamic, build, kw), fused in ((item, f) for item in models for f in (False, True)):
        torch.manual_seed(0)
        model = build()
        model.train()
        flops, projected = step_flops(model, x, xm, y, kw)
        model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)   # fused: --fused-optimizer

        def step(model=model, opt=opt, kw=kw):
            loss = torch.nn.functional.mse_loss(model(x, xm, **kw), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps.append(step)
        rows.append(dict(bench="train_step", model=name, fused_adam=fused, B=B, L=L, H=H, C=C, d_llm=d_llm,
                         reps=max(1, -(-reps // BLOCK)) * BLOCK, interleaved_block=BLOCK, gflop=flops / 1e9,
                         **({"gflop_floor": lemole_flop_floor(model, flops, projected, B, C, index)} if name != "rlinear_mole" else {}),
                         **({"dynamic": dynamic, "table_rows": TABLE_ROWS, "span_rows": hi - lo + 1} if dynamic else {})))
    # Interleaved in blocks: each round runs every model in turn, one untimed step (its caches warm again,
    # as in training, where one model runs step after step) then BLOCK timed ones, so that drifts of the
    # machine's speed (10-15% here between runs) hit every model alike and the ratios stay meaningful.
    timer = Timer(torch.device(device))
    times = [[] for _ in steps]
    for _ in range(max(1, -(-reps // BLOCK))):
        for t, step in zip(times, steps):
            timer.once(step)
            t.extend(timer.once(step) for _ in range(BLOCK))
    for row, t in zip(rows, times):
        row["median_ms"] = statistics.median(t)
    for r in rows:   # against RLinear-MoLE with the same optimiser
        base = next(b for b in rows if b["model"] == "rlinear_mole" and b["fused_adam"] == r["fused_adam"])
        r["ratio_vs_rlinear_mole"] = r["median_ms"] / base["median_ms"]
        r["flop_ratio_vs_rlinear_mole"] = r["gflop"] / base["gflop"]
        if "gflop_floor" in r:   # RLinear-MoLE's experts all read every step: nothing to skip
            r["floor_flop_ratio_vs_rlinear_mole"] = r["gflop_floor"] / base["gflop"]
    return rows


def step_flops(model, x, xm, y, kw) -> tuple[int, int]:
    """FLOPs of one forward + MSE backward on the CPU's eager reference path (the optimiser's elementwise
    update is not counted), and how many timestamp rows LeMoLE's ``Linear(d_llm -> 2C)`` projected (0
    without the dynamic branch). Inputs on another device are copied; the model is left as it was."""
    cpu = {k: v.cpu() for k, v in kw.items()}
    proj = getattr(model, "dynamic_proj", None)
    rows = []
    hook = proj.register_forward_hook(lambda mod, args, out: rows.append(args[0].numel() // args[0].shape[-1])) \
        if proj is not None else None
    try:
        with use_backend("torch"), FlopCounterMode(display=False) as counter:
            torch.nn.functional.mse_loss(model(x.cpu(), xm.cpu(), **cpu), y.cpu()).backward()
    finally:
        if hook is not None:
            hook.remove()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), sum(rows)


def lemole_flop_floor(model, flops: int, projected: int, B: int, C: int, index) -> float:
    """GFLOPs of LeMoLE's step less the work an implementation may skip: the experts' weights left of
    their windows (K1's eager path computes ``[N, L] x [L, M*H]`` with those weights zeroed: forward,
    weight and input gradients, 3 x 2 x N*H*(M*L - sum w) FLOPs) and the projection of timestamp rows
    beyond the distinct rows the batch reads (forward and weight gradient, 2 x 2 x rows x d_llm x 2C)."""
    cfg = model.config
    skip = 3 * 2 * B * C * cfg.horizon * (cfg.n_experts * cfg.lookback - sum(cfg.windows))
    if projected:
        skip += 2 * 2 * (projected - int(torch.unique(index).numel())) * cfg.d_llm * 2 * C
    return (flops - skip) / 1e9


@torch.no_grad()
def mome_rows(device, B, L, H, C, d_llm, reps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, C, generator=g).to(device)
    th = torch.randn(B, 24, d_llm, generator=g).to(device)
    tm = torch.ones(B, 24, dtype=torch.bool, device=device)
    model = MoME(MoMEConfig(lookback=L, horizon=H, channels=C, d_llm=d_llm)).to(device).eval()
    batched = statistics.median(timeit(lambda: model(x, text_hidden=th, text_mask=tm), device, reps))
    single = statistics.median(timeit(
        lambda: [model(x[i:i + 1], text_hidden=th[i:i + 1], text_mask=tm[i:i + 1]) for i in range(B)],
        device, max(3, reps // 4)))
    return [dict(bench="mome_throughput", mode=m, B=B, L=L, H=H, C=C, d_llm=d_llm, median_ms=t,
                 samples_per_s=B / t * 1e3) for m, t in (("batched", batched), ("batch_1_loop", single))]


def cold_cache_rows(device, csv: str, epochs: int = 1):
    """LeMoLE's first epoch with a cold, then a warm embedding cache (a fresh temporary cache folder)."""
    import os
    import tempfile

    from mmts_fast.cli import build_datasets
    from mmts_fast.train import TrainConfig, fit

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for state in ("cold", "warm"):
            spec = {"data": str(Path(csv).resolve()), "model": "lemole", "lookback": 512, "horizon": 96,
                    "features": "M", "target": "OT",
                    "text": {"encoder": "minilm", "cache_dir": cache, "progress": False}}
            t0 = time.perf_counter()
            train, val, test, d_llm = build_datasets(spec)
            text_s = time.perf_counter() - t0
            n_files = sum(len(f) for _, _, f in os.walk(cache))
            torch.manual_seed(2021)
            model = LeMoLE(LeMoLEConfig(lookback=512, horizon=96, channels=train.n_channels, d_llm=d_llm))
            t1 = time.perf_counter()
            fit(model, train, val, None, TrainConfig(epochs=epochs, device=device, progress=False), log=lambda *a: None)
            epoch_s = time.perf_counter() - t1
            rows.append(dict(bench="lemole_first_epoch", cache=state, data=Path(csv).name, L=512, H=96, B=8,
                             d_llm=d_llm, text_s=text_s, epoch_s=epoch_s, cache_files=n_files,
                             train_windows=len(train)))
            print(rows[-1])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], metavar="B",
                   help="train_step batch sizes (L=512, H=96, C=7; default 8 32)")
    p.add_argument("--cold-cache", default=None, metavar="CSV",
                   help="only LeMoLE's first epoch with a cold vs warm embedding cache on this CSV")
    args = p.parse_args(argv)
    setup_device(args)
    reps = 5 if args.quick else 30
    out = Path(args.out) if args.out else default_out("models", args.device, quick=args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name(torch.device(args.device)), date=datetime.date.today().isoformat(), torch=torch.__version__)
    shapes = [(B, 512, 96, 7, 384) for B in args.batch_sizes] if not args.quick else [(8, 96, 24, 7, 384)]
    rows = []

    def emit(new_rows):   # each group as soon as it is measured: a run cut short keeps what it finished
        for r in new_rows:
            r.update(meta)
            append_row(out, r)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in meta},
                  flush=True)
        rows.extend(new_rows)

    if args.cold_cache:
        emit(cold_cache_rows(args.device, args.cold_cache))
    else:
        for B, L, H, C, d in shapes:
            emit(train_step_rows(args.device, B, L, H, C, d, reps))
        emit(mome_rows(args.device, 32, 512 if not args.quick else 96, 96, 7, 384, reps))
    return rows


if __name__ == "__main__":
    main()
