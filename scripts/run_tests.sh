#!/usr/bin/env bash
# `make test`: start the local SLURM for the launcher tests if it is not up (and stop it again
# afterwards if we started it), then run pytest with any extra arguments, then the weight
# interop tests (tests/interop) in their own venv.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
started=0
if ! scontrol ping >/dev/null 2>&1; then
  if bash slurm/local-cluster/start.sh >/tmp/seer-slurm-start.log 2>&1; then
    started=1
  else
    echo "[test] local SLURM not started (see /tmp/seer-slurm-start.log); SLURM tests will skip"
  fi
fi
# The main venv (torch CPU 2.13.0) runs everything but tests/interop; those need timm and
# torchvision, which live in .venv-interop (scripts/install_interop.sh), and run after it.
"$PY" -m pytest --ignore=tests/interop "$@"
rc=$?
INTEROP_PY=${INTEROP_PY:-.venv-interop/bin/python}
if [ -x "$INTEROP_PY" ]; then
  SEER_INTEROP=1 "$INTEROP_PY" -m pytest -q -m interop tests/interop
  rc_interop=$?
else
  echo "[test] $INTEROP_PY not found: run 'make install' (scripts/install_interop.sh) for the interop tests"
  rc_interop=1
fi
[ "$rc" = "0" ] && rc=$rc_interop
[ "$started" = "1" ] && bash slurm/local-cluster/stop.sh >/dev/null 2>&1
exit $rc
