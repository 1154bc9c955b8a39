#!/usr/bin/env bash
# Post-pretraining launcher: wraps the `deepspeed` launcher around `python -m train.main`.
#
#   launch/pretrain.sh [options] -- --config launch/configs/train/vit-b32.yaml data.train=[s3://b/ds] run_dir=runs/b32
#
# Options (each also read from the environment variable in brackets):
#   --gpus N          ranks per node [NPROC_PER_NODE]; default: all GPUs, or 2 CPU ranks without a GPU
#   --nodes N         number of nodes [NNODES], default 1
#   --hostfile F      DeepSpeed hostfile ("host slots=N" lines) [HOSTFILE]; without --node-rank one call
#                     starts all nodes over ssh (pdsh, DeepSpeed's runner)
#   --node-rank R     this node's rank: run the script on every node yourself, no ssh [NODE_RANK];
#                     starts DeepSpeed's per-node launcher (what `deepspeed --no_ssh` runs) directly
#   --master-addr A   rendezvous address [MASTER_ADDR], default 127.0.0.1
#   --master-port P   rendezvous port [MASTER_PORT], default 29500
#   --dry-run         print the deepspeed command and run train.main --dry-run on one process
# Without a GPU, DS_ACCELERATOR=cpu and the ranks talk over gloo. TORCH_EXTENSIONS_DIR defaults to
# ./.cache/torch_extensions (DeepSpeed compiles its CPU shared-memory op there once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
NPROC="${NPROC_PER_NODE:-}"; NNODES="${NNODES:-1}"; HOSTFILE="${HOSTFILE:-}"; NODE_RANK="${NODE_RANK:-}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) NPROC="$2"; shift 2;;
    --nodes) NNODES="$2"; shift 2;;
    --hostfile) HOSTFILE="$2"; shift 2;;
    --node-rank) NODE_RANK="$2"; shift 2;;
    --master-addr) MASTER_ADDR="$2"; shift 2;;
    --master-port) MASTER_PORT="$2"; shift 2;;
    --dry-run) DRY=1; shift;;
    --) shift; break;;
    *) echo "pretrain.sh: unknown option $1 (train.main arguments go after --)" >&2; exit 2;;
  esac
done
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" = "0" ]; then
  export DS_ACCELERATOR=cpu
  NPROC="${NPROC:-2}"
  export LOCAL_SIZE="$NPROC"          # the CPU accelerator's device count
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  NPROC="${NPROC:-$GPUS}"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false

if [ -n "$HOSTFILE" ] && [ -z "$NODE_RANK" ]; then
  # One call starts every node over ssh (pdsh): DeepSpeed's runner does that.
  ARGS=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$NPROC" --master_addr "$MASTER_ADDR"
        --master_port "$MASTER_PORT")
  LAUNCH=("$PY" -m deepspeed.launcher.runner "${ARGS[@]}")
else
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
  echo "${LAUNCH[*]} --module train.main $*"
  exec "$PY" -m train.main --dry-run "$@"
fi
exec "${LAUNCH[@]}" --module train.main "$@"
