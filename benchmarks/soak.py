#!/usr/bin/env python3
"""Chaos soak (issue 21): a real training under the local SLURM while faults hit it, and at the
end the run must equal an uninterrupted one bitwise.

`seer-submit` runs `cpu_tiny` on 2 SLURM tasks, shards in a SeaweedFS S3 server read through the
fault proxy of the tests, a checkpoint every 5 steps, the run folder on a size-limited tmpfs made
for the soak. A seeded schedule (benchmarks/soak_faults.py) injects a fault 20-90 s after the
run trains again (scaled down for soaks under 30 minutes), for --minutes. A job that ends
is submitted again, as an operator would. The same configuration runs once without faults
(local `seer-train dist.nproc=2`, alongside). Then benchmarks/soak_check.py compares them and
the soak prints a table of wall time lost per fault kind and, last, one JSON line; the exit
code is 1 when a check fails.

    make soak MINUTES=60            # or: python benchmarks/soak.py --minutes 3 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
import soak_check as check  # noqa: E402
from fault_proxy import FaultProxy, Faults  # noqa: E402
from s3_server import start_server  # noqa: E402
from soak_faults import KINDS, READ_TIMEOUT_S, Schedule  # noqa: E402

from launch.scheduler import FINAL_STATES, cancel, job_info, kill_wait_s  # noqa: E402
from seer_pipeline.shards.synth import photo_variants, write_shards  # noqa: E402
from seer_pipeline.store import objects  # noqa: E402

N_SAMPLES, PER_SHARD = 96, 8  # 12 shards: an epoch is 12 steps of 4 images on each of 2 ranks
FS_MB = 96  # the run folder's tmpfs: checkpoints are ~3.4 MB, two kept
HANG_S = 300.0  # a RUNNING job with no step for this long is hung: a finding, then killed
KEYS = {"AWS_ACCESS_KEY_ID": "seer-soak", "AWS_SECRET_ACCESS_KEY": "seer-soak-secret",
        "AWS_DEFAULT_REGION": "us-east-1"}


def default_steps(minutes: float) -> int:
    """Enough steps that the faulted run is still training when the fault window closes (a run
    that finishes early ends the window). The 60-minute soak on the 2-core dev VM advanced
    45-60 steps a minute under its faults (docs/benchmarks.md, chaos soak). Between faults a
    quiet box trains faster: 64 steps in 13 s (2026-12-07, seed 7), and 120 steps ended the
    3-minute run after 3 faults, one kind short of CI's --min-kinds 4. The 3-minute soak
    takes 300: room for 4 kinds at the longest gap (9 s of training each) at 5 steps/s."""
    return int(300 + 60 * max(0.0, minutes - 3))


def train_args(bucket: str, steps: int) -> List[str]:
    return [f"data.shards=s3://{bucket}/shards", "data.batch_size=4", "data.workers=1",
            f"train.steps={steps}", "ckpt.every=5", "ckpt.keep_latest=2", "train.threads=1",
            "train.tensorboard=false", "train.record_samples=true", "train.log_every=10"]


def make_fs(path: Path) -> tuple[Optional[Path], str]:
    """A size-limited tmpfs for the run folder, or (None, why not)."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_MB}m", "soakfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return None, f"mount -t tmpfs failed: {res.stderr.strip()} (needs root / CAP_SYS_ADMIN)"
    return path, ""


