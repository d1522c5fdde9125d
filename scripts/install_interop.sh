#!/usr/bin/env bash
# Creates .venv-interop: a second venv for the weight import/export tests (tests/interop/).
# PyPI's torchvision does not import beside the main venv's CPU torch==2.13.0, and timm needs
# torchvision, so the pair torch==2.14.1 / torchvision==0.29.1 (a CUDA build that runs on CPU,
# ~5.5 GB) lives here, away from the lean main install. The project is installed editable too,
# so the tests import this checkout's code. Idempotent: re-running only tops up what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${INTEROP_VENV:-.venv-interop}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${INTEROP_TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${INTEROP_TORCHVISION_VERSION:-0.29.1}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch, torchvision, timm" 2>/dev/null; then
  echo "[install-interop] torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION timm into $VENV"
  $PIP install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" timm
fi
$PIP install -q -e ".[dev,interop]"
"$VENV/bin/python" -c "import torch, torchvision, timm; print('[install-interop] torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
