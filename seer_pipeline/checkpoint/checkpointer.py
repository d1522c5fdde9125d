"""Sharded DCP checkpoints that own their policy: when to save, what to keep, what to resume.

Layout: RUN/checkpoints/step_{step:09d}/ (DCP files + meta.json), RUN/checkpoints/latest (a text
file naming the step dir). A save goes to `step_X.partial/`; once every rank finished writing
(DCP's final collective), rank 0 writes meta.json (file sizes, config, world size), renames the
folder to `step_X/` and only then replaces `latest` atomically. A kill -9 at any moment leaves
either a `.partial` folder (ignored, later deleted) or a complete one.

State comes from components (torchtitan's shape): each owner registers a `Stateful` once,
`ckpt.register("queue", queue_state, per_rank=True)`, and the checkpointer collects them on save
and hands them back on load. Global components (`model`, `optim`, `train`) are DCP entries,
sharded and reshardable. Per-rank components (`rng`, `loader`, `queue`, `metrics`) are packed
together into one `rank{r}` entry per rank: DCP keeps a single copy of a key every rank writes,
so a shared key would give every rank rank 0's RNG on load (checked with torch 2.13 DCP on 2 gloo ranks). A per-rank
component's `load_state_dict` receives the list of EVERY saved rank's state (index = saved
rank; None where that rank saved nothing under its name), so it decides itself what a change of
world size means (the loader redistributes the epoch; RNG and queue start afresh with a log line).
This is the on-disk layout of earlier checkpoints too, which therefore still load.

Per-rank payloads are tensors and plain values read with weights_only=True (safe_dcp.pack/unpack),
DCP's .metadata goes through a restricted unpickler (safe_dcp), and every file's SHA-256 is recorded
in meta.json and checked before a load (integrity).
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from seer_pipeline.checkpoint import integrity, safe_dcp
from seer_pipeline.checkpoint.safe_dcp import pack, unpack  # noqa: F401 - the payload format
from seer_pipeline.core.io_utils import atomic_write_json, atomic_write_text, fsync_dir
from seer_pipeline.dist.setup import collective_device

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def verify_step_dir(path: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint, after checking every file's recorded size."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no meta.json (incomplete save)")
    meta = integrity.read_meta(path)
    for name, size in meta["files"].items():
        f = path / name
        if "/" in name or not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} missing or truncated (expected {size} bytes)")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no DCP .metadata")
    return meta


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking step dirs (by name), newest first."""
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(out, reverse=True)


