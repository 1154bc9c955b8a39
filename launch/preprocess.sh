#!/usr/bin/env bash
# Thin launcher for the preprocessing job; every argument goes to preprocess/shard.py.
#   launch/preprocess.sh --metadata meta.jsonl --videos videos/ --output out/ [--ray-address local --num-cpus 8]
# Environment: VENV (default .venv), RAY_ADDRESS (connect to that cluster instead of a local one).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
exec "$VENV/bin/python" preprocess/shard.py "$@"
