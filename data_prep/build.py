"""`seer-shards build`: scan -> plan -> write, each stage resumable after kill -9.

1. scan: workers read, hash, check, decode and encode every input of this part, in enumeration
   order; encoded JPEGs are appended to spool files and each input gets a row in SQLite
   (committed in batches, after the spool bytes are flushed).
2. plan: stored samples sorted by a seeded hash of their key (the global shuffle) and cut into
   shards at --maxcount/--maxsize. The plan depends only on the scan, never on timing.
3. write: shard i gets plan row i's samples, written to a temp name then renamed. A shard that
   is already complete is left alone. The manifest is written last, atomically.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from PIL import Image  # already loaded by data_prep.images

from data_prep import near_build, workers
from data_prep.images import Result
from data_prep.index import Index
from data_prep.lock import STATE, lock_out
from data_prep.options import ShardOptions, load_exclude
from data_prep.sources import Item, iter_inputs, part_by_archive
from seer_pipeline.shards import format as fmt

log = logging.getLogger(__name__)
_CHUNK_ITEMS, _CHUNK_BYTES = 32, 2 << 20  # amortise IPC for tiny images, bound it for big ones
_INFLIGHT_BYTES = 256 << 20  # input bytes queued for the workers at once (one max-size input)


_ORDINALS = "entry<<32|member"  # data_prep.sources: how inputs are numbered


def _config(inputs: Sequence[str], o: ShardOptions) -> dict:
    cfg = dataclasses.asdict(o)
    cfg["part"] = list(o.part)
    cfg.pop("workers")  # how fast, not what: a rerun may use another worker count
    if not cfg["exclude_near"]:  # near-duplicate options appear only where used (data_prep.near_build)
        cfg.pop("exclude_near")
    else:
        cfg["exclude_near"] = [os.path.abspath(p) for p in cfg["exclude_near"]]
    cfg["inputs"] = list(inputs)
    return cfg


def build_shards(inputs: Sequence[str], out: str | os.PathLike, progress: bool = False,
                 on_shard: Optional[Callable[[str, dict], None]] = None, **options: Any) -> dict:
    """Build (or finish) the shard set in `out`; returns the manifest. `on_shard(path, record)`
    is called once for every shard of the plan as soon as it is complete on disk (also for
    shards an earlier run completed): the object-store upload hook (data_prep.store_build)."""
    t0 = time.time()
    opts = options.pop("opts", None) or ShardOptions(**options)
    out = os.fspath(out)
    if not inputs:
        raise ValueError("no inputs given")
    # Absolute sources: a resume from another working directory must name inputs the same way.
    inputs = [p if "://" in str(p) else os.path.abspath(os.fspath(p)) for p in inputs]  # URLs: store.inputs
    missing = [p for p in inputs if "://" not in p and not os.path.exists(p)]
    if missing:  # a typo in the command line is not a skipped image: stop before any work
        raise FileNotFoundError(f"input(s) do not exist: {', '.join(missing)}")
    cfg = _config(inputs, opts)
    lock = lock_out(out)
    idx = Index(os.path.join(out, STATE, "index.sqlite"))
    pool: Optional[cf.Executor] = None
    try:
        old = idx.config()
        if old is not None and "max_bytes" not in old:  # a build begun before the option existed
            old["max_bytes"] = ShardOptions.max_bytes
        if old is not None and old != cfg:
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            raise ValueError(f"{out} holds a build with other options ({', '.join(diff)}); "
                             "use the same command to resume, or a new --out")
        if old is not None and idx.get("ordinals") != _ORDINALS and idx.get("scan_done") != "1":
            raise ValueError(f"{out} holds a build begun by an older seer-shards (other input numbering); "
                             "rebuild into a new --out")
        if idx.get("part_by") is None:  # decided once: a resume must assign inputs as the first run did
            idx.put("part_by", "archive" if part_by_archive(inputs, opts.part, prune=[out]) else "member")
        idx.put("ordinals", _ORDINALS)
        idx.put("config", json.dumps(cfg))
        idx.commit()
        scan = idx.get("scan_done") != "1"
        session = -1
        if scan:
            session = int(idx.get("sessions", "0") or 0)
            idx.put("sessions", session + 1)  # fresh spool files per session: a crashed tail is never reused
            idx.commit()
        # One pool for both stages: forking and warming workers costs more than it seems.
        pool = _pool(opts, out, session, load_exclude(opts.exclude) if scan else frozenset())
        t1 = time.time()
        if near_build.active(opts):
            near_build.attach(idx, opts)
        if scan:
            _scan(inputs, out, opts, idx, progress, pool)
        if near_build.active(opts):
            near_build.apply(idx, opts)  # between scan and plan: needs every signature
        t2 = time.time()
        idx.make_plan(opts.maxcount, opts.maxsize)
        shards = _write(out, opts, idx, progress, pool, on_shard)
        t3 = time.time()
        manifest = _finish(out, cfg, idx, shards)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        workers.close_spool()
        idx.close()
        os.close(lock)
    t4 = time.time()
    # Where the time went (start-up, scan, plan + write, manifest + clean-up): what to profile.
    log.info("%d inputs: %d written to %d shards, %d skipped (%d duplicates) in %.2fs "
             "(start %.2f, scan %.2f, write %.2f, finish %.2f)",
             manifest["inputs_seen"], manifest["written"], len(shards), manifest["skipped"],
             manifest["duplicates"], t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3)
    return manifest


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, **kw: Any) -> Any:
    """A tqdm bar (images/s), or nothing: tqdm's import is a tenth of our start-up time."""
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(**kw)


