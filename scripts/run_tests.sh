#!/usr/bin/env bash
# `make test`: start the local SLURM for the launcher tests if it is not up (and stop it again
# afterwards if we started it), then run pytest with any extra arguments.
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
"$PY" -m pytest "$@"
rc=$?
[ "$started" = "1" ] && bash slurm/local-cluster/stop.sh >/dev/null 2>&1
exit $rc
