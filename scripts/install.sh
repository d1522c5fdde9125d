#!/usr/bin/env bash
# Creates .venv and installs the project. Order matters:
#  1. torch first, pinned to the CPU wheel when no CUDA driver is present, so that the
#     project's loose `torch>=2.6` never pulls a multi-GB CUDA build on a CPU machine;
#  2. the project and its dev extras (these pull Pillow, e.g. via matplotlib);
#  3. pillow-simd last, replacing Pillow, with a fallback to Pillow if the build fails or
#     lacks WebP (see scripts/install_pillow_simd.sh);
#  4. the interop venv .venv-interop (scripts/install_interop.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}

bash scripts/install_system.sh
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[install] CUDA driver found: installing torch from the default index"
    $PIP install -q "torch>=2.13,<2.15"  # the tested range (pyproject.toml)
  else
    echo "[install] no CUDA: installing the CPU wheel torch==$TORCH_CPU_VERSION"
    $PIP install -q "torch==$TORCH_CPU_VERSION"
  fi
fi
$PIP install -q -e ".[dev]"
if [ "${SEER_SKIP_PILLOW_SIMD:-0}" != "1" ]; then
  bash scripts/install_pillow_simd.sh "$VENV" || echo "[install] pillow-simd step failed; keeping Pillow"
fi
"$VENV/bin/python" -c "import PIL, PIL.features as f; print('[install] PIL', PIL.__version__, 'webp' if f.check('webp') else 'NO-webp')"
# The weight import/export tests need timm + torchvision, which do not import beside the CPU
# torch above: they get their own venv (.venv-interop), made here so `make test` can run them.
if [ "${SEER_SKIP_INTEROP:-0}" != "1" ]; then
  bash scripts/install_interop.sh
fi
