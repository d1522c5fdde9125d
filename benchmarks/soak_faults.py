#!/usr/bin/env python3
"""The chaos soak's faults: what each one does to the running job, and the seeded schedule.

Each fault kind is a function of the soak's context (`benchmarks/soak.py`, class `Soak`) that
injects the fault into the current SLURM job and returns {"expect": ..., ...details}: the
recovery the run must go through, which the soak checks against what SLURM and the run folder
show afterwards:
  requeue   the job saves, exits 75 and SLURM requeues it under the same id (Restarts + 1);
  resubmit  the job ends (failed or cancelled) and the soak submits it again, as an operator;
  none      the job keeps running (S3 faults: the reader retries).
Save-time faults go through tests/faultinject/fault_soak_trigger.py (armed in every soak job).

    python benchmarks/soak_faults.py --minutes 3 --seed 1    # print the schedule a seed gives
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from launch.scheduler import cancel, requeue  # noqa: E402

# The interval: a fault every 20-90 s (issue 21). Shorter soaks scale it down so a
# 3-minute soak still injects several kinds: factor minutes/30, at least 0.1 (3 min: 2-9 s).
GAP_S = (20.0, 90.0)
FULL_SCALE_MINUTES = 30.0
S3_BURST_S = 10.0  # a burst of throttling or cut connections lasts this long
READ_TIMEOUT_S = 3  # SEER_S3_READ_TIMEOUT_S in the soak's jobs: a stall longer than it is cut
STALL_S = READ_TIMEOUT_S + 3
FAIL_WAIT_S = 150.0  # how long a fault that must end the job may take to do so


class Context(Protocol):
    """What a fault needs from the soak (benchmarks/soak.py implements it)."""

    job_id: str
    run: Path
    ctrl: Path
    fs_root: Optional[Path]
    proxy_faults: Any
    kill_wait_s: int
    rng: random.Random

    def log(self, msg: str) -> None: ...
    def wait_job_final(self, timeout: float) -> bool: ...


def _rank_pids(job_id: str) -> Dict[int, int]:
    """SLURM_PROCID -> pid of the task's main process (its loader workers share the env and the
    command line, so the process whose parent is not a task of the job is the rank)."""
    found: Dict[int, Tuple[int, int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text(errors="replace").split("\0")
                       if "=" in kv)
            cmd = (d / "cmdline").read_text(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and "SLURM_PROCID" in env and "submitit" in cmd:
            found[int(d.name)] = (int(env["SLURM_PROCID"]), ppid)
    return {rank: pid for pid, (rank, ppid) in found.items() if ppid not in found}


def _signal(sig: str) -> Callable[[Context], Dict[str, Any]]:
    def inject(ctx: Context) -> Dict[str, Any]:
        ok = cancel(ctx.job_id, sig)
        return {"expect": "requeue" if ok else "none", "scancel_ok": ok}
    return inject


def scontrol_requeue(ctx: Context) -> Dict[str, Any]:
    ok = requeue(ctx.job_id)
    return {"expect": "requeue" if ok else "none", "scontrol_ok": ok}


def scancel(ctx: Context) -> Dict[str, Any]:
    ok = cancel(ctx.job_id)
    return {"expect": "resubmit" if ok else "none", "scancel_ok": ok}


def kill_rank(ctx: Context) -> Dict[str, Any]:
    pids = _rank_pids(ctx.job_id)
    if not pids:
        return {"expect": "none", "note": "no rank process found"}
    rank = ctx.rng.choice(sorted(pids))
    os.kill(pids[rank], signal.SIGKILL)
    return {"expect": "resubmit", "rank": rank}


def _trigger(ctx: Context, name: str, content: str) -> Path:
    path = ctx.ctrl / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content)
    os.replace(tmp, path)  # the job sees a whole trigger or none
    return path


def kill_in_save(ctx: Context) -> Dict[str, Any]:
    """Rank 0 dies in the commit of the next save (periodic: every ckpt.every steps)."""
    path = _trigger(ctx, "kill_in_save", "1")
    ended = ctx.wait_job_final(FAIL_WAIT_S)
    fired = [p.name for p in ctx.ctrl.glob("fired.kill_in_save.*")]
    if path.exists():  # never fired: do not leave it for a later job
        path.unlink(missing_ok=True)
    return {"expect": "resubmit" if ended else "none", "fired": fired[-1:] if fired else []}


def slow_finalize(ctx: Context) -> Dict[str, Any]:
    """USR2, and rank 0's next commit takes KillWait + 15 s (as tests/test_slurm.py): the USR2
    save's, or a periodic save's already under way. cpu_tiny's dist.timeout_s (60 s) is above
    it, as docs/slurm.md asks: the other rank waits in its next collective."""
    secs = ctx.kill_wait_s + 15
    _trigger(ctx, "slow_finalize", str(secs))
    ok = cancel(ctx.job_id, "USR2")
    return {"expect": "requeue" if ok else "none", "seconds": secs}


def stale_lock(ctx: Context) -> Dict[str, Any]:
    """Every task SIGKILLed at once (no save), then a holder that takes RUN/.lock and is killed
    -9 leaves its record in the file: the next job must see a free lock and take it."""
    cancel(ctx.job_id, "KILL")
    if not ctx.wait_job_final(FAIL_WAIT_S):
        return {"expect": "none", "note": "job did not end after SIGKILL"}
    code = ("import os, signal, sys; from seer_pipeline.core import runlock; "
            "runlock.acquire(sys.argv[1], job_id='soak-stale-holder'); os.kill(os.getpid(), signal.SIGKILL)")
    res = subprocess.run([sys.executable, "-c", code, str(ctx.run)], cwd=REPO, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    return {"expect": "resubmit", "holder_exit": res.returncode}


def fs_full(ctx: Context) -> Dict[str, Any]:
    """The run folder's filesystem (a tmpfs made for the soak) filled to 1 MiB free, smaller than
    one checkpoint: the next save fails. Space is freed once the job ended (or after a wait)."""
    if ctx.fs_root is None:
        return {"expect": "none", "note": "no size-limited mount"}
    ballast = ctx.fs_root / "ballast"
    st = os.statvfs(ctx.fs_root)
    size = st.f_bavail * st.f_frsize - (1 << 20)
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, size))
    ended = ctx.wait_job_final(FAIL_WAIT_S)
    ballast.unlink()
    return {"expect": "resubmit" if ended else "none", "ballast_mb": round(size / 2**20, 1)}


def _burst(what: str) -> Callable[[Context], Dict[str, Any]]:
    def inject(ctx: Context) -> Dict[str, Any]:
        f = ctx.proxy_faults
        before = dict(f.counts)
        if what == "s3_errors":  # 503 SlowDown / 500 / 429, as SeaweedFS answers under load
            f.throttle_status = ctx.rng.choice([503, 500, 429])
            f.throttle_every = 2
        elif what == "s3_cut":
            f.drop_every = 2
        else:  # s3_stall: half a body, then silence past the reader's idle timeout
            f.stall_s, f.stall_every = STALL_S, 1
        end = time.monotonic() + (S3_BURST_S if what != "s3_stall" else 3 * STALL_S)
        while time.monotonic() < end:
            if what == "s3_stall" and f.counts["stalled"] > before["stalled"]:
                break  # one stall is the fault; more would only slow the soak
            time.sleep(0.2)
        f.throttle_every = f.drop_every = f.stall_every = 0
        hit = {k: f.counts[k] - before[k] for k in ("gets", "throttled", "dropped", "stalled")}
        return {"expect": "none", **hit}
    return inject


KINDS: Dict[str, Callable[[Context], Dict[str, Any]]] = {
    "kill_rank": kill_rank,
    "usr2": _signal("USR2"),
    "sigterm": _signal("TERM"),
    "scontrol_requeue": scontrol_requeue,
    "scancel": scancel,
    "s3_errors": _burst("s3_errors"),
    "s3_cut": _burst("s3_cut"),
    "s3_stall": _burst("s3_stall"),
    "slow_finalize": slow_finalize,
    "kill_in_save": kill_in_save,
    "fs_full": fs_full,
    "stale_lock": stale_lock,
}


class Schedule:
    """Seeded: the gap before each fault (scaled to the soak's length) and its kind. Kinds come
    from shuffled decks of all kinds, so every kind recurs and a short soak sees varied ones."""

    def __init__(self, seed: int, minutes: float, kinds: Optional[List[str]] = None) -> None:
        self.rng = random.Random(seed)
        self.scale = min(1.0, max(0.1, minutes / FULL_SCALE_MINUTES))
        self.kinds = list(kinds or KINDS)
        self._deck: List[str] = []

    def gap(self) -> float:
        return self.rng.uniform(*GAP_S) * self.scale

    def kind(self) -> str:
        if not self._deck:
            self._deck = list(self.kinds)
            self.rng.shuffle(self._deck)
        return self._deck.pop()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=12)
    a = ap.parse_args(argv)
    s = Schedule(a.seed, a.minutes)
    for i in range(a.count):
        print(f"{i + 1:3d}  after {s.gap():5.1f} s  {s.kind()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
