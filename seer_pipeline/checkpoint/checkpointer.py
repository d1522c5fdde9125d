"""Sharded DCP checkpoints that own their policy: when to save, what to keep, what to resume.

Layout: RUN/checkpoints/step_{step:09d}/ (DCP files + meta.json), RUN/checkpoints/latest (a text
file naming the step dir). A save goes to `step_X.partial/`. Each rank fsyncs, sizes and hashes
the files it wrote before DCP's final collective (safe_dcp.HashingFileSystemWriter); rank 0 then
only commits: meta.json (sizes, hashes, config, world size), rename to `step_X/`, `latest`
replaced atomically. A kill -9 at any moment leaves either a `.partial` folder (ignored, later
deleted) or a complete one. Old checkpoints are purged by renaming them aside and deleting them
in a background thread, never inside a step and never in a preemption save.

The policy: `after_step(step, last=, preempted=)` is the loop's one call per step and decides
periodic (`ckpt.every`, async when `ckpt.async`), final (`ckpt.save_final`) and preemption saves.

State comes from components (torchtitan's shape): each owner registers a `Stateful` once,
`ckpt.register("queue", queue_state, per_rank=True)`, and the checkpointer collects them on save
and hands them back on load. Global components (`model`, `optim`, `train`) are DCP entries,
sharded and reshardable. Per-rank components (`rng`, `loader`, `queue`, `metrics`) are packed
together into one `rank{r}` entry per rank: DCP keeps a single copy of a key every rank writes,
so a shared key would give every rank rank 0's RNG on load (checked with torch 2.13 DCP on 2 gloo
ranks). A per-rank component's `load_state_dict` receives a list with one item per saved rank:
its own rank's state and rank 0's in full, every other rank's rebuilt from rank 0's plus that
rank's `summary` keys (registered with the component; gathered on rank 0 at each save) or None
when it has none. A rank thus opens a fixed number of files on resume whatever the world size,
and each component still decides what a change of world size means (the loader redistributes
the epoch from every rank's progress; RNG and queue start afresh with a log line).

Per-rank payloads are tensors and plain values read with weights_only=True (safe_dcp.pack/unpack),
DCP's .metadata goes through a restricted unpickler (safe_dcp), and every file's SHA-256 is recorded
in meta.json and checked before a load (integrity), each rank checking a share of the files.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from seer_pipeline.checkpoint import integrity, safe_dcp
from seer_pipeline.checkpoint.layout import (
    TRASH,
    CheckpointError,
    candidate_order,
    discard,
    empty_trash,
    list_checkpoints,
    read_meta_only,
    step_dir_name,
    verify_share,
)
from seer_pipeline.checkpoint.safe_dcp import pack, unpack
from seer_pipeline.config.train import CkptConfig
from seer_pipeline.core.io_utils import atomic_write_json, atomic_write_text, fsync_dir
from seer_pipeline.distributed.setup import collective_device

log = logging.getLogger(__name__)

_SUMMARIES = "rank_summaries"  # DCP entry (rank 0's) and meta.json flag: every rank's summary keys


def _one_line(e: BaseException) -> str:
    """The cause of a failed load in one log line (DCP wraps it with every rank's traceback)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:500]


def pinned_stager() -> DefaultStager | None:
    """On CUDA, the async save's staging copies into pinned CPU buffers kept from one save to
    the next (keyed by the source storages, which FSDP2 shards and optimizer states keep for the
    whole run), as torchtitan does, instead of a fresh pageable copy per save (9.6 GB per rank
    every save for seer_10b, issue #20). The copy itself stays on the caller's thread, before
    the next step may change the parameters. None on CPU: there DCP's default staging copy is a
    plain memcpy with nothing to pin (docs/benchmarks.md measures what it blocks)."""
    if not torch.cuda.is_available():
        return None
    return DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=True))


def ckpt_config(**values: Any) -> CkptConfig:
    """`CkptConfig(**values)`, spelled so that `async` (a keyword) reads as one."""
    return CkptConfig(**values)


