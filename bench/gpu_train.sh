#!/usr/bin/env bash
# GPU training benchmark: ViT-B/32 and ViT-B/16, 12 frames at 224, bf16, ZeRO-1, synthetic shards,
# fused vs dense (original-style masked) proxy attention. Prints samples/s per GPU and MFU per run, then the
# loader alone with JPEGs decoded by the CPU workers against on the GPU (bench/device_decode.py, data.decode_device).
#
#   bash bench/gpu_train.sh [steps=30] [gpus=all]
#
# Environment: PYTHON (default .venv/bin/python, else python3), BENCH_DIR, NUM_WORKERS (loader
# processes per rank, default 12), RUN_TIMEOUT (seconds per run, default 300: a hung run is reported
# and the next one starts), MODELS (default "vit-b32 vit-b16"), ATTENTIONS (default "fused dense"),
# EXTRA_ARGS (more train.main overrides, e.g. "zero.grad_accum_dtype=bf16 log.profile_steps=5").
#
# Random-init weights (throughput does not depend on them). The data set is synthetic moving shapes
# at 224x224 written once into $BENCH_DIR (default /tmp/vidproxy-bench); the loader decodes real JPEGs.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-30}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHON="$PY"  # launch/pretrain.sh uses the same interpreter
GPUS="${2:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
DIR="${BENCH_DIR:-/tmp/vidproxy-bench}"
WORKERS="${NUM_WORKERS:-12}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$DIR/runs"
if [ ! -f "$DIR/data/manifest.json" ]; then
  $PY -c "
from tests.train.fixtures_train import moving_dataset
moving_dataset('$DIR/data', 1024, seed=0, num_frames=16, size=224, max_samples=64)
print('wrote $DIR/data')"
fi
summary() {  # median of the logged rows after the first (warm-up) one
  $PY - "$1" "$2" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"train"' in l][1:]
sps = statistics.median(r["samples_per_s_per_device"] for r in rows)
mfu = statistics.median(r.get("mfu", 0.0) for r in rows)
wait = statistics.median(r["data_wait_fraction"] for r in rows)
print(f"RESULT {sys.argv[2]:<28} samples/s/GPU {sps:8.1f}   MFU {100 * mfu:5.1f}%   data wait {100 * wait:4.1f}%")
PYEOF
}
for model in ${MODELS:-vit-b32 vit-b16}; do
  for attention in ${ATTENTIONS:-fused dense}; do
    run="$DIR/runs/$model-$attention"
    rm -rf "$run"
    timeout "${RUN_TIMEOUT:-300}" bash launch/pretrain.sh --gpus "$GPUS" -- --config "launch/configs/train/$model.yaml" run_dir="$run" \
      data.train="[$DIR/data]" max_steps="$STEPS" model.attention="$attention" zero.stage=1 zero.precision=bf16 \
      data.num_workers="$WORKERS" log.every_steps=5 log.progress_bar=false log.eval_at_start=false \
      checkpoint.every_steps=100000 optim.lr=5e-6 ${EXTRA_ARGS:-} > "$run.log" 2>&1 || { echo "FAILED $model $attention (see $run.log)"; tail -20 "$run.log"; continue; }
    summary "$run" "$model $attention"
  done
done
# The loader alone: JPEGs decoded by the CPU workers against shipped as bytes and decoded on the GPU.
timeout "${RUN_TIMEOUT:-300}" $PY bench/device_decode.py "$DIR/data" --workers "$WORKERS" || echo "FAILED bench/device_decode.py"
