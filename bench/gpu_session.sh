#!/usr/bin/env bash
# Everything this project measures on a lent GPU, as ONE device call (the device tool's `run`), sized for
# its limits: one command <= 10 minutes, 15 minutes of device time per session including the start, at most
# 8 files back from $OUT. Each step has its own time limit, so a slow step costs only itself; benchmarks
# write their rows as they finish them, so a step cut short still returns its finished rows.
#
#   device run:  bash bench/gpu_session.sh                     (timeout_s 590; results in $OUT)
#   dry run here, CPU, tiny shapes, to check the plumbing:
#                OUT=runs/gpu_dry GPU_SESSION_DEVICE=cpu bash bench/gpu_session.sh
#
# Afterwards, on this machine: copy $OUT/*_h200.jsonl into bench/results/, render them
# (python bench/render.py bench/results/expert_heads_h200.jsonl > bench/results/expert_heads_h200.md, and
# the same for lora_mixture and gqa_attention), and write the figures (device, date, medians, ratios) into
# bench/README.md next to this command.
#
# The device image has its own python3 with torch, triton, transformers, peft, onnxruntime and hypothesis,
# and no registry: the package is installed from this tree without dependencies. bitsandbytes, gguf and the
# bundled text models are not there (the tests needing them skip; the benchmarks here use none of them).
set -uo pipefail
OUT=${OUT:-runs/gpu}
DEV=${GPU_SESSION_DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "$DEV" = cuda ]; then
    TAG=$("$PY" -c "import torch; n = torch.cuda.get_device_name().lower(); print(next((k for k in ('h200', 'h100', 'a100', 'l4') if k in n), 'cuda'))")
    SHAPES=(--quick)              # the benchmarks' quick sets: what fits the budget
    BATCHES=(8 32 128 256)
    TEST_LIMIT=180
else                              # plumbing check only: tiny shapes, nothing lands in bench/results
    TAG=cpu_dry
    SHAPES=(--shapes tiny --reps 3)
    BATCHES=(8)
    TEST_LIMIT=60
fi

LOG="$OUT/session.log"   # one log for every step: $OUT returns at most 8 files
step() {  # step NAME LIMIT_S COMMAND...: runs it with a time limit, appends its output to $LOG, says how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS tmp
    tmp=$(mktemp)
    timeout "$limit" "$@" >"$tmp" 2>&1
    local rc=$?
    { echo "=============== $name: rc=$rc ($((SECONDS - t0)) s, limit ${limit} s): $*"; cat "$tmp"; } >>"$LOG"
    echo "== $name: rc=$rc ($((SECONDS - t0)) s, limit ${limit} s)"
    tail -n 4 "$tmp"
    rm -f "$tmp"
}

{
    date -u +%FT%TZ
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    "$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>/dev/null || true
} >"$LOG" 2>&1
cat "$LOG"

if ! "$PY" -c "import mmts_fast.kernels" 2>/dev/null; then
    step install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
    "$PY" -c "import mmts_fast.kernels" || { echo "== install failed (see $LOG)"; exit 1; }
fi

# 1. the kernel tests, compiled (on CUDA conftest leaves TRITON_INTERPRET unset)
if [ "$DEV" = cuda ]; then
    step kernel_tests "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/kernels
else
    step kernel_tests "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_expert_heads.py -k reference
fi
# 2. model training steps (issue 3's LeMoLE vs RLinear-MoLE step ratio), then K1, K2, K3 (fwd and fwd+bwd)
step models 110 "$PY" bench/bench_models.py --device "$DEV" --batch-sizes "${BATCHES[@]}" $([ "$DEV" = cuda ] || echo --quick) \
    --out "$OUT/models_$TAG.jsonl"
step expert_heads 80 "$PY" bench/bench_expert_heads.py --device "$DEV" "${SHAPES[@]}" --out "$OUT/expert_heads_$TAG.jsonl"
step lora_mixture 70 "$PY" bench/bench_lora_mixture.py --device "$DEV" "${SHAPES[@]}" --out "$OUT/lora_mixture_$TAG.jsonl"
step gqa_attention 70 "$PY" bench/bench_gqa_attention.py --device "$DEV" "${SHAPES[@]}" --out "$OUT/gqa_attention_$TAG.jsonl"
ls -l "$OUT"
