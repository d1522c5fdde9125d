"""The rank-level loader: endless epochs of multi-crop batches, with exact per-rank resume state.

Exact mode (a shard directory with manifest.json): every epoch covers the manifest once, split as
documented in `plan.py`; `state_dict()` records what the trainer consumed (epoch, batches, and per
worker the shuffle outputs behind the last consumed batch); `load_state_dict(all_ranks_states)`
continues batch for batch at the same world size / workers / batch size / buffer, and otherwise
hands the unconsumed remainder of the epoch (old dropped tail included) to the new ranks.
Resampled mode (a brace pattern or list): shards drawn with replacement, a fixed epoch length of
`epoch_samples`; no exact accounting is possible, so a resume restarts each worker's stream from a
seed that includes the resume point (deterministic, but not the stream an uninterrupted run reads).
"""
from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader

from seer_pipeline.config.crops import CROP_PRESETS
from seer_pipeline.config.data import DataConfig
from seer_pipeline.core.requeue import STOP_SIGNALS
from seer_pipeline.data.augment import MultiCrop, pil_flavour
from seer_pipeline.data.order import epoch_runs, remainder, runs_len, shuffle_order
from seer_pipeline.shards.reader import resolve_shards
from seer_pipeline.data.stream import COUNTERS, BatchMeta, EpochStream

log = logging.getLogger(__name__)
STATE_VERSION = 1


@contextmanager
def _workers_born_deaf() -> Iterator[None]:
    """Start DataLoader workers with the preemption signals blocked: a child inherits the mask.

    Ignoring them in worker_init_fn alone left a window: torch installs its own SIGTERM handler
    first (it kills the worker unless its parent sent the signal), and a preemption landing
    between the two killed the worker, the rank failed without its save and the requeued job
    resumed from the save before (a 2-rank SLURM test in CI; tests/test_loader.py holds the
    window open). Blocked, the signal stays pending until worker_init_fn ignores it. The
    parent's own signal waits out the workers' start (milliseconds) and is delivered after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _workers_ignore_preemption(worker_id: int) -> None:
    """SLURM signals every process of a task on preemption (SIGTERM on `scontrol requeue`, SIGUSR2
    from --signal, SIGINT from a forwarded Ctrl-C). The rank's main process saves and stops; a
    worker killed by one would fail the rank before it could save, so workers ignore them."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a pending one is dropped


