"""`seer-shards build --out s3://bucket/prefix` and `merge` into s3, on top of the local build.

The build runs unchanged in a local staging folder (its scan/plan/write stages keep their
kill -9 guarantees) and hands each completed shard to `ShardUploader`, in plan order, as it
completes. The object store's own state is the upload log: an object under the shard's name whose
size and x-amz-meta-sha256 match the staged shard is uploaded (S3 shows an object only once its
PUT or CompleteMultipartUpload succeeded), anything else is uploaded again. A run first aborts the
incomplete multipart uploads a killed run left, and writes skipped.tsv and manifest.json last.
"""
from __future__ import annotations

import concurrent.futures as cf
import shutil
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from typing import Any, Dict, Optional, Sequence

from data_prep.build import _config, build_shards
from data_prep.lock import STATE
from data_prep.options import ShardOptions
from seer_pipeline.shards.remote import load_manifest_remote
from seer_pipeline.store import objects
from seer_pipeline.store.client import s3_client
from seer_pipeline.store.reader import read_bytes
from seer_pipeline.store.url import Url, parse

log = logging.getLogger(__name__)
_STAGING_ROOT = "seer-shards-staging"
UPLOAD_THREADS = int(os.environ.get("SEER_S3_UPLOAD_THREADS", "4"))


def default_staging(out: str) -> str:
    """A per-destination staging folder that survives a kill (rerun the command to resume)."""
    h = hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(os.environ.get("SEER_SHARDS_STAGING", tempfile.gettempdir()), _STAGING_ROOT, h)


class ShardUploader:
    """Uploads completed shards to `out` (s3://bucket/prefix); idempotent across reruns."""

    def __init__(self, out: str | Url, config: Optional[Dict[str, Any]] = None) -> None:
        self.out = parse(out.rstrip("/")) if isinstance(out, str) else out
        if self.out.scheme != "s3":
            raise ValueError(f"--out {self.out}: only s3:// destinations can be written")
        self.existing = objects.list_prefix(self.out)
        if config is not None and "manifest.json" in self.existing:
            old = json.loads(read_bytes(self.out.join("manifest.json"))).get("config")
            if old != config:
                diff = sorted(k for k in set(old or {}) | set(config) if (old or {}).get(k) != config.get(k))
                raise ValueError(f"{self.out} holds a build with other options ({', '.join(diff)}); "
                                 "use the same command to resume, or a new --out")
        self.aborted = objects.abort_incomplete(self.out)
        self._lock = threading.Lock()
        self.uploaded = self.skipped = 0
        # Uploads overlap the writing of the next shards; bounded, so staging never runs far ahead.
        self._pool = cf.ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="upload")
        self._pending: deque = deque()

    def __call__(self, path: str, rec: Dict[str, Any]) -> None:
        self._pending.append(self._pool.submit(self._upload, path, dict(rec)))
        while len(self._pending) > 2 * UPLOAD_THREADS:
            self._pending.popleft().result()  # an upload error stops the build here

    def wait_quietly(self) -> None:
        """Let uploads in flight end (or fail) without raising over the error already on its way."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - the build's own error is the one to report
            log.warning("an upload failed while the build was stopping: %s", e)

    def wait(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _upload(self, path: str, rec: Dict[str, Any]) -> None:
        name = rec["name"]
        if self.existing.get(name) == rec["bytes"]:
            h = objects.head(self.out.join(name))
            if h is not None and h["size"] == rec["bytes"] and h["sha256"] == rec["sha256"]:
                with self._lock:
                    self.skipped += 1
                return
        objects.put_file(self.out.join(name), path, rec["sha256"])
        with self._lock:
            self.uploaded += 1

    def finish(self, staging: str) -> None:
        """skipped.tsv, then manifest.json: a reader that sees the manifest sees every shard."""
        self.wait()
        for fn in ("skipped.tsv", "manifest.json"):
            with open(os.path.join(staging, fn), "rb") as f:
                objects.put_bytes(self.out.join(fn), f.read())


def build_to_store(inputs: Sequence[str], out: str, staging: Optional[str] = None, progress: bool = False,
                   **kw: Any) -> Dict[str, Any]:
    """`build_shards` into `staging`, uploading each shard as it completes; returns the manifest."""

    opts = kw.pop("opts", None) or ShardOptions(**kw)
    staging = staging or default_staging(out)
    os.makedirs(staging, exist_ok=True)
    norm = [p if "://" in p else os.path.abspath(p) for p in inputs]
    t0 = time.perf_counter()
    up = ShardUploader(out, _config(norm, opts))
    t1 = time.perf_counter()
    log.info("building in the staging folder %s (a full local copy of the shard set until the upload "
             "completes; removed then, kept for a rerun to resume if the build stops), uploading to %s "
             "(%d shard object(s) already there, %d stale multipart upload(s) aborted)",
             staging, up.out, len(up.existing), up.aborted)
    try:
        man = build_shards(list(inputs), staging, progress=progress, opts=opts, on_shard=up)
        t2 = time.perf_counter()
    except BaseException:
        up.wait_quietly()
        log.warning("build stopped; staging kept in %s: rerun the same command to resume", staging)
        raise
    up.wait()
    t3 = time.perf_counter()
    up.finish(staging)
    remove_staging(staging, man)
    # Where the time went beyond the local build: connect/list/abort, the upload tail, the manifest.
    log.info("%s: %d shard(s) uploaded, %d already there (connect %.2fs, build %.2fs, upload tail %.2fs, "
             "manifest %.2fs)", up.out, up.uploaded, up.skipped, t1 - t0, t2 - t1, t3 - t2,
             time.perf_counter() - t3)
    return man


def remove_staging(staging: str, man: Dict[str, Any]) -> None:
    """Delete what the build wrote in `staging` once every object is uploaded (issue #26: an s3
    build left a 59-275 MB local copy in the temp folder), then the folder if nothing else is in it.
    Only the build's own files go: a --staging folder may hold other things."""
    for name in [s["name"] for s in man["shards"]] + ["manifest.json", "skipped.tsv"]:
        try:
            os.unlink(os.path.join(staging, name))
        except FileNotFoundError:
            pass
    shutil.rmtree(os.path.join(staging, STATE), ignore_errors=True)
    parent = os.path.dirname(os.path.abspath(staging))
    for d in (staging, parent) if os.path.basename(parent) == _STAGING_ROOT else (staging,):
        try:
            os.rmdir(d)  # only when empty; the default's shared parent too
        except OSError:
            break
    log.info("removed the staging copy in %s", staging)


