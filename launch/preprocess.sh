#!/usr/bin/env bash
# Thin launcher for the preprocessing job; every argument goes to preprocess/shard.py, run by the project's venv.
#   launch/preprocess.sh --metadata meta.jsonl --videos videos/ --output out/ [--ray-address local --num-cpus 8]
# Relative paths are read from the current folder, as with `python preprocess/shard.py`, from any folder.
# Environment: VENV (default .venv in the repository), RAY_ADDRESS (connect to that cluster instead of a local one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=${VENV:-$ROOT/.venv}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
exec "$VENV/bin/python" "$ROOT/preprocess/shard.py" "$@"
