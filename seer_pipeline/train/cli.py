"""`seer-train --config PRESET [key=value ...]`: one entry for every launcher.

Under torchrun, SLURM (srun) or submitit the rank comes from the environment
(seer_pipeline.distributed.setup.resolve_env). Run alone with `dist.nproc=N > 1`, it spawns N local
ranks (fresh processes with RANK/WORLD_SIZE/... set), forwards SIGUSR2/SIGTERM/SIGINT to them and
fails if any rank fails, killing the rest. Exit codes: 0 done, exit_codes.PREEMPTED (75) saved
on a signal (re-run the same command to resume), 1 error, exit_codes.USAGE (2) bad config,
runlock.LOCKED_EXIT (73) another job holds run.dir (seer_pipeline.core.runlock; nothing in the
folder was touched).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal as _signal
import subprocess
import sys
import time
from typing import Sequence

from seer_pipeline.config.base import ConfigError
from seer_pipeline.config.train import check_resume_compatible, load_train_config
from seer_pipeline.core import runlock
from seer_pipeline.core.exit_codes import INTERRUPTED, PREEMPTED, USAGE
from seer_pipeline.core.runlock import TOKEN_ENV
from seer_pipeline.core.shard_check import is_pattern, local_shards_problem
from seer_pipeline.distributed.setup import DistEnvError, free_port, peer_lost, resolve_env
from seer_pipeline.train.signals import forward_signals

log = logging.getLogger("seer_pipeline.train.cli")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="seer-train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="preset name under seer_pipeline/config/presets or a .yaml")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_intermixed_args(argv)


def spawn_local(argv: list[str], nproc: int, threads: int, grace_s: float = 15.0,
                lock_token: str = "") -> int:
    """Run this command on `nproc` local ranks; first failure wins, the rest are killed.

    After a rank fails the others get `grace_s` to notice on their own (their collectives fail
    within dist.timeout_s and they log which step failed) before they are killed.

    The ranks get their own process group, so a terminal's Ctrl-C reaches this launcher alone and
    each rank sees exactly one SIGINT (forwarded): it saves at the next step and exits 75. A
    second Ctrl-C kills the ranks at once (exit 130, nothing saved beyond earlier checkpoints).
    """

    port = free_port()
    procs: list[subprocess.Popen] = []
    cmd = [sys.executable, "-m", "seer_pipeline.train.cli"]
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(threads))
        env[TOKEN_ENV] = lock_token  # this launcher holds run.dir's lock; its ranks join it
        procs.append(subprocess.Popen([*cmd, *argv], env=env, process_group=0))
    old = forward_signals(lambda: procs)
    forward = _signal.getsignal(_signal.SIGINT)
    interrupts = 0

    def on_interrupt(signum: int, frame) -> None:  # noqa: ANN001 - a signal frame
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("seer-train: Ctrl-C: saving at the next step, then exiting (75); Ctrl-C again "
                  "aborts without saving", file=sys.stderr, flush=True)
            forward(signum, frame)  # type: ignore[operator]
        else:
            print("seer-train: second Ctrl-C: aborting without saving", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.kill()

    _signal.signal(_signal.SIGINT, on_interrupt)
    # In their own process group the ranks no longer get the terminal's SIGHUP: a closed terminal
    # becomes a SIGTERM to them (save, exit 75) instead of orphans training on.
    old_hup = _signal.signal(_signal.SIGHUP, lambda signum, frame: forward(_signal.SIGTERM, frame))
    failed_at: float | None = None
    first_bad: tuple[int, int] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, rc) for r, rc in enumerate(codes) if rc not in (None, 0, PREEMPTED)]
            if bad and first_bad is None and interrupts < 2:
                # Two found dead in one poll: a rank killed by a signal is the cause, a rank that
                # exited by itself (its collective failed) reacted to it.
                first_bad, failed_at = min(bad, key=lambda b: (b[1] >= 0, b[0])), time.monotonic()
                log.error("rank %d failed (exit code %s); stopping the other ranks", *first_bad)
            if None not in codes:  # after the check: the last ranks may end within one poll
                break
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            _signal.signal(s, h)
        _signal.signal(_signal.SIGHUP, old_hup)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if interrupts >= 2:
        return INTERRUPTED
    if first_bad is not None:
        log.error("job failed: rank %d exited with %s (all exit codes: %s)", *first_bad, codes)
        return first_bad[1] if first_bad[1] > 0 else 1
    if all(c == 0 for c in codes):
        return 0
    if all(c in (0, PREEMPTED) for c in codes):
        return PREEMPTED
    return 1


def shards_problem(spec: str) -> str:
    """Why data.shards cannot be read ('' when it can), checked before anything is started or
    created: a missing folder would otherwise surface seconds later, on every rank, as a
    resampled-mode complaint. Remote sets (s3://, https://) are left to the loader."""
    problem = local_shards_problem(spec)
    if problem or "://" in spec or not is_pattern(spec):
        return problem
    from seer_pipeline.shards.reader import expand_pattern  # torch-free; only for patterns

    try:
        paths = [sh.path for sh in expand_pattern(spec)]
    except ValueError as e:
        return f"data.shards={spec}: {e}"
    bad = [p for p in paths if not os.access(p, os.R_OK)]
    if bad:
        return (f"data.shards={spec}: {len(bad)} of {len(paths)} shard file(s) missing or "
                f"unreadable, first: {bad[0]}")
    return ""


def resume_problem(cfg) -> str:  # noqa: ANN001 - DictConfig
    """Why this command cannot continue the run in run.dir ('' when it can or there is none).

    Read from RUN/config.yaml (written at each start) once RUN/checkpoints/latest exists, in the
    launcher: one line instead of the same refusal as a traceback from every rank."""
    from omegaconf import OmegaConf  # loaded anyway by the config; kept with its only user here

    saved = os.path.join(cfg.run.dir, "config.yaml")
    if not (os.path.exists(os.path.join(cfg.run.dir, "checkpoints", "latest"))
            and os.path.exists(saved)):
        return ""
    try:
        check_resume_compatible(OmegaConf.to_container(OmegaConf.load(saved)), cfg)
    except ConfigError as e:
        return str(e)
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: the trainer's own check decides
        return ""
    return ""


def _lock_run_dir(cfg, denv, device) -> str:  # noqa: ANN001 - DictConfig, DistEnv, device
    """Rank 0 takes (or joins its launcher's) run folder lock; every rank learns the outcome.

    Imports torch here, not at module level: the parent of local ranks never loads it.
    Returns '' when this job owns run.dir, else the message to stop with. The lock lives as
    long as this process (module global), and the kernel frees it when the process dies.
    """
    import torch
    import torch.distributed as dist

    from seer_pipeline.core import runlock

    global _RUN_LOCK
    msg = ""
    if denv.rank == 0 and cfg.run.lock:
        try:
            _RUN_LOCK = runlock.acquire_or_join(cfg.run.dir)
        except (runlock.RunLocked, runlock.RunLockError) as e:
            msg = str(e)
    if dist.is_initialized():  # the other ranks must not touch the folder either
        flag = torch.tensor([1 if msg else 0], device=device)
        dist.all_reduce(flag)
        if int(flag) and not msg:
            msg = "rank 0 could not lock run.dir (another job holds it; see rank 0's message)"
    return msg


_RUN_LOCK = None


def run_rank(cfg, denv) -> int:  # noqa: ANN001 - DictConfig, DistEnv
    """One rank: threads, process group, run folder lock, then logging and the trainer.

    Imports torch and the trainer stack here: `seer-train`'s parent process only spawns ranks."""
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from seer_pipeline.distributed.parallelize import check_torch_version

    try:  # before any process group: every rank refuses alike, with one line
        check_torch_version()
    except RuntimeError as e:
        print(f"seer-train: {e}", file=sys.stderr)
        return USAGE
    torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    from seer_pipeline.core.logging_utils import setup_logging
    from seer_pipeline.core.runlock import LOCKED_EXIT
    from seer_pipeline.distributed.setup import cleanup_distributed, init_distributed

    logged = False
    try:
        device = init_distributed(denv, cfg.dist.timeout_s, cfg.dist.backend or None)
        # Before logging: the log files of a run folder another job owns are not ours to open.
        stop = _lock_run_dir(cfg, denv, device)
        if stop:
            print(f"seer-train: {stop}", file=sys.stderr)
            return LOCKED_EXIT
        setup_logging(denv.rank, os.path.join(cfg.run.dir, "logs"))
        logged = True
        if cfg.dist.nproc != denv.world_size and denv.source != "torchrun":
            log.info("world size %d from %s (dist.nproc=%d applies to local spawns only)",
                     denv.world_size, denv.source, cfg.dist.nproc)
        from seer_pipeline.train.trainer import Trainer

        return Trainer(cfg, denv, device).train()
    except ConfigError as e:  # e.g. a resume the checkpoint refuses: the message is the story
        log.error("rank %d: %s", denv.rank, e)
        return USAGE
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handlers were installed: one line
        print(f"seer-train: rank {denv.rank}: interrupted before training started; nothing "
              "saved", file=sys.stderr)
        return INTERRUPTED
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        if not logged:  # failed before the run folder's logs were set up
            print(f"seer-train: rank {denv.rank}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if torch.distributed.is_initialized() and peer_lost(e):
            log.error("rank %d: a collective failed (%s) - another rank probably died; see "
                      "%s/logs/rank*.log", denv.rank, e, cfg.run.dir)
        else:
            log.exception("rank %d failed", denv.rank)
        return 1
    finally:
        try:
            cleanup_distributed()
        except Exception:  # noqa: BLE001 - a dead peer can make teardown fail too
            pass
        global _RUN_LOCK
        if _RUN_LOCK is not None:
            _RUN_LOCK.release()
            _RUN_LOCK = None


def main(argv: Sequence[str] | None = None) -> int:
    """seer-train."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while reading the config or starting: nothing to save
        print("seer-train: interrupted (Ctrl-C) before training started; nothing saved", file=sys.stderr)
        return INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)

    try:
        cfg = load_train_config(args.config, args.overrides)
        denv = resolve_env()
    except (ConfigError, DistEnvError) as e:
        print(f"seer-train: {e}", file=sys.stderr)
        return USAGE
    if not cfg.data.shards:
        print("seer-train: data.shards is empty: pass data.shards=DIR (a `seer-shards build` output "
              "folder) or a shard pattern", file=sys.stderr)
        return USAGE
    problem = shards_problem(cfg.data.shards) or resume_problem(cfg)
    if problem:  # before the run folder, its lock or any rank exists
        print(f"seer-train: {problem}", file=sys.stderr)
        return USAGE
    if denv.source == "single" and cfg.dist.nproc > 1:
        token = ""
        if cfg.run.lock:  # the launcher holds the lock for its ranks, before any of them starts
            try:
                lock = runlock.acquire(cfg.run.dir)
            except (runlock.RunLocked, runlock.RunLockError) as e:
                print(f"seer-train: {e}", file=sys.stderr)
                return runlock.LOCKED_EXIT
            token = lock.token
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s launcher: %(message)s")
        try:
            return spawn_local(list(argv if argv is not None else sys.argv[1:]), cfg.dist.nproc,
                               cfg.train.threads, grace_s=cfg.dist.timeout_s + 10,
                               lock_token=token)
        finally:
            if token:
                lock.release()
    return run_rank(cfg, denv)


if __name__ == "__main__":
    sys.exit(main())
