#!/usr/bin/env bash
# Replace Pillow with pillow-simd (source-only on PyPI; ~16 s, ~31 s with AVX2). Falls back to
# Pillow when the build fails or the result cannot decode WebP. Needs libjpeg/zlib/libwebp/libpng
# dev headers (installed by .ci/run when root).
set -uo pipefail
VENV=${1:-.venv}
PY="$VENV/bin/python"
PIP="$PY -m pip"
if $PY -c "import PIL,sys; sys.exit(0 if 'post' in PIL.__version__ else 1)" 2>/dev/null; then
  echo "[pillow-simd] already active"; exit 0
fi
CCFLAGS=""
grep -q avx2 /proc/cpuinfo 2>/dev/null && CCFLAGS="-mavx2"
echo "[pillow-simd] building (CC='cc $CCFLAGS')"
PILLOW_VERSION=$($PY -c "import PIL; print(PIL.__version__)" 2>/dev/null || echo "")
$PIP uninstall -q -y pillow pillow-simd >/dev/null 2>&1 || true
if CC="cc $CCFLAGS" $PIP install -q --no-cache-dir --no-binary :all: pillow-simd >/tmp/pillow-simd-build.log 2>&1 \
   && $PY -c "import PIL.features as f, sys; from PIL import Image; sys.exit(0 if f.check('webp') and f.check('jpg') else 1)"; then
  echo "[pillow-simd] active: $($PY -c 'import PIL; print(PIL.__version__)')"
else
  echo "[pillow-simd] build failed or lacks WebP/JPEG (log: /tmp/pillow-simd-build.log); reinstalling Pillow"
  $PIP uninstall -q -y pillow-simd >/dev/null 2>&1 || true
  $PIP install -q "pillow${PILLOW_VERSION:+==$PILLOW_VERSION}" || $PIP install -q pillow
fi
