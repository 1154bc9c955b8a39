#!/usr/bin/env bash
# Create or reuse the project venv and install everything the project needs (idempotent).
#   VENV=path   where the venv lives (default: .venv in the repo)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
APT_PACKAGES=(ffmpeg openssh-server openssh-client rsync numactl espeak-ng)

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
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
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
  if ! DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
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
  if ! DS_ACCELERATOR=cpu "$VENV/bin/python" -c \
      "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('CPUAdamBuilder').load()" \
      >"$build_log" 2>&1; then
    echo "warning: could not prebuild DeepSpeed's CPU Adam op; it will build on first use. Its last lines:"
    tail -n 15 "$build_log" | sed 's/^/  | /'
  fi
  rm -f "$build_log"
fi
