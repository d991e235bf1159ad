"""Markdown table of `mmts-fast train` runs: mean and std over seeds of test MSE/MAE.

    python bench/summarize_runs.py runs/etth1
Run directories are grouped by name with the trailing `_s<seed>` removed.
"""
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(root):
    groups = defaultdict(list)
    for f in sorted(Path(root).glob("*/metrics.json")):
        m = json.loads(f.read_text())
        key = re.sub(r"_s\d+$", "", f.parent.name)
        groups[key].append((m["train_config"]["seed"], m["test"]["mse"], m["test"]["mae"], m["train_time_s"],
                            m["best_epoch"]))
    print("| run | seeds | test MSE (mean ± std) | test MAE (mean ± std) | per-seed MSE | train time/seed (s) |")
    print("|---|---|---|---|---|---|")
    for key, rows in groups.items():
        mse, mae = [r[1] for r in rows], [r[2] for r in rows]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {key} | {','.join(str(r[0]) for r in rows)} | {statistics.mean(mse):.4f} ± {sd(mse):.4f} | "
              f"{statistics.mean(mae):.4f} ± {sd(mae):.4f} | {' / '.join(f'{v:.4f}' for v in mse)} | "
              f"{statistics.mean(r[3] for r in rows):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/etth1")