def _pool(opts: ShardOptions, out: str, session: int, exclude: frozenset[str]) -> Optional[cf.Executor]:
    args = (opts.process(), exclude, os.path.join(out, STATE), session)
    if opts.workers <= 1:
        workers.init_worker(*args)
        return None
    Image.preinit()  # import the common codecs once, before forking, not once per worker
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    return cf.ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=workers.init_worker,
                                  initargs=(*args, True))


def _scan(inputs: Sequence[str], out: str, opts: ShardOptions, idx: Index, progress: bool,
          pool: Optional[cf.Executor]) -> None:
    last = int(idx.get("last_ordinal", "-1") or -1)
    want = lambda o, s: o > last  # noqa: E731 - a rerun reads only what the last commit lacks
    bar = _bar(progress, unit="img", desc="scan", smoothing=0.1)
    pending: collections.deque = collections.deque()  # (future or results, input bytes)
    state = {"n": 0, "since": 0, "t": time.time(), "bytes": 0}
    spools: dict[str, int] = {}  # spool file -> read-only fd used to fsync it

    def drain(keep: int) -> None:
        while len(pending) > keep or (pending and state["bytes"] > _INFLIGHT_BYTES):
            head, nb = pending.popleft()
            state["bytes"] -= nb
            results = head.result() if isinstance(head, cf.Future) else head
            for r in results:
                _record(r, idx, opts)
                if r.spool and r.spool not in spools:
                    spools[r.spool] = os.open(os.path.join(out, STATE, r.spool), os.O_RDONLY)
                state["n"] += 1
            bar.update(len(results))
            state["since"] += len(results)
            if results and (state["since"] >= 512 or time.time() - state["t"] > 2.0):
                _commit(idx, spools.values(), results[-1].ordinal)
                state["since"], state["t"] = 0, time.time()

    def submit(chunk: list[Item]) -> None:
        if chunk:
            nb = sum(len(it.data) for it in chunk if it.data is not None)  # bytes held until done
            state["bytes"] += nb
            pending.append((pool.submit(workers.scan_chunk, chunk) if pool else workers.scan_chunk(chunk), nb))
            drain(4 * opts.workers)  # bounded in-flight work: memory stays flat

    chunk: list[Item] = []
    nbytes = 0
    try:
        # The output folder is left out of the walk: an --out inside an input would otherwise
        # read the build's own spool and index as inputs.
        whole = idx.get("part_by") == "archive"
        for it in iter_inputs(inputs, want, opts.max_bytes, prune=[out], part=opts.part, whole_archives=whole):
            if not want(it.ordinal, it.source):
                continue
            if it.reason is not None:  # decided during enumeration; keeps its place in order
                submit(chunk)
                chunk, nbytes = [], 0
                pending.append(([Result(it.ordinal, it.source, reason=it.reason)], 0))
                continue
            chunk.append(it)
            nbytes += len(it.data) if it.data is not None else _file_size(it.path)
            if len(chunk) >= _CHUNK_ITEMS or nbytes >= _CHUNK_BYTES:
                submit(chunk)
                chunk, nbytes = [], 0
        submit(chunk)
        drain(0)
        _commit(idx, spools.values(), None)  # workers flushed every chunk; make it durable
        idx.put("scan_done", 1)
        idx.commit()
    finally:
        for fd in spools.values():
            os.close(fd)
        bar.close()


def _file_size(path: Optional[str]) -> int:
    try:
        return os.path.getsize(path or "")
    except OSError:
        return 0


def _record(r: Result, idx: Index, opts: ShardOptions) -> None:
    if r.reason is not None:
        idx.add_skip(r.ordinal, r.source, r.reason, r.sha256, r.size)
    elif opts.dedup and idx.has_sha(r.sha256):
        idx.add_skip(r.ordinal, r.source, "duplicate", r.sha256, r.size)
    else:
        idx.add_ok(r, opts.seed)
        if r.signature:
            near_build.record(idx, r)