class Checkpointer:
    """Owns the save policy: periodic (`every`), final (`save_final`) and preemption saves, each
    decided in `after_step`, which the loop calls once per step; keeps the latest K plus every
    Mth step. `cfg` is the run's `ckpt` section (CkptConfig or its DictConfig)."""

    def __init__(self, run_dir: str | Path, cfg: CkptConfig, *, rank: int = 0, world_size: int = 1,
                 config_yaml: str = "", timeout_s: float = 600.0) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.every, self.keep_latest = int(cfg.every), int(cfg.keep_latest)
        self.keep_every, self.save_final = int(cfg.keep_every), bool(cfg.save_final)
        self.async_save = bool(getattr(cfg, "async"))
        self.rank, self.world = rank, world_size
        self.config_yaml = config_yaml
        self._pending: tuple[Any, int, Path, float, Any] | None = None
        self._group = None
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        if self.async_save and dist.is_initialized():
            # async_save on the default group crashes if training collectives run during the
            # save (SIGABRT, size mismatch; torch 2.13 on gloo): the background save gets its own gloo group.
            self._group = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout_s))
        self._stager = pinned_stager() if self.async_save else None
        self.last_save_s: float | None = None
        self.saved_step = -1
        self._global: dict[str, Stateful] = {}
        self._ranked: dict[str, Stateful] = {}
        self._summary: dict[str, tuple[str, ...]] = {}
        self._prepare: list[tuple[Callable[[], None], Callable[[], None] | None]] = []
        self._purger: threading.Thread | None = None

    # -- components ---------------------------------------------------------------------------
    def register(self, name: str, component: Stateful, per_rank: bool = False,
                 summary: tuple[str, ...] = ()) -> None:
        """Add a component whose state every checkpoint carries (see the module docstring).

        `summary`: keys of a per-rank state that every rank needs from every other rank on a
        resume (the loader's progress); they travel in one small entry, so a rank never opens
        another rank's file for them.
        """
        if name in self._global or name in self._ranked or name in ("config",) or name.startswith("rank"):
            raise ValueError(f"checkpoint component name {name!r} is taken or reserved")
        (self._ranked if per_rank else self._global)[name] = component
        if summary:
            self._summary[name] = tuple(summary)

    def before_save(self, fn: Callable[[], None], after: Callable[[], None] | None = None) -> None:
        """Run `fn` (collective, e.g. averaging BN statistics) on every rank before each save,
        and `after` once the save holds its copy (written, or staged when asynchronous), also
        when the save failed: what `fn` changed for the save never outlives it. The `after`s
        run in reverse order of registration, so each sees the state its own `fn` left."""
        self._prepare.append((fn, after))

    def collect(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(global state for DCP, this rank's per-rank state) from the registered components."""
        return ({k: c.state_dict() for k, c in self._global.items()},
                {k: c.state_dict() for k, c in self._ranked.items()})

    def restore(self, check_meta: Callable[[dict[str, Any]], None] | None = None) -> int | None:
        """Collective: load the newest loadable checkpoint into the registered components.

        `check_meta(meta)` runs before a checkpoint is read (e.g. to refuse a changed config
        with a clear message); returns the step restored, or None when there is no checkpoint.
        """
        got = self.load_latest(lambda: self.collect()[0], check_meta)
        if got is None:
            return None
        step, state, per_rank, _ = got
        for k, c in self._global.items():
            c.load_state_dict(state[k])
        for k, c in self._ranked.items():
            c.load_state_dict([p.get(k) if isinstance(p, dict) else None for p in per_rank])
        self.saved_step = step
        return step

    # -- policy -------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def after_step(self, step: int, *, last: bool, preempted: bool) -> float | None:
        """The loop's one call per step: finish a background save that is done, then save if
        the policy says so. A preemption save is synchronous, waits for any save in flight and
        purges nothing (the next job's first commit does); the final save (`last`, when
        `save_final`) is synchronous too; a periodic one is asynchronous when `async` is set.
        Returns the seconds the save blocked the caller, or None when nothing was saved."""
        self.poll()
        if preempted:
            secs = self.save(step, blocking=True, purge=False)
            self.wait(purge=False)  # a periodic async save of this very step may be in flight
            return secs
        if last:
            secs = self.save(step, blocking=True) if self.save_final else None
            self.wait()
            self.join_purge()
            return secs
        if self.due(step):
            return self.save(step, blocking=not self.async_save)
        return None

    def _keep(self, step: int, newest: list[int]) -> bool:
        return step in newest or (self.keep_every > 0 and step % self.keep_every == 0)

    def purge(self) -> None:
        """Rank 0: move old checkpoints and stale `.partial` folders aside (one rename each, so
        the step is not held up) and delete them in a background thread. Never `latest`."""
        if self.rank != 0:
            return
        done = list_checkpoints(self.dir)
        newest = [s for s, _ in done[: self.keep_latest]]
        victims = [p for s, p in done if not self._keep(s, newest)]
        if self._pending is None:  # no save of ours in flight: every .partial is a dead one
            victims += list(self.dir.glob("*.partial"))
        for p in victims:
            discard(p)
        self.join_purge(timeout=0.0)
        if self._purger is None and any(self.dir.glob(TRASH + "*")):
            self._purger = threading.Thread(target=empty_trash, args=(self.dir,), daemon=True,
                                            name="ckpt-purge")
            self._purger.start()

    def join_purge(self, timeout: float | None = None) -> None:
        """Wait for the background purge (at the end of a run, so its deletions complete)."""
        if self._purger is not None:
            self._purger.join(timeout)
            if not self._purger.is_alive():
                self._purger = None

    # -- saving -------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any] | None = None,
             per_rank: dict[str, Any] | None = None, blocking: bool = True,
             purge: bool = True) -> float:
        """Collective: write `state` + this rank's `per_rank` entry for `step` (both default to
        the registered components'). Returns seconds spent blocking the caller (the whole save
        when synchronous, the staging when async); 0 when `step` is already saved."""
        if step == self.saved_step:  # e.g. a finished run started again: nothing new
            return 0.0
        t0 = time.monotonic()
        self.wait()  # one save in flight at a time
        undo = []
        try:
            for fn, after in self._prepare:
                fn()
                if after is not None:
                    undo.append(after)
            return self._save(step, state, per_rank, blocking, purge, t0)
        finally:
            for after in reversed(undo):  # nested: the last change made is the first undone
                after()

    def _save(self, step: int, state: dict[str, Any] | None, per_rank: dict[str, Any] | None,
              blocking: bool, purge: bool, t0: float) -> float:
        if state is None:
            state, mine = self.collect()
            per_rank = mine if per_rank is None else per_rank
        per_rank = {} if per_rank is None else per_rank
        self.saved_step = step
        tmp = self.dir / (step_dir_name(step) + ".partial")
        if self.rank == 0:
            if tmp.exists():
                discard(tmp)  # a dead save of this step (kill -9): aside, deleted later
            tmp.mkdir(parents=True)
        full = self.full_state(state, per_rank, self._gather_summaries(per_rank))
        writer = safe_dcp.HashingFileSystemWriter(tmp)
        if not blocking:
            fut = dcp.async_save(full, checkpoint_id=str(tmp), process_group=self._group,
                                 storage_writer=writer, async_stager=self._stager,
                                 no_dist=not dist.is_initialized())
            fut = getattr(fut, "upload_completion", fut)
            self._pending = (fut, step, tmp, t0, writer)
            return time.monotonic() - t0
        dcp.save(full, checkpoint_id=str(tmp), storage_writer=writer, no_dist=not dist.is_initialized())
        self._finalize(step, tmp, t0, writer.files, purge=purge)
        return time.monotonic() - t0

    def _gather_summaries(self, per_rank: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Collective (also the barrier that orders rank 0's mkdir before any write): every
        rank's summary keys, gathered on rank 0."""
        mine = {n: {k: per_rank[n][k] for k in keys if k in per_rank[n]}
                for n, keys in self._summary.items() if isinstance(per_rank.get(n), dict)}
        if not dist.is_initialized():
            return [mine]
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, out, dst=0, group=self._group)
        return out

    def full_state(self, state: dict[str, Any], per_rank: dict[str, Any],
                   summaries: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The dict this rank hands DCP: global state, its own packed `rank{r}` entry and, from
        rank 0, every rank's summary (`rank_summaries`)."""
        full = dict(state)
        full[f"rank{self.rank}"] = pack(per_rank)
        if self.rank == 0 and summaries is not None:
            full[_SUMMARIES] = pack(summaries)
        full["config"] = self.config_yaml
        return full

    def poll(self) -> None:
        """Finalize a finished background save (call once per step)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self, purge: bool = True) -> None:
        """Block until the background save (if any) is written and visible."""
        if self._pending is None:
            return
        fut, step, tmp, t0, writer = self._pending
        self._pending = None
        fut.result()
        self._finalize(step, tmp, t0, writer.files, purge=purge)

    def _finalize(self, step: int, tmp: Path, t0: float, files: dict[str, tuple[int, str]],
                  purge: bool = True) -> None:
        """Rank 0's commit: meta.json, rename, `latest`. DCP returns only after its final
        collective, and each rank fsynced and hashed its own files before it (safe_dcp), so
        `files` (sizes and hashes from the write results) is complete and nothing is re-read."""
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world, "time": time.time(),
                    "files": {n: size for n, (size, _) in files.items()},
                    integrity.HASH: {n: h for n, (_, h) in files.items()},
                    "config_yaml": self.config_yaml, _SUMMARIES: True}
            atomic_write_json(tmp / "meta.json", meta)
            final = self.dir / step_dir_name(step)
            if final.exists():
                discard(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            atomic_write_text(self.dir / "latest", final.name + "\n")
            if purge:
                self.purge()
        self.last_save_s = time.monotonic() - t0
        log.info("checkpoint step %d saved in %.2fs", step, self.last_save_s)

    # -- loading ------------------------------------------------------------------------------
    def _next_candidate(self, order: list[Path]) -> tuple[int, str, dict[str, Any]] | None:
        """Rank 0 (or any rank without a process group): pop candidates until one has a valid
        meta.json. Only meta.json is opened here; each rank checks its share of files later."""
        while order:
            p = order.pop(0)
            try:
                meta = read_meta_only(p)
                return int(meta["step"]), p.name, meta
            except (CheckpointError, ValueError, OSError) as e:
                log.warning("skipping checkpoint %s: %s", p, e)
        return None

    def load_latest(
        self, make_state: Callable[[], dict[str, Any]],
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[int, dict[str, Any], list[Any], dict[str, Any]] | None:
        """Collective: load the newest loadable checkpoint into `make_state()`'s tensors.

        Returns (step, state, per-rank entries of ALL saved ranks, meta) or None when there is
        none. A checkpoint that fails to load on any rank is skipped for the previous one.

        What a rank opens does not grow with the world size: rank 0 reads `latest` and
        meta.json and broadcasts them; each rank checks its share of the files, reads DCP's
        .metadata, its own shards and its own `rank{r}` entry, and rank 0's entry plus
        `rank_summaries` (in rank 0's file). Another rank's entry is rebuilt from rank 0's with
        that rank's summary keys laid over it; ranks' other per-rank state is None. Checkpoints
        saved before summaries existed are read the old way (every rank's entry).
        """
        distributed = dist.is_initialized()
        lead = self.rank == 0 or not distributed
        order = candidate_order(self.dir) if lead else []
        while True:
            cand = self._next_candidate(order) if lead else None
            if distributed:
                obj = [cand]
                dist.broadcast_object_list(obj, src=0, device=collective_device())
                cand = obj[0]
            if cand is None:
                return None
            step, name, meta = cand
            path = self.dir / name
            if check_meta is not None:
                check_meta(meta)  # raises on every rank alike: their configs are one config
            ok, err = True, ""
            state: dict[str, Any] = {}
            per_rank: list[Any] = []
            try:
                old_world = int(meta["world_size"])
                summarized = bool(meta.get(_SUMMARIES))
                wanted = ({0, self.rank} & set(range(old_world))) if summarized else set(range(old_world))
                state = make_state()
                for r in sorted(wanted):
                    state[f"rank{r}"] = b""
                if summarized:
                    state[_SUMMARIES] = b""
                state["config"] = ""
                verify_share(path, meta, self.rank, self.world)
                safe_dcp.load(state, path, no_dist=not distributed)
                per_rank = [unpack(state.pop(f"rank{r}")) if r in wanted else None
                            for r in range(old_world)]
                if summarized:
                    per_rank = _fill_from_summaries(per_rank, unpack(state.pop(_SUMMARIES)))
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed on below
                # (DCP's CheckpointException derives from BaseException, not Exception)
                ok, err = False, _one_line(e)
            if distributed:
                flag = torch.tensor([0 if ok else 1], device=collective_device())
                dist.all_reduce(flag)
                ok = ok and int(flag) == 0
            if not ok:
                log.warning("skipping checkpoint %s: it could not be loaded (%s); trying the previous one",
                            path, err or "failed on another rank")
                continue
            log.info("loaded checkpoint %s (step %d, saved by %d rank(s))", path, step, meta["world_size"])
            return step, state, per_rank, meta


def _fill_from_summaries(per_rank: list[Any], summaries: list[dict[str, Any]]) -> list[Any]:
    """Rank r's entry where it was not read: for each component with summary keys, rank 0's
    state with rank r's summary laid over it (the keys that differ between ranks)."""
    if len(summaries) != len(per_rank):
        raise CheckpointError(f"rank_summaries holds {len(summaries)} ranks, meta.json {len(per_rank)}")
    base = per_rank[0] if isinstance(per_rank[0], dict) else {}
    out = list(per_rank)
    for r, summ in enumerate(summaries):
        if out[r] is None:
            out[r] = {n: {**base[n], **keys} for n, keys in summ.items()
                      if isinstance(base.get(n), dict)}
    return out