class Soak:
    """The faulted run: its current job, the fault record, the context faults act on."""

    def __init__(self, a: argparse.Namespace, out: Path, env: Dict[str, str], args: List[str]) -> None:
        self.out, self.env, self.args = out, env, args
        self.rng = random.Random(a.seed + 1)
        self.schedule = Schedule(a.seed, a.minutes, a.kinds.split(",") if a.kinds else None)
        self.fs_root, self.fs_note = make_fs(out / "chaos_fs")
        self.run = (self.fs_root or out / "chaos_fs") / "run"
        self.ctrl = out / "ctrl"
        self.ctrl.mkdir(parents=True, exist_ok=True)
        self.kill_wait_s = kill_wait_s()
        self.job_id = ""
        self.jobs: List[str] = []
        self.restarts: Dict[str, int] = {}
        self.faults: List[Dict[str, Any]] = []
        self.unexpected: List[str] = []
        self.proxy_faults = Faults()
        self.logf = open(out / "soak.log", "a")

    def log(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")
        self.logf.flush()

    def info(self) -> Any:
        inf = job_info(self.job_id)
        if inf is not None and inf.state != "UNKNOWN":
            self.restarts[self.job_id] = max(self.restarts.get(self.job_id, 0), inf.restarts)
        return inf

    def wait_job_final(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            inf = self.info()
            if inf is not None and inf.state.split()[0] in FINAL_STATES:
                return True
            time.sleep(0.5)
        return False

    def submit(self) -> None:
        cmd = [sys.executable, "-m", "launch.submit", "--config", "cpu_tiny", *self.args,
               f"run.dir={self.run}", "slurm.tasks_per_node=2", "slurm.cpus_per_task=1",
               "slurm.max_requeues=100000", "slurm.job_name=seer-soak", "slurm.timeout_min=600"]
        for _ in range(120):  # the folder's lock is busy until the old job's tasks are gone
            res = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
            jobs = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("job ")]
            if res.returncode == 0 and jobs:
                self.job_id = jobs[0]
                self.jobs.append(self.job_id)
                self.log(f"submitted job {self.job_id}")
                return
            time.sleep(1.0)
        raise RuntimeError(f"seer-submit kept failing: {res.stderr[-2000:]}")

    def last_exec(self) -> tuple[float, int]:
        ex = check.executions(self.run)
        return ex[-1] if ex else (0.0, 0)

    def inject(self, kind: str) -> None:
        t0 = time.time()
        step = self.last_exec()[1]
        self.log(f"fault {len(self.faults) + 1}: {kind} (job {self.job_id}, step {step})")
        job, before = self.job_id, self.restarts.get(self.job_id, 0)
        res = KINDS[kind](self)
        self.faults.append({"kind": kind, "t0": t0, "t1": time.time(), "job": job, "step": step,
                            "restarts_before": before, **res})
        self.log(f"  -> {res}")


def _recovered(soak: Soak, f: Optional[Dict[str, Any]], state: str) -> bool:
    """Whether the recovery the last fault expects has happened, in SLURM's view: the job (the
    same one, requeued, or the resubmitted one) RUNNING again after it was seen not running.
    Steps logged while the old tasks wind down then never count as the new execution's."""
    if f is None or f["expect"] == "none":
        return True
    if soak.job_id != f["job"] or state != "RUNNING":
        f["down_seen"] = True
    if not f.get("down_seen") or state != "RUNNING":
        return False
    return soak.job_id != f["job"] or soak.restarts.get(f["job"], 0) > f["restarts_before"]


def drive(soak: Soak, steps: int, minutes: float, min_kinds: int = 0) -> float:
    """Inject faults until the window closes, resubmit ended jobs, wait for the run to finish.
    A fault comes a scheduled gap after the run trains again following the previous one; the
    window stays open past `minutes` (10 minutes at most) until `min_kinds` kinds were injected.
    Returns the fault window's length in minutes."""
    t_start = time.time()
    deadline = t_start + minutes * 60
    soak.submit()
    gap, recovered_at, trained_since = soak.schedule.gap(), t_start, None
    window_end = deadline
    while True:
        inf = soak.info()
        state = inf.state.split()[0] if inf else "?"
        t_last, s_last = soak.last_exec()
        last = soak.faults[-1] if soak.faults else None
        if state in FINAL_STATES:
            if state == "COMPLETED" and s_last >= steps:
                break
            if not any(f["job"] == soak.job_id and f["expect"] == "resubmit" for f in soak.faults):
                soak.unexpected.append(f"job {soak.job_id} ended {state} with no fault that ends a job")
                soak.log(f"UNEXPECTED: job {soak.job_id} ended {state}")
            soak.submit()
            continue
        if recovered_at is None and _recovered(soak, last, state):
            recovered_at = time.time()
            if last is not None and last["expect"] != "none":
                last["t_recovered"] = recovered_at
            for trigger in ("slow_finalize", "kill_in_save"):  # unclaimed: must not fire later
                if (soak.ctrl / trigger).exists() and last is not None:
                    (soak.ctrl / trigger).unlink()
                    last["trigger_unclaimed"] = trigger
        quiet_since = max(t_last, recovered_at or (last["t1"] if last else t_start))
        if state == "RUNNING" and time.time() - quiet_since > HANG_S:
            soak.unexpected.append(f"job {soak.job_id}: no step for {HANG_S:.0f} s while RUNNING")
            soak.log(f"UNEXPECTED: job {soak.job_id} hangs; cancelling it (SIGKILL)")
            cancel(soak.job_id, "KILL")
            soak.faults.append({"kind": "operator_kill_hung", "t0": time.time(), "t1": time.time(),
                                "job": soak.job_id, "step": s_last, "restarts_before": 0,
                                "expect": "resubmit", "not_a_fault": True})
            soak.wait_job_final(120)
            continue
        if trained_since is None and recovered_at is not None and state == "RUNNING" and t_last > recovered_at:
            trained_since = time.time()
        now = time.time()
        kinds = len({f["kind"] for f in soak.faults if not f.get("not_a_fault")})
        # Not once the last step ran: the job is finishing and a signal would find no run to stop.
        open_ = s_last < steps and (now < deadline or (kinds < min_kinds and now < deadline + 600))
        if open_ and trained_since is not None and now >= trained_since + gap:
            soak.inject(soak.schedule.kind())
            gap, recovered_at, trained_since = soak.schedule.gap(), None, None
            window_end = time.time()
            continue
        if now > deadline + 1800:
            raise RuntimeError("the faulted run did not finish within 30 minutes of the window")
        time.sleep(0.5)
    window = (min(time.time(), max(deadline, window_end)) - t_start) / 60
    soak.log(f"run finished: {len(soak.jobs)} job(s), {len(soak.faults)} fault(s)")
    return window


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(f"soak stopped by signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="length of the fault window")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="train.steps (default: from --minutes)")
    ap.add_argument("--kinds", default="", help="comma-separated fault kinds (default: all)")
    ap.add_argument("--min-kinds", type=int, default=0,
                    help="keep the window open past --minutes (10 min at most) until this many kinds hit")
    ap.add_argument("--out", type=Path, default=None, help="soak folder (default: runs/soak-SEED-TIME)")
    a = ap.parse_args(argv)
    steps = a.steps or default_steps(a.minutes)
    out = (a.out or REPO / "runs" / f"soak-{a.seed}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(KEYS)
    signal.signal(signal.SIGTERM, _stop)  # `kill` of the soak still cancels its job and unmounts
    srv = start_server(out / "weed")
    soak: Optional[Soak] = None
    ref_proc = None
    try:
        bucket = srv.make_bucket("soak")
        os.environ["AWS_ENDPOINT_URL"] = srv.endpoint
        shards = write_shards(out / "shards", photo_variants(REPO / "tests/data/photos", N_SAMPLES, 48), PER_SHARD)
        for p in sorted(shards.iterdir()):
            objects.put_bytes(f"s3://{bucket}/shards/{p.name}", p.read_bytes())
        args = train_args(bucket, steps)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
        base["PYTHONPATH"] = str(REPO)
        with FaultProxy(srv.endpoint) as proxy:
            chaos_env = dict(base, AWS_ENDPOINT_URL=proxy.endpoint, SEER_S3_READ_TIMEOUT_S=str(READ_TIMEOUT_S),
                             PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "faultinject"), str(REPO)]))
            soak = Soak(a, out, chaos_env, args)
            chaos_env["SEER_TEST_FAULTS"] = f"soak_trigger:{soak.ctrl}"
            soak.proxy_faults = proxy.faults
            if soak.fs_note:
                soak.log(f"no fs_full fault: {soak.fs_note}")
            soak.log(f"soak {out}: {a.minutes} min, seed {a.seed}, {steps} steps, KillWait {soak.kill_wait_s} s")
            ref = out / "reference"
            with open(out / "reference.log", "w") as lf:
                ref_proc = subprocess.Popen(
                    [sys.executable, "-m", "seer_pipeline.train.cli", "--config", "cpu_tiny", "dist.nproc=2",
                     *args, f"run.dir={ref}"], cwd=REPO, env=base, stdout=lf, stderr=subprocess.STDOUT)
            window = drive(soak, steps, a.minutes, a.min_kinds)
            ref_rc = ref_proc.wait(timeout=3600)
        return report(soak, ref, ref_rc, window, a.seed, steps)
    finally:
        if ref_proc is not None and ref_proc.poll() is None:
            ref_proc.kill()
        if soak is not None:
            if soak.job_id:
                cancel(soak.job_id)
            if soak.fs_root is not None:  # keep the evidence, then drop the mount
                soak.wait_job_final(120)
                shutil.copytree(soak.run, out / "chaos_run", dirs_exist_ok=True)
                subprocess.run(["umount", "-l", str(soak.fs_root)], check=False)
        srv.stop()


