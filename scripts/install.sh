#!/usr/bin/env bash
# Installs cpcheck into the project's own virtual environment, .venv, idempotently.
#
# Always a venv: Debian's /usr/bin/python3 is externally managed (PEP 668) and refuses
# `pip install`, and a pyenv / conda interpreter stays untouched the same way. Afterwards run
# `.venv/bin/cpcheck ...` and `.venv/bin/python -m pytest`, or `source .venv/bin/activate` once.
#
#   CPCHECK_PYTHON=/path/python3  interpreter that creates the venv (default: python3 on PATH)
#   CPCHECK_VENV=DIR              where the venv goes (default: .venv in the repository root)
#   CPCHECK_TORCH_INDEX=URL       index torch comes from, e.g. PyTorch's CPU wheels
#                                 https://download.pytorch.org/whl/cpu (docs/install.md)
#   CPCHECK_GPU=1                 GPU host: the venv sees the system's CUDA torch (it is not
#                                 replaced), takes Mooncake's CUDA build, and skips the pins
#   CPCHECK_CONSTRAINTS=0         resolve freely instead of installing the pins in constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${CPCHECK_PYTHON:-python3}"
VENV="${CPCHECK_VENV:-.venv}"
GPU="${CPCHECK_GPU:-0}"
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

apt_updated=0
apt_install() {  # apt_install PKG...: Debian packages, best effort (false when it could not)
  command -v apt-get >/dev/null || return 1
  if [ "$apt_updated" = 0 ]; then $SUDO apt-get update -qq || return 1; apt_updated=1; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v "$PY" >/dev/null || { echo "install.sh: no '$PY' on PATH (set CPCHECK_PYTHON)" >&2; exit 2; }

# mooncake.store and mooncake_master link against these even over TCP (a minimal Debian 12
# lacks all three: without them every Mooncake test is skipped, not run)
missing=()
if command -v dpkg-query >/dev/null; then
  for pkg in libibverbs1 libcurl4 libnuma1; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}" \
    || echo "install.sh: could not install ${missing[*]}; Mooncake tests will be skipped" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -c "import venv, ensurepip" 2>/dev/null; then
    # Debian / Ubuntu ship venv's pip bootstrap separately, as python3.X-venv
    ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    apt_install "python$ver-venv" || apt_install python3-venv || {
      echo "install.sh: '$PY' cannot create a venv; install python$ver-venv" >&2; exit 2; }
  fi
  if [ "$GPU" = "1" ]; then
    "$PY" -m venv --system-site-packages "$VENV"  # keeps the CUDA torch already installed
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install -q)

cons=()
# The pins are CI's (a CPU host). A GPU host keeps its own CUDA torch, whose exact requirements
# (sympy, triton, nvidia-*...) the pins could contradict, so it resolves against that torch.
if [ "${CPCHECK_CONSTRAINTS:-1}" != "0" ] && [ "$GPU" != "1" ] && [ -f constraints.txt ]; then
  cons=(-c constraints.txt)
fi

if [ "$GPU" = "1" ]; then
  "${PIP[@]}" "${cons[@]}" -e '.[test,mooncake]'
else
  torch_from=()
  # PyTorch's CPU index names its builds 2.13.0+cpu, which outranks PyPI's (CUDA) 2.13.0 for
  # the pin torch==2.13.0; torch's own dependencies still resolve from PyPI as well
  if [ -n "${CPCHECK_TORCH_INDEX:-}" ]; then torch_from=(--extra-index-url "$CPCHECK_TORCH_INDEX"); fi
  "${PIP[@]}" "${cons[@]}" "${torch_from[@]}" 'torch==2.13.0'
  "${PIP[@]}" "${cons[@]}" -e '.[test,mooncake-cpu]' 'torch==2.13.0'
fi
"$VENV/bin/python" -c "import sys, torch, hypothesis, reference, scenarios
print('cpcheck installed in $VENV: python', sys.version.split()[0], 'torch', torch.__version__)"
