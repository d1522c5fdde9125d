#!/usr/bin/env bash
# Stop the local SLURM started by start.sh: slurmctld + slurmd first (`scontrol shutdown`),
# munged last (slurmctld needs munge to authenticate the shutdown request). Safe to run twice.
set -uo pipefail

DIR="${SEER_SLURM_DIR:-/tmp/seer-slurm}"
[ -n "${SLURM_CONF:-}" ] || { [ -e /etc/slurm/slurm.conf ] || export SLURM_CONF="$DIR/slurm.conf"; }
log() { echo "[slurm-local] $*"; }

# A live (non-zombie) pid from a pid file, or nothing.
live_pid() {
  local pid
  pid="$(cat "$1" 2>/dev/null || true)"
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  awk '{exit ($3 == "Z") ? 1 : 0}' "/proc/$pid/stat" && echo "$pid"
}

wait_gone() {  # pidfile, seconds
  for _ in $(seq $(( $2 * 5 ))); do live_pid "$1" >/dev/null || return 0; sleep 0.2; done
  return 1
}

if timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"; then
  timeout 20 scontrol shutdown >/dev/null 2>&1 || log "scontrol shutdown failed; killing by pid"
fi
for d in slurmctld slurmd; do
  pf="$DIR/run/$d.pid"
  if ! wait_gone "$pf" 15; then
    pid="$(live_pid "$pf")" && kill -TERM "$pid" 2>/dev/null
    wait_gone "$pf" 10 || { pid="$(live_pid "$pf")" && kill -KILL "$pid" 2>/dev/null; }
  fi
  log "$d stopped"
done

pf=/run/munge/munged.pid
if pid="$(live_pid "$pf")"; then
  kill -TERM "$pid" 2>/dev/null
  wait_gone "$pf" 10 || { pid="$(live_pid "$pf")" && kill -KILL "$pid" 2>/dev/null; }
fi
munge -n >/dev/null 2>&1 && log "warning: munged still answers" || log "munged stopped"
exit 0