def report(soak: Soak, ref: Path, ref_rc: int, window: float, seed: int, steps: int) -> int:
    losses = check.compare_losses(soak.run, ref)
    state = check.compare_state(soak.run, ref)
    samples = check.check_samples(soak.run, ref, N_SAMPLES, steps)
    folder = check.folder_checks(soak.run)
    req = sum(1 for f in soak.faults if f["expect"] == "requeue")
    resub = sum(1 for f in soak.faults if f["expect"] == "resubmit")
    restarts = sum(soak.restarts.values())
    table = check.lost_by_kind(soak.run, soak.faults)
    print(f"\n{'fault kind':18} {'n':>3} {'restart s':>9} {'redone steps':>12} {'lost s/fault':>12} {'lost s':>7}")
    for r in table:
        print(f"{r['kind']:18} {r['n']:3d} {r['restart_s']:9.1f} {r['redone_steps']:12.1f} "
              f"{r['lost_s_mean'] if r['lost_s_mean'] is not None else '-':>12} {r['lost_s_total']:7.1f}")
    details = {"losses": losses, "state": state, "samples": samples, "folder": folder,
               "reference_exit": ref_rc, "jobs": soak.jobs, "slurm_restarts": soak.restarts,
               "expected_requeues": req, "expected_resubmits": resub, "unexpected": soak.unexpected,
               "faults": soak.faults, "lost": table, "fs_note": soak.fs_note}
    (soak.out / "soak.json").write_text(json.dumps(details, indent=1))
    checks = {"identical": losses["loss_equal"] and state["state_equal"] and losses["steps"] == steps,
              "samples_once": samples["samples_once"], "partial_left": folder["partial_left"],
              "requeues_match": restarts == req and len(soak.jobs) - 1 == resub and not soak.unexpected,
              "lock_free": not folder["lock_held"]}
    ok = (checks["identical"] and checks["samples_once"] and checks["partial_left"] == 0
          and checks["requeues_match"] and checks["lock_free"] and ref_rc == 0)
    for k, v in {**checks, "reference_exit": ref_rc}.items():
        print(f"check {k}: {v}")
    print(json.dumps({"minutes": round(window, 1), "seed": seed, "steps": steps,
                      "faults": dict(Counter(f["kind"] for f in soak.faults if not f.get("not_a_fault"))), **checks,
                      "restarts": restarts, "resubmits": len(soak.jobs) - 1, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
