"""Time-LlaMA memory, fp32 vs NF4 backbone (issue 4): weight bytes from the tensors held and the peak
resident memory of one process that builds the model and runs training steps.

    python bench/bench_time_llama_memory.py [--layers 2] [--out bench/results/time_llama_memory_cpu.jsonl]

Each variant runs in a fresh subprocess so peak RSS (``ru_maxrss``) is its own; on CUDA the peak
allocated GPU memory is recorded too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch


def measure(layers: int, nf4: bool, batch: int, steps: int) -> dict:
    from mmts_fast.models import TimeLlaMA, TimeLlaMAConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = TimeLlaMA(TimeLlaMAConfig(lookback=96, horizon=96, channels=7, n_llm_layers=layers,
                                      load_in_4bit=nf4)).to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(batch, 96, 7, device=device), torch.randn(batch, 96, 7, device=device)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y) + 0.01 * model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mem = model.memory_bytes()
    row = {k: mem[k] for k in ("n_params", "n_trainable", "bytes_total", "bytes_backbone", "bytes_4bit",
                              "bytes_dense", "bytes_checkpoint")}
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="bench/results/time_llama_memory_cpu.jsonl")
    p.add_argument("--child", choices=["fp32", "nf4"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.layers, args.child == "nf4", args.batch, args.steps)))
        return
    rows = []
    for variant in ("fp32", "nf4"):
        child = subprocess.run([sys.executable, __file__, "--child", variant, "--layers", str(args.layers),
                                "--batch", str(args.batch), "--steps", str(args.steps)], capture_output=True, text=True)
        if child.returncode != 0:   # the child's own error, not a bare CalledProcessError
            raise SystemExit(f"{variant} run failed:\n{child.stderr.strip()[-2000:]}")
        out = child.stdout.strip().splitlines()[-1]
        row = {"bench": "time_llama_memory", "backbone": "smollm2", "variant": variant, "layers": args.layers,
               "batch": args.batch, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               **json.loads(out)}
        rows.append(row)
        print(f"{variant}: weights {row['bytes_total'] / 2**20:.1f} MiB (frozen backbone "
              f"{row['bytes_backbone'] / 2**20:.1f} MiB), checkpoint {row['bytes_checkpoint'] / 2**20:.1f} MiB, "
              f"peak RSS {row['peak_rss_mb']:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
