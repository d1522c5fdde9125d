#!/usr/bin/env bash
# benchmarks/gpu_check.py on a GPU machine as it comes (docs/gpu.md): its Python has CUDA torch,
# numpy and numba but not this project's other dependencies, and no network. Installs the
# wheels of gpu-bundle/ (`make gpu-bundle`, carried along) for this Python into a folder of its
# own, offline, then runs the check; every argument goes to gpu_check.py (e.g. --out "$OUT").
#
#   bash benchmarks/gpu_run.sh --out gpu_check_out
#
# PYTHON (default python3): the interpreter that has the machine's CUDA torch.
# SEER_GPU_BUNDLE (default gpu-bundle), SEER_GPU_SITE (default $TMPDIR/seer-gpu-site).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=${SEER_GPU_BUNDLE:-gpu-bundle}
export SEER_GPU_SITE=${SEER_GPU_SITE:-${TMPDIR:-/tmp}/seer-gpu-site}

die() { echo "gpu_run: $*" >&2; exit 2; }
command -v "$PY" >/dev/null || die "no $PY here: set PYTHON to the interpreter that has CUDA torch"
[ -d "$BUNDLE" ] || die "no $BUNDLE/ folder: run \`make gpu-bundle\` where PyPI is reachable and carry it along"
tag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
ls "$BUNDLE"/*-"$tag"-*.whl >/dev/null 2>&1 \
  || die "$BUNDLE/ has no wheels for $tag ($PY): \`make gpu-bundle GPU_BUNDLE_PYTHONS=<X.Y>\` adds them"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip to install $BUNDLE/ with"
rm -rf "$SEER_GPU_SITE"
t0=$(date +%s)
# --isolated: no pip configuration or PIP_* variable can add an index; --no-deps: exactly the
# pinned set, the machine's torch, numpy and numba stay as they are.
"$PY" -m pip install --isolated --disable-pip-version-check --quiet --no-index --no-deps --no-compile \
  --only-binary=:all: --find-links "$BUNDLE" --target "$SEER_GPU_SITE" -r scripts/gpu_bundle.txt \
  || die "installing $BUNDLE/ for $tag failed (see above)"
echo "gpu_run: installed $BUNDLE/ for $tag into $SEER_GPU_SITE in $(( $(date +%s) - t0 )) s"
export PYTHONPATH="$SEER_GPU_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