def find_resumable(ckpt_dir: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """Verified checkpoints to try, best first: `latest`'s target, then older ones.

    Corrupt or incomplete ones are skipped with a warning in favour of the previous one.
    """
    order = [p for _, p in list_checkpoints(ckpt_dir)]
    name = integrity.read_latest(ckpt_dir)
    if name:
        target = ckpt_dir / name
        if target in order:  # the pointer's target first, then anything older
            idx = order.index(target)
            order = order[idx:]
        else:
            log.warning("checkpoints/latest names %r, which does not exist; scanning", name)
    good = []
    for p in order:
        try:
            meta = verify_step_dir(p)
        except (CheckpointError, ValueError, OSError) as e:
            log.warning("skipping checkpoint %s: %s", p, e)
            continue
        good.append((int(meta["step"]), p, meta))
    return good


def _one_line(e: BaseException) -> str:
    """The cause of a failed load in one log line (DCP wraps it with every rank's traceback)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:500]


class Checkpointer:
    """Saves every `every` steps (and on demand), keeps the latest K plus every Mth step."""

    def __init__(
        self, run_dir: str | Path, *, every: int, keep_latest: int = 2, keep_every: int = 0,
        async_save: bool = False, rank: int = 0, world_size: int = 1,
        config_yaml: str = "", timeout_s: float = 600.0,
    ) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.every, self.keep_latest, self.keep_every = every, keep_latest, keep_every
        self.async_save = async_save
        self.rank, self.world = rank, world_size
        self.config_yaml = config_yaml
        self._pending: tuple[Any, int, Path, float] | None = None
        self._group = None
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        if async_save and dist.is_initialized():
            # async_save on the default group crashes if training collectives run during the
            # save (SIGABRT, size mismatch; torch 2.13 on gloo): the background save gets its own gloo group.
            self._group = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout_s))
        self.last_save_s: float | None = None
        self._global: dict[str, Stateful] = {}
        self._ranked: dict[str, Stateful] = {}

    # -- components ---------------------------------------------------------------------------
    def register(self, name: str, component: Stateful, per_rank: bool = False) -> None:
        """Add a component whose state every checkpoint carries (see the module docstring)."""
        if name in self._global or name in self._ranked or name in ("config",) or name.startswith("rank"):
            raise ValueError(f"checkpoint component name {name!r} is taken or reserved")
        (self._ranked if per_rank else self._global)[name] = component

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
        return step

    # -- policy -------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def _keep(self, step: int, newest: list[int]) -> bool:
        return step in newest or (self.keep_every > 0 and step % self.keep_every == 0)

    def purge(self) -> None:
        """Rank 0: delete old checkpoints and stale `.partial` folders (never `latest`)."""
        if self.rank != 0:
            return
        done = list_checkpoints(self.dir)
        newest = [s for s, _ in done[: self.keep_latest]]
        for s, p in done:
            if not self._keep(s, newest):
                shutil.rmtree(p, ignore_errors=True)
        if self._pending is None:
            for p in self.dir.glob("*.partial"):
                shutil.rmtree(p, ignore_errors=True)

    # -- saving -------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any] | None = None,
             per_rank: dict[str, Any] | None = None, blocking: bool = True) -> float:
        """Collective: write `state` + this rank's `per_rank` entry for `step` (both default to
        the registered components'). Returns seconds spent blocking the caller (the whole save
        when synchronous, the staging when async)."""
        t0 = time.monotonic()
        if state is None:
            state, mine = self.collect()
            per_rank = mine if per_rank is None else per_rank
        per_rank = {} if per_rank is None else per_rank
        self.wait()  # one save in flight at a time
        tmp = self.dir / (step_dir_name(step) + ".partial")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if dist.is_initialized():
            dist.barrier()
        full = dict(state)
        full[f"rank{self.rank}"] = pack(per_rank)
        full["config"] = self.config_yaml
        if self.async_save and blocking is False:
            fut = dcp.async_save(full, checkpoint_id=str(tmp), process_group=self._group,
                                 storage_writer=safe_dcp.HashingFileSystemWriter(tmp),
                                 no_dist=not dist.is_initialized())
            fut = getattr(fut, "upload_completion", fut)
            self._pending = (fut, step, tmp, t0)
            return time.monotonic() - t0
        dcp.save(full, checkpoint_id=str(tmp), storage_writer=safe_dcp.HashingFileSystemWriter(tmp),
                 no_dist=not dist.is_initialized())
        self._finalize(step, tmp, t0)
        return time.monotonic() - t0

    def poll(self) -> None:
        """Finalize a finished background save (call once per step)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the background save (if any) is written and visible."""
        if self._pending is None:
            return
        fut, step, tmp, t0 = self._pending
        self._pending = None
        fut.result()
        self._finalize(step, tmp, t0)

    def _finalize(self, step: int, tmp: Path, t0: float) -> None:
        # DCP returns only after its final collective (metadata written by the coordinator),
        # so every rank's files are complete when rank 0 gets here.
        if self.rank == 0:
            hashes = integrity.collect_hashes(tmp)
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            for p in tmp.iterdir():
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            meta = {"step": step, "world_size": self.world, "time": time.time(), "files": files,
                    integrity.HASH: hashes, "config_yaml": self.config_yaml}
            atomic_write_json(tmp / "meta.json", meta)
            final = self.dir / step_dir_name(step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            atomic_write_text(self.dir / "latest", final.name + "\n")
            self.purge()
        self.last_save_s = time.monotonic() - t0
        log.info("checkpoint step %d saved in %.2fs", step, self.last_save_s)

    # -- loading ------------------------------------------------------------------------------
    def load_latest(
        self, make_state: Callable[[], dict[str, Any]],
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[int, dict[str, Any], list[Any], dict[str, Any]] | None:
        """Collective: load the newest loadable checkpoint into `make_state()`'s tensors.

        Returns (step, state, per-rank entries of ALL saved ranks, meta) or None when there is
        none. A checkpoint that fails to load on any rank is skipped for the previous one.
        """
        cands = find_resumable(self.dir)
        steps = [s for s, _, _ in cands]
        if dist.is_initialized():  # every rank must try the same checkpoints in the same order
            obj = [steps]
            dist.broadcast_object_list(obj, src=0, device=collective_device())
            steps = obj[0]
            cands = [c for c in cands if c[0] in steps] if self.rank != 0 else cands
        by_step = {s: (p, m) for s, p, m in cands}
        for s in steps:
            path, meta = by_step.get(s, (self.dir / step_dir_name(s), None))
            if check_meta is not None:
                try:
                    seen = meta or verify_step_dir(path)
                except (CheckpointError, ValueError, OSError):
                    seen = None  # unreadable here: the load below fails and all ranks agree on it
                if seen is not None:
                    check_meta(seen)  # raises on every rank alike: their configs are one config
            ok, err = True, ""
            state: dict[str, Any] = {}
            try:
                meta = meta or verify_step_dir(path)
                state = make_state()
                old_world = int(meta["world_size"])
                for r in range(old_world):
                    state[f"rank{r}"] = b""
                state["config"] = ""
                integrity.verify_hashes(path, meta, self.rank, self.world)  # this rank's share
                safe_dcp.load(state, path, no_dist=not dist.is_initialized())
                per_rank = [unpack(state.pop(f"rank{r}")) for r in range(old_world)]
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed on below
                # (DCP's CheckpointException derives from BaseException, not Exception)
                ok, err = False, _one_line(e)
            if dist.is_initialized():
                flag = torch.tensor([0 if ok else 1], device=collective_device())
                dist.all_reduce(flag)
                ok = ok and int(flag) == 0
            if not ok:
                log.warning("checkpoint %s could not be loaded (%s); trying the previous one",
                            path, err or "failed on another rank")
                continue
            log.info("loaded checkpoint %s (step %d, saved by %d rank(s))", path, s, meta["world_size"])
            return s, state, per_rank, meta
        return None