def _commit(idx: Index, spool_fds: Iterable[int], last_ordinal: Optional[int]) -> None:
    for fd in spool_fds:  # rows must never point at bytes that a power cut could lose
        os.fsync(fd)
    if last_ordinal is not None:
        idx.put("last_ordinal", last_ordinal)
    idx.commit()


def _write(out: str, opts: ShardOptions, idx: Index, progress: bool,
           pool: Optional[cf.Executor], on_shard: Optional[Callable[[str, dict], None]] = None) -> list[dict]:
    for fn in os.listdir(out):  # temp files of a killed run
        if fn.startswith(f".{opts.prefix}-") and fn.endswith(".tmp"):
            os.unlink(os.path.join(out, fn))
    plan = idx.plan()
    shards: dict[int, dict] = {}
    bar = _bar(progress, total=len(plan), unit="shard", desc="write")
    pending: collections.deque = collections.deque()

    def finish(p: Any, name: str, res: tuple[int, int, str]) -> None:
        count, nbytes, sha = res
        if (count, nbytes) != (p["count"], p["bytes"]):
            raise RuntimeError(f"{name}: wrote {count} samples / {nbytes} bytes, planned {p['count']} / {p['bytes']}")
        idx.record_shard(p["idx"], name, count, nbytes, sha)
        shards[p["idx"]] = dict(name=name, count=count, bytes=nbytes, sha256=sha)
        if on_shard is not None:
            on_shard(os.path.join(out, name), shards[p["idx"]])
        bar.update(1)

    try:
        for p in plan:
            name = fmt.shard_name(opts.prefix, p["idx"])
            path = os.path.join(out, name)
            done = idx.done_shard(p["idx"])
            if done is not None and os.path.exists(path) and os.path.getsize(path) == done["bytes"]:
                shards[p["idx"]] = dict(name=name, count=done["count"], bytes=done["bytes"], sha256=done["sha256"])
                if on_shard is not None:
                    on_shard(path, shards[p["idx"]])
                bar.update(1)
                continue
            rows = list(idx.ok_rows((p["first_pos"], p["first_ordinal"]), p["count"]))
            if done is None and os.path.exists(path) and fmt.shard_keys(path) == [r["key"] for r in rows]:
                # Renamed into place before the kill but not yet recorded: complete by construction.
                rec = dict(name=name, count=len(rows), bytes=os.path.getsize(path), sha256=fmt.file_sha256(path))
                idx.record_shard(p["idx"], name, rec["count"], rec["bytes"], rec["sha256"])
                shards[p["idx"]] = rec
                if on_shard is not None:
                    on_shard(path, rec)
                bar.update(1)
                continue
            job = [(r["key"], r["spool"], r["off"], r["len"], fmt.sample_json(r)) for r in rows]
            if pool is None:
                finish(p, name, workers.write_shard_job(path, job))
                continue
            pending.append((p, name, pool.submit(workers.write_shard_job, path, job)))
            while len(pending) > 2 * opts.workers:  # bounded: plans of any length fit
                q, qn, fut = pending.popleft()
                finish(q, qn, fut.result())
        while pending:
            q, qn, fut = pending.popleft()
            finish(q, qn, fut.result())
    finally:
        for _, _, fut in pending:
            fut.cancel()
        bar.close()
    return [shards[i] for i in sorted(shards)]


def _finish(out: str, cfg: dict, idx: Index, shards: list[dict]) -> dict:
    counts = idx.counts()
    seen = sum(counts.values())
    written = counts.get("ok", 0)
    fmt.write_skipped(os.path.join(out, fmt.SKIPPED),
                      near_build.skipped_rows(idx) if getattr(idx, "near", False) else
                      ((fmt.unescape_name(r["source"]), r["reason"]) for r in idx.skipped()))
    manifest = {
        "format": "seer-shards/1",
        "inputs_seen": seen,
        "written": written,
        "skipped": seen - written,
        "duplicates": counts.get("duplicate", 0),
        "excluded": counts.get("excluded", 0),
        "reasons": {k: v for k, v in sorted(counts.items()) if k != "ok"},
        "part": cfg["part"],
        "part_by": idx.get("part_by"),
        "shards": shards,
        "config": cfg,
    }
    if getattr(idx, "near", False):
        manifest["near"] = near_build.manifest_entry()
    assert sum(s["count"] for s in shards) == written
    manifest = fmt.write_manifest(out, manifest)
    for fn in os.listdir(os.path.join(out, STATE)):  # the spool is only needed until here
        if fn.startswith("spool-"):
            os.unlink(os.path.join(out, STATE, fn))
    return manifest
