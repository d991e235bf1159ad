#!/usr/bin/env bash
# MoLA vs the same backbone's direct multi-step head (RESULTS.md, issue 4): ETTh1, L=336, H in {96, 720},
# seeds 2021-2023, RLinear backbone (1 expert; the direct-head baseline is runs/etth1/rlinear_mole_M1_*).
# Usage: bash bench/accuracy_mola.sh [CSV] [OUT_ROOT]   then: python bench/summarize_runs.py OUT_ROOT
set -euo pipefail
CSV=${1:-../shared/data/ETT/ETTh1.csv}
ROOT=${2:-runs/mola_etth1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for H in 96 720; do
  for SEED in 2021 2022 2023; do
    DIR=$ROOT/mola_rlinear_H${H}_s${SEED}
    [ -f "$DIR/metrics.json" ] && continue
    mmts-fast train --model mola --backbone rlinear --experts 1 --data "$CSV" --lookback 336 --horizon $H \
      --lr 0.001 --stage2-lr 0.005 --segments 4 --lora-experts 4 --lora-rank 8 --seed $SEED --out "$DIR" --quiet --overwrite
  done
done
