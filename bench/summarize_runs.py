"""Markdown table of `mmts-fast train` runs: mean and std over seeds of test MSE/MAE.

    python bench/summarize_runs.py runs/etth1              # one row per group of seeds
    python bench/summarize_runs.py runs/etth1 --per-run    # one row per run: best epoch, train/val/test MSE
Run directories are grouped by name with the trailing `_s<seed>` removed.
"""
import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path


def load(root: Path) -> list[tuple[str, dict]]:
    if not root.is_dir():
        raise SystemExit(f"no such folder: {root}")
    runs = [(f.parent.name, json.loads(f.read_text())) for f in sorted(root.glob("*/metrics.json"))]
    if not runs:
        raise SystemExit(f"no finished runs (*/metrics.json) in {root}")
    return runs


def per_seed_table(runs) -> str:
    groups = defaultdict(list)
    for name, m in runs:
        groups[re.sub(r"_s\d+$", "", name)].append((m["train_config"]["seed"], m["test"]["mse"], m["test"]["mae"],
                                                    m["train_time_s"]))
    lines = ["| run | seeds | test MSE (mean ± std) | test MAE (mean ± std) | per-seed MSE | train time/seed (s) |",
             "|---|---|---|---|---|---|"]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0   # noqa: E731
    for key, rows in groups.items():
        mse, mae = [r[1] for r in rows], [r[2] for r in rows]
        lines.append(f"| {key} | {','.join(str(r[0]) for r in rows)} | {statistics.mean(mse):.4f} ± {sd(mse):.4f} | "
                     f"{statistics.mean(mae):.4f} ± {sd(mae):.4f} | {' / '.join(f'{v:.4f}' for v in mse)} | "
                     f"{statistics.mean(r[3] for r in rows):.0f} |")
    return "\n".join(lines)


def per_run_table(runs) -> str:
    """Best epoch, the train MSE of that epoch, the best model's validation and test MSE, test MAE."""
    lines = ["| run | best epoch | train MSE | val MSE | test MSE | test MAE |", "|---|---|---|---|---|---|"]
    for name, m in runs:
        best = m["best_epoch"]
        train = next(h["train_mse"] for h in m["history"] if h["epoch"] == best)
        lines.append(f"| {name} | {best} | {train:.4f} | {m['val']['mse']:.4f} | {m['test']['mse']:.4f} | "
                     f"{m['test']['mae']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="runs/etth1", help="folder of run folders (default runs/etth1)")
    p.add_argument("--per-run", action="store_true", help="one row per run instead of per group of seeds")
    args = p.parse_args(argv)
    runs = load(Path(args.root))
    text = per_run_table(runs) if args.per_run else per_seed_table(runs)
    print(text)
    return text


if __name__ == "__main__":
    main()