def _shutdown(source: Any) -> None:
    """Stop a DataLoader iterator's workers now, also when an error or close() ends the epoch.

    Workers ignore SIGTERM (above), so DataLoader's own terminate() fallback cannot stop a stuck
    one, and a leaked iterator would hang interpreter exit: stop them here, SIGKILL as last resort.
    """
    stop = getattr(source, "_shutdown_workers", None)
    if stop is None:
        return
    stop()
    for w in getattr(source, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def crop_spec(cfg: DataConfig) -> tuple:
    if cfg.crops == "custom":
        spec = (list(cfg.size_crops), list(cfg.nmb_crops), list(cfg.min_scale_crops), list(cfg.max_scale_crops))
        if not spec[0]:
            raise ValueError("data.crops=custom needs size_crops, nmb_crops, min/max_scale_crops")
        return spec
    if cfg.crops not in CROP_PRESETS:
        raise ValueError(f"unknown data.crops {cfg.crops!r}; choose one of {sorted(CROP_PRESETS)} or custom")
    return CROP_PRESETS[cfg.crops]


def build_multicrop(cfg: DataConfig) -> MultiCrop:
    """The multi-crop transform a config describes (crop geometry + distortion knobs)."""
    if len(cfg.jitter) != 4 or len(cfg.blur_radius) != 2:
        raise ValueError("data.jitter needs 4 values (brightness, contrast, saturation, hue) and "
                         "data.blur_radius 2 (min, max)")
    return MultiCrop(*crop_spec(cfg), jitter_p=cfg.jitter_p, gray_p=cfg.gray_p, blur_p=cfg.blur_p,
                     blur_radius=(float(cfg.blur_radius[0]), float(cfg.blur_radius[1])),
                     jitter=tuple(float(x) for x in cfg.jitter))


class MultiCropLoader:
    """Iterate for batches (list of [B,3,S,S] tensors, one per crop), forever; see module doc."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if cfg.batch_size <= 0 or cfg.workers < 0 or cfg.shuffle_buffer <= 0:
            raise ValueError("batch_size and shuffle_buffer must be > 0, workers >= 0")
        self.cfg, self.rank, self.world = cfg, rank, world_size
        if "://" in cfg.shards:  # before the manifest is read; workers set it again (EpochStream)
            from seer_pipeline.store.client import set_endpoint  # lazy: boto3 loads only for remote shards

            set_endpoint(cfg.s3_endpoint or None)
        self.shards, self.exact = resolve_shards(cfg.shards)
        self.multicrop = build_multicrop(cfg)
        shuffle_order(2, 1, 0, 0, 0, 0)  # compile / load the kernel before DataLoader workers fork
        self.logical_workers = max(1, cfg.workers)
        if self.exact:
            self.n_samples = sum(s.count for s in self.shards)
            self.batches_per_epoch = self.n_samples // (world_size * cfg.batch_size)
            if self.batches_per_epoch == 0:
                raise ValueError(f"{self.n_samples} samples cannot fill one batch of {cfg.batch_size} "
                                 f"on each of {world_size} ranks")
        else:
            if cfg.epoch_samples <= 0:
                raise ValueError("resampled mode (shards given as a pattern) needs data.epoch_samples > 0")
            self.n_samples = cfg.epoch_samples
            self.batches_per_epoch = cfg.epoch_samples // (world_size * cfg.batch_size)
            if self.batches_per_epoch == 0:
                raise ValueError("data.epoch_samples is smaller than world_size * batch_size")
            log.warning("resampled mode: %d shard(s) drawn with replacement, %d samples per epoch; "
                        "no exact once-per-epoch accounting", len(self.shards), cfg.epoch_samples)
        log.info("loader rank %d/%d: %s, %d batches/epoch, %s", rank, world_size,
                 "exact" if self.exact else "resampled", self.batches_per_epoch, pil_flavour())
        self.epoch = 0
        self._plan: Optional[List] = None  # None: the fresh plan of self.epoch
        self._batches = 0  # consumed this epoch
        self._outputs = [0] * self.logical_workers
        self._pads = [0] * self.logical_workers
        self._metrics: Dict[str, Any] = {k: 0 for k in COUNTERS}
        self._metrics.update(shards_failed=[], peak_buffered=0)
        self._live: Dict[int, BatchMeta] = {}
        self.last_uids: List[int] = []  # manifest-order ids of the last batch (-1: resampled)

    # ---- iteration --------------------------------------------------------------------------
    @property
    def batches_this_epoch(self) -> int:
        """Batches of the current epoch (smaller than batches_per_epoch after a reshaped resume)."""
        if not self.exact or self._plan is None:
            return self.batches_per_epoch
        return runs_len(self._plan) // (self.world * self.cfg.batch_size)

    def _stream(self) -> EpochStream:
        c = self.cfg
        plan = self._plan if self._plan is not None else (
            epoch_runs([s.count for s in self.shards], c.seed, self.epoch) if self.exact else [])
        return EpochStream(
            shards=self.shards, exact=self.exact, multicrop=self.multicrop, seed=c.seed, epoch=self.epoch,
            rank=self.rank, world=self.world, workers=self.logical_workers, batch=c.batch_size,
            buffer=c.shuffle_buffer, max_fail_fraction=c.max_fail_fraction, plan=plan,
            batches_per_rank=self.batches_this_epoch, start_batch=self._batches,
            skip_outputs=list(self._outputs), skip_pads=list(self._pads),
            s3_endpoint=c.s3_endpoint)

    def __iter__(self) -> Iterator[List[torch.Tensor]]:
        while True:
            left = self.batches_this_epoch - self._batches
            if left > 0:
                self._fold_live()  # new workers restart their counters
                ds = self._stream()
                if self.cfg.workers == 0:
                    source: Any = iter(ds)
                else:
                    with _workers_born_deaf():
                        source = iter(DataLoader(ds, batch_size=None, num_workers=self.cfg.workers,
                                                 prefetch_factor=self.cfg.prefetch_factor,
                                                 pin_memory=self.cfg.pin_memory,
                                                 timeout=self.cfg.timeout_s,
                                                 worker_init_fn=_workers_ignore_preemption))
                try:
                    for _ in range(left):
                        try:
                            views, meta = next(source)
                        except StopIteration:
                            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} ended after "
                                               f"{self._batches} of {self.batches_this_epoch} batches "
                                               "(loader bug)") from None
                        self._consume(meta)
                        yield views
                finally:
                    _shutdown(source)
                    source = None
            self._next_epoch()

    def _consume(self, meta: BatchMeta) -> None:
        w = meta.worker
        self._outputs[w], self._pads[w] = meta.outputs, meta.pads
        self._live[w] = meta
        self.last_uids = meta.uids
        self._batches += 1

    def _next_epoch(self) -> None:
        self._fold_live()
        self.epoch += 1
        self._plan, self._batches = None, 0
        self._outputs = [0] * self.logical_workers
        self._pads = [0] * self.logical_workers

    def _fold_live(self) -> None:
        for meta in self._live.values():
            for k in COUNTERS:
                self._metrics[k] += getattr(meta, k)
            self._metrics["peak_buffered"] = max(self._metrics["peak_buffered"], meta.peak_buffered)
            for s in meta.failed_shards:
                if s not in self._metrics["shards_failed"]:
                    self._metrics["shards_failed"].append(s)
        self._live = {}

    def metrics(self) -> Dict[str, Any]:
        """Counters of consumed data: samples_ok, decode_failures, read_failures, ..."""
        out = {k: self._metrics[k] + sum(getattr(m, k) for m in self._live.values()) for k in COUNTERS}
        out["peak_buffered"] = max([self._metrics["peak_buffered"]] + [m.peak_buffered for m in self._live.values()])
        failed = list(self._metrics["shards_failed"])
        for m in self._live.values():
            failed += [s for s in m.failed_shards if s not in failed]
        out["shards_failed"] = len(failed)
        out["failed_shard_names"] = failed
        out.update(epoch=self.epoch, batches_in_epoch=self._batches)
        return out

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What the trainer consumed on this rank, as plain python (save under a per-rank key)."""
        m = self.metrics()
        return {"version": STATE_VERSION, "exact": self.exact, "seed": self.cfg.seed, "epoch": self.epoch,
                "world_size": self.world, "rank": self.rank, "workers": self.logical_workers,
                "batch_size": self.cfg.batch_size, "shuffle_buffer": self.cfg.shuffle_buffer,
                "n_samples": self.n_samples, "batches": self._batches,
                "plan": None if self._plan is None else [list(r) for r in self._plan],
                "outputs": list(self._outputs), "pads": list(self._pads),
                "metrics": {k: m[k] for k in COUNTERS}}

    def load_state_dict(self, states: List[Dict[str, Any]]) -> None:
        """Restore from the states of ALL old ranks (call before iterating)."""
        if not states:
            raise ValueError("load_state_dict needs the list of all old ranks' loader states")
        s0 = states[0]
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {s.get('version')} != {STATE_VERSION}")
            for k in ("exact", "seed", "epoch", "world_size", "workers", "batch_size", "shuffle_buffer",
                      "n_samples", "batches", "plan"):
                if s[k] != s0[k]:
                    raise ValueError(f"loader states disagree on {k!r}: {s[k]!r} vs {s0[k]!r}")
        if sorted(s["rank"] for s in states) != list(range(s0["world_size"])):
            raise ValueError(f"expected states of ranks 0..{s0['world_size'] - 1}, got {[s['rank'] for s in states]}")
        if s0["exact"] != self.exact or s0["seed"] != self.cfg.seed:
            raise ValueError("loader state is from another shard mode or seed")
        if self.exact and s0["n_samples"] != self.n_samples:
            raise ValueError(f"loader state covers {s0['n_samples']} samples, the manifest {self.n_samples}")
        states = sorted(states, key=lambda s: s["rank"])
        self.epoch = s0["epoch"]
        # Same world: each rank keeps its counters; otherwise rank 0 carries the old totals.
        same_world = s0["world_size"] == self.world
        for k in COUNTERS:
            self._metrics[k] = (states[self.rank]["metrics"][k] if same_world
                                else sum(s["metrics"][k] for s in states) if self.rank == 0 else 0)
        same = (s0["world_size"] == self.world and s0["workers"] == self.logical_workers
                and s0["batch_size"] == self.cfg.batch_size and s0["shuffle_buffer"] == self.cfg.shuffle_buffer)
        plan = None if s0["plan"] is None else [tuple(r) for r in s0["plan"]]
        if same or not self.exact:
            mine = states[self.rank] if same else s0
            self._plan, self._batches = plan, s0["batches"]
            self._outputs, self._pads = list(mine["outputs"]), list(mine["pads"])
            if not self.exact and not same:
                self._outputs, self._pads = [0] * self.logical_workers, [0] * self.logical_workers
            return
        full = plan if plan is not None else epoch_runs([s.count for s in self.shards], self.cfg.seed, self.epoch)
        rest = remainder(full, s0["world_size"], s0["workers"], s0["batch_size"], s0["shuffle_buffer"],
                         self.cfg.seed, self.epoch, [s["outputs"] for s in states])
        log.info("resuming epoch %d at world %d from world %d: %d samples left", self.epoch, self.world,
                 s0["world_size"], runs_len(rest))
        self._plan, self._batches = rest, 0
        self._outputs = [0] * self.logical_workers
        self._pads = [0] * self.logical_workers


def build_loader(cfg: DataConfig, rank: int, world_size: int) -> MultiCropLoader:
    """The loader for one rank (no process group needed: the split is computed, not negotiated)."""
    return MultiCropLoader(cfg, rank, world_size)
