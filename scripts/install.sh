#!/usr/bin/env bash
# Installs everything cpcheck needs on a fresh Debian machine, idempotently.
# CPU hosts: torch==2.13.0 (a CPU build on these machines) and Mooncake's non-CUDA wheel.
# GPU hosts: set CPCHECK_GPU=1 to keep the installed CUDA torch and take Mooncake's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then
  # mooncake.store and mooncake_master link against libibverbs even over TCP
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1) \
      || echo "install.sh: could not install libibverbs1; Mooncake tests will be skipped" >&2
  fi
fi
if [ "${CPCHECK_GPU:-0}" = "1" ]; then
  $PIP install -q -e '.[test,mooncake]'
else
  $PIP install -q 'torch==2.13.0'
  $PIP install -q -e '.[test,mooncake-cpu]' 'torch==2.13.0'
fi
python3 -c "import torch, hypothesis, reference, scenarios; print('cpcheck installed; torch', torch.__version__)"
