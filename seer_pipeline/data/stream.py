"""Worker side: read the worker's slice -> shuffle buffer -> decode + multi-crop -> batch.

One `EpochStream` is built per epoch by the loader and copied into each DataLoader worker. Each
batch carries a `BatchMeta` (logical worker, shuffle outputs consumed, pad cursor, counters), so
the main process can state exactly what the trainer consumed, whatever the workers prefetched.

BAD-DATA POLICY: a sample that fails to decode, or that sits in a missing/truncated shard (or one
that is not a regular file, or holds a member over MAX_MEMBER_BYTES: shards/format.py), is
skipped and counted and the batch is filled from the worker's next samples. A worker that runs out
of samples before its fixed batch count (because of such failures) refills the rest by re-reading
its own slice from the start in the same order (new augmentations, counted as `samples_repeated`),
so every rank always delivers exactly `batches_per_epoch` batches and no collective waits. If a
worker's failures exceed `max_fail_fraction` of its slice, it raises an error naming the shards.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from seer_pipeline.data.augment import MultiCrop
from seer_pipeline.data.order import TAG_RESAMPLE, UidMap, assign, rng_for, runs_to_uids, shuffle_order, worker_batches
from seer_pipeline.shards.reader import Shard, ShardReadError, image_bytes, iter_samples

log = logging.getLogger(__name__)

FAIL = object()  # marker: the sample could not be read
# BatchMeta's data counters, summed over workers by the loader (metrics, checkpointed).
COUNTERS = ("samples_ok", "decode_failures", "read_failures", "samples_repeated")


@dataclass
class BatchMeta:
    """What a batch tells the loader about its worker: the one record of the worker -> loader
    protocol. A worker keeps one as its running state; each batch carries a snapshot."""

    worker: int  # logical worker
    outputs: int = 0  # exact mode: shuffle outputs consumed (a resume skips them undecoded)
    pads: int = 0  # refill cursor past the slice's end (lap * n + t), after failed samples
    samples_ok: int = 0
    decode_failures: int = 0
    read_failures: int = 0
    samples_repeated: int = 0
    peak_buffered: int = 0  # most samples held in the shuffle buffer at once
    failed_shards: List[str] = field(default_factory=list)
    uids: List[int] = field(default_factory=list)  # manifest-order ids of the batch (-1: resampled)


@dataclass(kw_only=True)  # 15 fields: keywords only, so no call site can swap two ints
class EpochStream(IterableDataset):
    """One rank's epoch as an IterableDataset; each DataLoader worker iterates its own slice."""

    shards: List[Shard]
    exact: bool
    multicrop: MultiCrop
    seed: int
    epoch: int
    rank: int
    world: int
    workers: int  # logical workers (1 when the DataLoader runs in-process)
    batch: int
    buffer: int
    max_fail_fraction: float
    plan: List[Tuple[int, int]] = field(default_factory=list)  # exact mode
    batches_per_rank: int = 0
    start_batch: int = 0  # rank batch index to start at: physical worker i plays (i + start) % W
    skip_outputs: Sequence[int] = ()  # per logical worker
    skip_pads: Sequence[int] = ()
    s3_endpoint: str = ""  # for s3:// shards; set in each worker (spawned workers start without it)

    def __iter__(self) -> Iterator[Tuple[List[torch.Tensor], BatchMeta]]:
        if self.s3_endpoint:
            from seer_pipeline.store.client import set_endpoint  # lazy: boto3 loads only for remote shards

            set_endpoint(self.s3_endpoint)
        info = get_worker_info()
        phys = info.id if info is not None else 0
        w = (phys + self.start_batch) % self.workers
        if self.exact:
            return self._exact(w)
        return self._resampled(w)

    # ---- exact mode -------------------------------------------------------------------------
    def _exact(self, w: int) -> Iterator[Tuple[List[torch.Tensor], BatchMeta]]:
        a = assign(self.plan, self.world, self.rank, self.workers, w, self.batch)
        uids = runs_to_uids(a.runs)
        n = len(uids)
        order = shuffle_order(n, self.buffer, self.seed, self.epoch, self.rank, w)
        todo = worker_batches(self.batches_per_rank, self.workers, w, self.start_batch)
        n0 = int(self.skip_outputs[w]) if len(self.skip_outputs) else 0
        p0 = int(self.skip_pads[w]) if len(self.skip_pads) else 0
        st = BatchMeta(worker=w, outputs=n0, pads=p0)
        limit = self.max_fail_fraction * max(1, n - n0)
        batch: List[Tuple[int, List[torch.Tensor]]] = []
        done = 0
        if todo == 0:
            return
        for t, sample in self._read_shuffled(a.runs, order, n0, st):
            st.outputs = t + 1
            uid = int(uids[order[t]])
            crops = self._decode(sample, (self.seed, self.epoch, uid, 0), st)
            if crops is None:
                if st.decode_failures + st.read_failures > limit:
                    raise RuntimeError(
                        f"rank {self.rank} worker {w}: {st.decode_failures} undecodable and "
                        f"{st.read_failures} unreadable samples exceed max_fail_fraction="
                        f"{self.max_fail_fraction} of {n - n0}; failed shards: "
                        f"{st.failed_shards or 'none (decode errors only)'}")
                continue
            batch.append((uid, crops))
            if len(batch) == self.batch:
                yield _collate(batch, st)
                done += 1
        # Refill from the own slice, re-read in the same order; the cursor counts pad-stream outputs
        # (lap * n + t) so a resume can skip them without decoding.
        p = p0
        while done < todo:
            lap, start = divmod(p, n)
            found = False
            for t, sample in self._read_shuffled(a.runs, order, start, BatchMeta(worker=w)):
                p = lap * n + t + 1
                st.pads = p
                uid = int(uids[order[t]])
                crops = self._decode(sample, (self.seed, self.epoch, uid, lap + 1), None)
                if crops is None:
                    continue
                found = True
                st.samples_repeated += 1
                batch.append((uid, crops))
                if len(batch) == self.batch:
                    yield _collate(batch, st)
                    done += 1
                    if done == todo:
                        return
            p = (lap + 1) * n
            if not found and start == 0:
                raise RuntimeError(f"rank {self.rank} worker {w}: no decodable sample in its slice of "
                                   f"epoch {self.epoch}; failed shards: {st.failed_shards}")

    def _decode(self, sample: object, key: Tuple[int, ...],
                st: Optional[BatchMeta]) -> Optional[List[torch.Tensor]]:
        """Multi-crop one sample with a generator seeded by `key`; None (counted) on failure."""
        if sample is FAIL or sample is None:
            if st is not None:
                st.read_failures += 1
            return None
        try:
            crops = self.multicrop(image_bytes(sample), rng_for(*key))
        except Exception as e:  # noqa: BLE001 - any decoder error is a bad sample, counted
            if st is not None:
                st.decode_failures += 1
                log.warning("undecodable sample %r: %s", sample.get("__key__"), e)
            return None
        if st is not None:
            st.samples_ok += 1
        return crops

    def _read_shuffled(self, runs: Sequence[Tuple[int, int]], order: np.ndarray, start: int,
                       st: BatchMeta) -> Iterator[Tuple[int, object]]:
        """(t, sample) for shuffle outputs t >= start, holding only read-but-not-output samples."""
        needed = np.zeros(len(order), dtype=bool)
        needed[order[start:]] = True
        reader = self._read_positions(runs, needed, st)
        pending: Dict[int, object] = {}
        for t in range(start, len(order)):
            p = int(order[t])
            while p not in pending:
                pos, sample = next(reader)
                if needed[pos]:
                    pending[pos] = sample
            st.peak_buffered = max(st.peak_buffered, len(pending))
            yield t, pending.pop(p)

    def _read_positions(self, runs: Sequence[Tuple[int, int]], needed: np.ndarray,
                        st: BatchMeta) -> Iterator[Tuple[int, object]]:
        """(position, sample | None | FAIL) in position order; payloads read only where needed."""
        umap = UidMap([s.count for s in self.shards])
        pos = 0
        for s, i0, i1 in umap.segments(runs):
            base, pos = pos, pos + i1 - i0
            if not needed[base:pos].any():  # nothing wanted here: do not even open the shard
                yield from ((q, None) for q in range(base, pos))
                continue
            shard, got = self.shards[s], base
            want = lambda i, base=base, i0=i0, i1=i1: i0 <= i < i1 and bool(needed[base + i - i0])  # noqa: E731
            try:
                for idx, sample in iter_samples(shard.path, want, stop=i1):
                    if idx >= i0:
                        yield base + idx - i0, sample
                        got = base + idx - i0 + 1
            except ShardReadError as e:
                log.warning("%s", e)
            if got < pos:
                log.warning("shard %s: samples %d-%d missing (file missing or truncated), skipped",
                            shard.path, i0 + got - base, i1 - 1)
                if shard.path not in st.failed_shards:
                    st.failed_shards.append(shard.path)
                yield from ((q, FAIL if needed[q] else None) for q in range(got, pos))

    # ---- resampled mode ---------------------------------------------------------------------
    def _resampled(self, w: int) -> Iterator[Tuple[List[torch.Tensor], BatchMeta]]:
        """Shards drawn with replacement; the stream restarts deterministically at a resume point."""
        todo = worker_batches(self.batches_per_rank, self.workers, w, self.start_batch)
        rng = rng_for(self.seed, self.epoch, self.rank, w, self.start_batch, TAG_RESAMPLE)
        st = BatchMeta(worker=w)
        buf: List[Dict] = []
        batch: List[Tuple[int, List[torch.Tensor]]] = []
        done, draws, tries = 0, 0, 0
        while done < todo:
            shard = self.shards[int(rng.integers(len(self.shards)))]
            tries += 1
            try:
                for _, sample in iter_samples(shard.path, lambda i: True):
                    buf.append(sample)
                    if len(buf) < self.buffer:
                        continue
                    k = int(rng.integers(len(buf)))
                    buf[k], buf[-1] = buf[-1], buf[k]
                    s = buf.pop()
                    draws += 1
                    key = (self.seed, self.epoch, self.rank, w, self.start_batch, draws, TAG_RESAMPLE)
                    crops = self._decode(s, key, st)
                    if crops is None:
                        if st.decode_failures > max(10.0, self.max_fail_fraction * draws):
                            raise RuntimeError(f"rank {self.rank} worker {w}: {st.decode_failures} of "
                                               f"{draws} samples undecodable (max_fail_fraction="
                                               f"{self.max_fail_fraction}); last shard {shard.path}")
                        continue
                    batch.append((-1, crops))
                    if len(batch) == self.batch:
                        yield _collate(batch, st)
                        done += 1
                        if done == todo:
                            return
            except ShardReadError as e:
                log.warning("%s", e)
                if shard.path not in st.failed_shards:
                    st.failed_shards.append(shard.path)
                if len(st.failed_shards) == len(self.shards):
                    raise RuntimeError(f"no readable shard among {len(self.shards)}: {st.failed_shards}") from e
            if draws == 0 and tries > 10 * len(self.shards) + self.buffer:
                raise RuntimeError(f"{tries} shard draws gave no sample: are the shards empty? "
                                   f"({self.shards[0].path}, ...)")


def _collate(batch: List[Tuple[int, List[torch.Tensor]]],
             st: BatchMeta) -> Tuple[List[torch.Tensor], BatchMeta]:
    """Stack per crop -> list of [B, 3, S, S]; empties `batch`; meta snapshots `st` + the uids."""
    views = [torch.stack([c[i] for _, c in batch]) for i in range(len(batch[0][1]))]
    meta = replace(st, failed_shards=list(st.failed_shards), uids=[u for u, _ in batch])
    batch.clear()
    return views, meta
