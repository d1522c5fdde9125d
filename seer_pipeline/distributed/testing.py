"""Run a function on N gloo ranks in spawned processes: for tests and benchmarks.

`run_distributed(fn, world_size, *args)` spawns N processes, joins them into a gloo group on a
free port, calls `fn(rank, world_size, *args)` on each and returns the list of return values
(which must pickle). Any rank's exception fails the call with every rank's traceback; a rank
that hangs or dies is killed after `timeout` and reported by rank number.
"""
from __future__ import annotations

import datetime as _dt
import multiprocessing as mp
import os
import pickle
import queue as _queue
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from seer_pipeline.distributed.setup import free_port


class DistributedTestError(AssertionError):
    pass


def _worker(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, threads: int,
    pg_timeout_s: float, args: Sequence[Any], results: "mp.Queue[Any]", received: Any,
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        torch.set_num_threads(threads)
        if world_size > 0:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                world_size=world_size, timeout=_dt.timedelta(seconds=pg_timeout_s),
            )
        out = fn(rank, world_size, *args)
        # Try pickling here, not only in the queue's feeder thread: there an unpicklable result
        # is only printed, and the parent would wait for a report that never comes.
        pickle.dumps(out)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        # Tensors cross the queue as shared-memory handles that this process serves: it must
        # live until the parent has taken them (else the parent's get() ends in EOFError).
        received.wait(timeout=60)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0,
    threads: int = 1, pg_timeout_s: float = 120.0,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return per-rank results."""
    ctx = mp.get_context("spawn")
    results: "mp.Queue[Any]" = ctx.Queue()
    received = ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, port, threads, pg_timeout_s, args, results, received),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
                got[rank] = (ok, payload)
                if not ok:
                    # Peers of a failed rank usually block in a collective until the process
                    # group times out; a short grace is enough for them to report too.
                    deadline = min(deadline, time.monotonic() + 10.0)
            except _queue.Empty:
                # A rank that exited without reporting (segfault, os._exit, killed) never will;
                # give its queue a moment to flush, then stop waiting for it.
                silent = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in got]
                if silent:
                    try:
                        rank, ok, payload = results.get(timeout=2.0)
                        got[rank] = (ok, payload)
                        continue
                    except _queue.Empty:
                        break
    finally:
        received.set()
        for p in procs:
            p.join(timeout=5 if len(got) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = []
    for r in range(world_size):
        if r not in got:
            errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}; hung or died; "
                          f"timeout {timeout:.0f}s)")
        elif not got[r][0]:
            errors.append(f"rank {r} raised:\n{got[r][1]}")
    if errors:
        raise DistributedTestError("\n\n".join(errors))
    return [got[r][1] for r in range(world_size)]