def merge_in_store(parts: Sequence[str], out: str) -> Dict[str, Any]:
    """`seer-shards merge` of s3 part prefixes into an s3 prefix: server-side copies (the parts
    stay), renumbered as the local merge does; idempotent, manifest last."""

    dst = parse(out.rstrip("/"))
    urls = [parse(p.rstrip("/")) for p in parts]
    if any(u.scheme != "s3" for u in urls + [dst]):
        raise ValueError("merge into s3 needs s3:// parts and --out")
    if any(str(u) == str(dst) for u in urls):
        raise ValueError("--out must be a new prefix, not one of the parts")
    mans = [(str(u), load_manifest_remote(u)) for u in urls]
    skipped = {str(u): read_bytes(u.join("skipped.tsv")).decode("utf-8") for u in urls}
    manifest, moves, lines = _combine(mans, skipped)
    existing = objects.list_prefix(dst)
    c = s3_client()
    by_name = {s["name"]: s for s in manifest["shards"]}
    for src, name in moves:
        s = by_name[name]
        if existing.get(name) == s["bytes"]:
            h = objects.head(dst.join(name))
            if h is not None and h["sha256"] == s["sha256"]:
                continue
        su = parse(src)
        # Managed copy: multipart UploadPartCopy above 8 MiB, server-side (no bytes through us).
        c.copy({"Bucket": su.host, "Key": su.key}, dst.host, dst.join(name).key,
               ExtraArgs={"Metadata": {objects.SHA_META: s["sha256"]}, "MetadataDirective": "REPLACE"})
    objects.put_bytes(dst.join("skipped.tsv"), ("\n".join(lines) + "\n").encode())
    objects.put_bytes(dst.join("manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest


def _combine(mans: list, skipped: Dict[str, str]) -> tuple:
    """The merged manifest, (source URL, new name) copies and skipped.tsv lines; the same rules
    as data_prep/merge.py (parts 0..N-1 once each, same options, renumbered in part order)."""
    ns = {tuple(m["part"])[1] for _, m in mans}
    if len(ns) != 1:
        raise ValueError(f"parts disagree on N: {sorted(ns)}")
    (n,) = ns
    got = sorted(m["part"][0] for _, m in mans)
    if got != list(range(n)):
        raise ValueError(f"need parts 0..{n - 1} once each, got {got}")
    strip = lambda cfg: {k: v for k, v in cfg.items() if k != "part"}  # noqa: E731
    base = strip(mans[0][1]["config"])
    for p, m in mans:
        if strip(m["config"]) != base:
            raise ValueError(f"{p} was built with other options")
    if base.get("dedup") == "near" or base.get("exclude_near"):  # data_prep.near_build: 3-column skipped.tsv
        raise ValueError("parts built with --dedup near or --exclude-near merge into a local folder "
                         "(the cross-part near-duplicate pass rewrites shards), not into s3")
    prefix = base.get("prefix", "shard")
    moves, shards, lines = [], [], ["source\treason"]
    keys = ("inputs_seen", "written", "skipped", "duplicates", "excluded")
    sums = {k: 0 for k in keys}
    reasons: Dict[str, int] = {}
    for p, m in sorted(mans, key=lambda pm: pm[1]["part"][0]):
        for s in m["shards"]:
            name = f"{prefix}-{len(shards):06d}.tar"
            moves.append((str(parse(p).join(s["name"])), name))
            shards.append(dict(s, name=name))
        for k in keys:
            sums[k] += m.get(k, 0)
        for k, v in m.get("reasons", {}).items():
            reasons[k] = reasons.get(k, 0) + v
        lines.extend(x for x in skipped[p].splitlines()[1:] if x.strip())
    manifest = {"format": "seer-shards/1", **sums, "reasons": dict(sorted(reasons.items())), "part": [0, 1],
                "merged_parts": len(mans), "dedup_scope": "per part", "shards": shards,
                "config": dict(base, part=[0, 1], parts=len(mans))}
    return manifest, moves, lines
