#!/usr/bin/env bash
# Create or reuse the project venv and install everything the project needs (idempotent).
#   VENV=path     where the venv lives (default: .venv in the repo)
#   PYTHON=path   the interpreter a new venv is made with (default: python3 on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# pdsh: DeepSpeed's runner starts the nodes of `deepspeed --hostfile` with it (docs/training.md)
# chromium: the headless browser the report-page tests render in (tests/support/browser.py)
APT_PACKAGES=(ffmpeg openssh-server openssh-client rsync numactl espeak-ng pdsh chromium)

# First, before anything is installed: an interpreter that setup.cfg's python_requires allows.
PY_BASE=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] && PY_BASE="$VENV/bin/python"
PY_REQUIRES=$(sed -n 's/^python_requires[[:space:]]*=[[:space:]]*//p' setup.cfg)
if ! command -v "$PY_BASE" >/dev/null; then
  echo "setup_env.sh: no $PY_BASE on PATH; setup.cfg needs Python $PY_REQUIRES (set PYTHON=...)" >&2
  exit 1
fi
"$PY_BASE" - "$PY_REQUIRES" <<'PYEOF' || exit 1
import operator, sys
def compatible(have, want):  # ~=3.11: >=3.11 and 3.*
    return have >= want and have[: len(want) - 1] == want[:-1]

ops = {"~=": compatible, ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
       ">": operator.gt, "<": operator.lt}
have = sys.version_info[:3]
for spec in filter(None, (part.strip() for part in sys.argv[1].split(","))):
    op = next((o for o in ops if spec.startswith(o)), None)
    if op is None:
        sys.exit(f"setup_env.sh: cannot read python_requires {sys.argv[1]!r} in setup.cfg")
    want = tuple(int(x) for x in spec[len(op):].strip().split(".") if x != "*")  # ==3.11.* compares 3.11
    if not ops[op](have[: len(want)], want):
        version = ".".join(map(str, have))
        sys.exit(f"setup_env.sh: {sys.executable} is Python {version}; setup.cfg needs python_requires {sys.argv[1]}")
PYEOF

need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "installing apt packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

stamp="$VENV/.installed-$(sha256sum setup.cfg | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY_BASE" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import torch, deepspeed, ray, open_clip, webdataset, av" 
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# DeepSpeed compiles a CPU shared-memory comm op on first use (1-4 min); build it once here.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
if [ ! -d "$TORCH_EXTENSIONS_DIR" ] || [ -z "$(find "$TORCH_EXTENSIONS_DIR" -name '*.so' 2>/dev/null | head -1)" ]; then
  echo "building DeepSpeed's CPU comm op into $TORCH_EXTENSIONS_DIR (once)"
  build_log="$(mktemp)"
  if ! PATH="$VENV/bin:$PATH" DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
      >"$build_log" 2>&1; then
    echo "warning: could not prebuild DeepSpeed's comm op; it will build on first use. Its last lines:"
    tail -n 15 "$build_log" | sed 's/^/  | /'
  fi
  rm -f "$build_log"
fi

# So does the CPU Adam op of ZeRO optimizer offload (~75 s): once here too.
if [ -z "$(find "$TORCH_EXTENSIONS_DIR" -name 'cpu_adam*.so' 2>/dev/null | head -1)" ]; then
  echo "building DeepSpeed's CPU Adam op into $TORCH_EXTENSIONS_DIR (once)"
  build_log="$(mktemp)"
  if ! PATH="$VENV/bin:$PATH" DS_ACCELERATOR=cpu "$VENV/bin/python" -c \
      "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('CPUAdamBuilder').load()" \
      >"$build_log" 2>&1; then
    echo "warning: could not prebuild DeepSpeed's CPU Adam op; it will build on first use. Its last lines:"
    tail -n 15 "$build_log" | sed 's/^/  | /'
  fi
  rm -f "$build_log"
fi
