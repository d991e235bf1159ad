#!/usr/bin/env bash
# Accuracy runs for the text-conditioned models (RESULTS.md, issue 3). Seeds 2021-2023.
#  - ETTh1, L=512, H in {96, 720}: LeMoLE (MiniLM text) vs RLinear-MoLE.
#  - Time-MMD Energy and Health_US (target OT), L=36, H=12: LeMoLE and MoME with text, the same
#    models with text removed (--no-text), and RLinear-MoLE.
# Usage: bash bench/accuracy_text.sh [SHARED_DATA] [OUT_ROOT] [JOBS]   then: python bench/summarize_runs.py OUT_ROOT/<set>
set -euo pipefail
DATA=${1:-../shared/data}
ROOT=${2:-runs}
JOBS=${3:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
# warm the embedding cache once (so parallel runs do not all run the encoder)
mmts-fast train --model lemole --data "$DATA/ETT/ETTh1.csv" --lookback 512 --horizon 96 --epochs 1 \
  --out "$ROOT/warm_cache" --quiet > /dev/null
for D in Energy Health_US; do
  for M in lemole mome; do
    mmts-fast train --model $M --data "$DATA/Time-MMD/$D" --lookback 36 --horizon 12 --epochs 1 \
      --out "$ROOT/warm_cache_${D}_${M}" --quiet > /dev/null
  done
done
{
  for S in 2021 2022 2023; do
    for H in 96 720; do
      echo "--model lemole --data $DATA/ETT/ETTh1.csv --lookback 512 --horizon $H --seed $S --out $ROOT/text_etth1/lemole_H${H}_s$S"
      echo "--model rlinear_mole --data $DATA/ETT/ETTh1.csv --lookback 512 --horizon $H --head-dropout 0.2 --lr 0.001 --seed $S --out $ROOT/text_etth1/rlinear_mole_H${H}_s$S"
    done
    for D in Energy Health_US; do
      C="--data $DATA/Time-MMD/$D --lookback 36 --horizon 12 --seed $S"
      echo "--model lemole $C --out $ROOT/text_$D/lemole_text_s$S"
      echo "--model lemole $C --no-text --out $ROOT/text_$D/lemole_notext_s$S"
      echo "--model mome $C --out $ROOT/text_$D/mome_text_s$S"
      echo "--model mome $C --no-text --out $ROOT/text_$D/mome_notext_s$S"
      echo "--model rlinear_mole $C --head-dropout 0.2 --lr 0.001 --out $ROOT/text_$D/rlinear_mole_s$S"
    done
  done
} | while read -r ARGS; do
  OUT=${ARGS##*--out }
  [ -f "$OUT/metrics.json" ] || echo "$ARGS"
done | xargs -P "$JOBS" -I{} sh -c 'mmts-fast train {} --quiet > /dev/null 2>&1 || echo "FAILED: {}"'
