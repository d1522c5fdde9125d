"""`seer-train --config PRESET [key=value ...]`: one entry for every launcher.

Under torchrun, SLURM (srun) or submitit the rank comes from the environment
(seer_pipeline.dist.setup.resolve_env). Run alone with `dist.nproc=N > 1`, it spawns N local
ranks (fresh processes with RANK/WORLD_SIZE/... set), forwards SIGUSR2/SIGTERM/SIGINT to them and
fails if any rank fails, killing the rest. Exit codes: 0 done, signals.PREEMPTED (75) saved on a
signal (re-run the same command to resume), 1 error, 2 bad config.
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

import torch

from seer_pipeline.config.base import ConfigError
from seer_pipeline.config.train import load_train_config
from seer_pipeline.core.logging_utils import setup_logging
from seer_pipeline.dist.setup import (DistEnvError, cleanup_distributed, free_port, init_distributed,
                                      resolve_env)
from seer_pipeline.train.signals import PREEMPTED, forward_signals

log = logging.getLogger("seer_pipeline.train.cli")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="seer-train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="preset name under seer_pipeline/config/presets or a .yaml")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def spawn_local(argv: list[str], nproc: int, threads: int, grace_s: float = 15.0) -> int:
    """Run this command on `nproc` local ranks; first failure wins, the rest are killed.

    After a rank fails the others get `grace_s` to notice on their own (their collectives fail
    within dist.timeout_s and they log which step failed) before they are killed.
    """
    port = free_port()
    procs: list[subprocess.Popen] = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(threads))
        procs.append(subprocess.Popen([sys.executable, "-m", "seer_pipeline.train.cli", *argv], env=env))
    old = forward_signals(lambda: procs)
    failed_at: float | None = None
    first_bad: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            for r, p in enumerate(procs):
                rc = p.poll()
                if rc not in (None, 0, PREEMPTED) and first_bad is None:
                    first_bad, failed_at = (r, rc), time.monotonic()
                    log.error("rank %d failed (exit code %s); stopping the other ranks", r, rc)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            _signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if first_bad is not None:
        log.error("job failed: rank %d exited with %s (all exit codes: %s)", *first_bad, codes)
        return first_bad[1] if first_bad[1] > 0 else 1
    if all(c == 0 for c in codes):
        return 0
    if all(c in (0, PREEMPTED) for c in codes):
        return PREEMPTED
    return 1


def run_rank(cfg, denv) -> int:  # noqa: ANN001 - DictConfig, DistEnv
    """One rank: threads first, then logging, process group, trainer."""
    torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    setup_logging(denv.rank, os.path.join(cfg.run.dir, "logs"))
    if cfg.dist.nproc != denv.world_size and denv.source != "torchrun":
        log.info("world size %d from %s (dist.nproc=%d applies to local spawns only)",
                 denv.world_size, denv.source, cfg.dist.nproc)
    try:
        device = init_distributed(denv, cfg.dist.timeout_s, cfg.dist.backend or None)
        # lazy: the trainer's stack (models, loader, numba kernels) loads in ranks only, never in the
        # parent that spawns dist.nproc ranks and waits
        from seer_pipeline.train.trainer import Trainer

        return Trainer(cfg, denv, device).train()
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        if torch.distributed.is_initialized() and any(
                k in msg for k in ("Connection", "connection", "Timeout", "timed out", "closed", "peer")):
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        denv = resolve_env()
    except (ConfigError, DistEnvError) as e:
        print(f"seer-train: {e}", file=sys.stderr)
        return 2
    if not cfg.data.shards:
        print("seer-train: data.shards is empty: pass data.shards=DIR (a `seer-shards build` output "
              "folder) or a shard pattern", file=sys.stderr)
        return 2
    if denv.source == "single" and cfg.dist.nproc > 1:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s launcher: %(message)s")
        return spawn_local(list(argv if argv is not None else sys.argv[1:]), cfg.dist.nproc,
                           cfg.train.threads, grace_s=cfg.dist.timeout_s + 10)
    return run_rank(cfg, denv)


if __name__ == "__main__":
    sys.exit(main())
