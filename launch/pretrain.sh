#!/usr/bin/env bash
""":"
# Post-pretraining (python -m train.main) under DeepSpeed, started either way:
#
#   deepspeed [--hostfile H] [--num_nodes N] [--num_gpus G] [--master_port P] launch/pretrain.sh TRAIN_ARGS
#   launch/pretrain.sh [options] -- TRAIN_ARGS
#
# e.g. TRAIN_ARGS = --config launch/configs/train/vit-b32.yaml data.train=[s3://b/ds] run_dir=runs/b32
# (`python -m train.main --help` lists every setting). `--deepspeed_config FILE` among TRAIN_ARGS merges
# DeepSpeed settings the config does not model (the same as zero.extra=FILE; docs/training.md).
#
# Options of the second form, which starts the deepspeed launcher itself (each also read from the
# environment variable in brackets):
#   --gpus N          ranks per node [NPROC_PER_NODE]; default: all GPUs, or 2 CPU ranks without a GPU
#                     (with --hostfile and no --node-rank: the hosts' slots)
#   --nodes N         number of nodes [NNODES]; default 1, or every host of --hostfile
#   --hostfile F      DeepSpeed hostfile ("host slots=N" lines) [HOSTFILE]; without --node-rank one call
#                     starts all nodes over ssh (DeepSpeed's runner: pdsh; docs/training.md)
#   --node-rank R     this node's rank: run the script on every node yourself, no ssh [NODE_RANK];
#                     starts DeepSpeed's per-node launcher (what `deepspeed --no_ssh` runs) directly
#   --master-addr A   rendezvous address [MASTER_ADDR]; default 127.0.0.1, or over ssh the first
#                     host's first address (`hostname -I` there, as DeepSpeed's runner finds it)
#   --master-port P   rendezvous port [MASTER_PORT], default 29500
#   --dry-run         print the deepspeed command and run train.main --dry-run on one process
#   -h, --help        this text
# Without a GPU, DS_ACCELERATOR=cpu and the ranks talk over gloo (`deepspeed --num_gpus N` then starts
# N CPU ranks). TORCH_EXTENSIONS_DIR defaults to .cache/torch_extensions in the repository (DeepSpeed
# compiles its CPU ops there once). Relative paths in TRAIN_ARGS are read from the current folder.

# How one file serves both forms: it is a bash script and a Python program at once. Bash reads the
# second line as the no-op command `:` and runs the bash below, which always ends in exec or exit
# (the Python lines at the end are a here-document to bash); Python reads everything from the second
# line to the closing quotes before those lines as one string and runs only the lines after it. The deepspeed launcher starts each rank as `python -u launch/pretrain.sh --local_rank=N
# TRAIN_ARGS`, so a rank runs the Python part, launch/pretrain_rank.py. Under bash the script is a
# rank too when a launcher started it (`deepspeed --no_python`: a --local_rank argument, or LOCAL_RANK
# and WORLD_SIZE in the environment) and hands over to the same module; otherwise it is the
# stand-alone launcher that follows. (The bash part must hold no backslash and no three double quotes.)
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

RANK_MODE=0
for arg in "$@"; do
  case "$arg" in --local_rank|--local_rank=*|--local-rank|--local-rank=*) RANK_MODE=1;; esac
done
[ -n "${LOCAL_RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ] && RANK_MODE=1
if [ "$RANK_MODE" = 1 ]; then
  exec "$PY" -u -m launch.pretrain_rank "$@"
fi

NPROC="${NPROC_PER_NODE:-}"; NNODES="${NNODES:-}"; HOSTFILE="${HOSTFILE:-}"; NODE_RANK="${NODE_RANK:-}"
MASTER_ADDR="${MASTER_ADDR:-}"; MASTER_PORT="${MASTER_PORT:-29500}"; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) NPROC="$2"; shift 2;;
    --nodes) NNODES="$2"; shift 2;;
    --hostfile) HOSTFILE="$2"; shift 2;;
    --node-rank) NODE_RANK="$2"; shift 2;;
    --master-addr) MASTER_ADDR="$2"; shift 2;;
    --master-port) MASTER_PORT="$2"; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) sed -n '3,/^$/p' "${BASH_SOURCE[0]}" | grep '^#' | cut -c3-; exit 0;;
    --) shift; break;;
    *) echo "pretrain.sh: unknown option $1 (train.main arguments go after --; see --help)" >&2; exit 2;;
  esac
done
GIVEN_NPROC="$NPROC"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" = "0" ]; then
  export DS_ACCELERATOR=cpu
  NPROC="${NPROC:-2}"
  export LOCAL_SIZE="$NPROC"          # the CPU accelerator's device count
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  NPROC="${NPROC:-$GPUS}"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false

if [ -n "$HOSTFILE" ] && [ -z "$NODE_RANK" ]; then
  # One call starts every node over ssh (pdsh): DeepSpeed's runner does that. What it is not given it
  # decides as `deepspeed --hostfile` does: every host, each host's slots, the first host's address.
  # The remote ranks get PYTHON* variables and those of .deepspeed_env (docs/training.md), not the
  # exports above; launch/pretrain_rank.py sets the same defaults there.
  ARGS=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
  [ -z "$NNODES" ] || ARGS+=(--num_nodes "$NNODES")
  [ -z "$GIVEN_NPROC" ] || ARGS+=(--num_gpus "$GIVEN_NPROC")
  [ -z "$MASTER_ADDR" ] || ARGS+=(--master_addr "$MASTER_ADDR")
  LAUNCH=("$PY" -m deepspeed.launcher.runner "${ARGS[@]}")
else
  NNODES="${NNODES:-1}"; MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
  # This node only (one node, or --node-rank without ssh): DeepSpeed's per-node launcher, which is
  # what `deepspeed --no_ssh --node_rank R` runs; calling it directly saves one deepspeed import.
  [ "$NNODES" = "1" ] || [ -n "$NODE_RANK" ] || { echo "pretrain.sh: --nodes $NNODES needs --hostfile or --node-rank" >&2; exit 2; }
  NODE_RANK="${NODE_RANK:-0}"
  WORLD_INFO=$("$PY" - "$NNODES" "$NPROC" "$NODE_RANK" "$HOSTFILE" <<'PYEOF'
import base64, json, sys
nodes, slots, rank, hostfile = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if hostfile:  # "host slots=N" lines, as DeepSpeed's hostfile
    hosts = {}
    for line in open(hostfile):
        line = line.split("#")[0].strip()
        if line:
            host, _, count = line.partition("slots=")
            hosts[host.strip()] = list(range(int(count)))
    if len(hosts) != nodes:
        sys.exit(f"pretrain.sh: {hostfile} lists {len(hosts)} hosts, --nodes is {nodes}")
else:
    hosts = {f"node{i}": list(range(slots)) for i in range(nodes)}
if not 0 <= rank < nodes:
    sys.exit(f"pretrain.sh: --node-rank {rank} is outside [0, {nodes})")
print(base64.urlsafe_b64encode(json.dumps(hosts).encode()).decode())
PYEOF
)
  LAUNCH=("$PY" -u -m deepspeed.launcher.launch "--world_info=$WORLD_INFO" "--node_rank=$NODE_RANK"
          "--master_addr=$MASTER_ADDR" "--master_port=$MASTER_PORT")
fi
if [ "$DRY" = 1 ]; then
  echo "${LAUNCH[*]} --module launch.pretrain_rank $*"
  exec "$PY" -m launch.pretrain_rank --dry-run "$@"
fi
exec "${LAUNCH[@]}" --module launch.pretrain_rank "$@"
: <<'END_OF_PYTHON'
":"""
# Python: a rank started by a launcher (see the comment at the top).
import os
import sys

here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]  # launch/ would shadow modules
sys.path.insert(0, os.path.dirname(here))  # the repository
from launch.pretrain_rank import main  # noqa: E402

sys.exit(main())
END_OF_PYTHON
