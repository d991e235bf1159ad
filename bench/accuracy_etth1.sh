#!/usr/bin/env bash
# Accuracy runs recorded in RESULTS.md: MoLE variants on ETTh1, L=336, H in {96, 720}, seeds 2021-2023.
# Usage: bash bench/accuracy_etth1.sh [CSV] [OUT_ROOT]   (defaults: ../shared/data/ETT/ETTh1.csv runs/etth1)
# Then: python bench/summarize_runs.py runs/etth1
set -euo pipefail
CSV=${1:-../shared/data/ETT/ETTh1.csv}
ROOT=${2:-runs/etth1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for H in 96 720; do
  for M in 4 1; do
    for SEED in 2021 2022 2023; do
      DIR=$ROOT/rlinear_mole_M${M}_H${H}_s${SEED}
      [ -f "$DIR/metrics.json" ] && continue
      mmts-fast train --model rlinear_mole --data "$CSV" --lookback 336 --horizon $H --experts $M \
        --head-dropout 0.2 --lr 0.001 --seed $SEED --out "$DIR" --quiet --overwrite
    done
  done
done
