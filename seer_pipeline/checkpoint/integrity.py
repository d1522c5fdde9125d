"""What makes a checkpoint folder trustworthy: content hashes, meta.json's shape, `latest`.

Sizes alone miss flipped bytes (4 KB overwritten inside a .distcp loaded silently, issue #13), so
every file of a save gets a SHA-256. Each rank hashes the files it wrote itself, right after
writing them (they are still in the page cache), and the hashes reach rank 0 inside DCP's write
results (safe_dcp.HashingFileSystemWriter); rank 0 records them in meta.json when it commits the
save. On load every rank re-hashes a disjoint share of the files (file i goes to rank i %
world), so the cost is spread like the writing, and the load-agreement collective makes every rank skip a checkpoint one rank found corrupt.

Torch-free: `seer-status` and the launcher read `latest` and meta.json through this module.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HASH = "sha256"
_CHUNK = 4 << 20
_STEP_NAME = re.compile(r"^step_\d{9}$")
# `latest` holds one step folder name; anything longer is not ours and is not read further.
_LATEST_MAX = 64


class IntegrityError(RuntimeError):
    """A checkpoint file's content differs from what was recorded when it was saved."""


class BadMetaError(ValueError):
    """meta.json exists but is not a record this code wrote."""


def hash_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.new(HASH)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def verify_hashes(folder: str | os.PathLike, meta: dict[str, Any], rank: int = 0,
                  world: int = 1) -> int:
    """Re-hash this rank's share of the recorded files; raise IntegrityError on a mismatch.

    Returns the bytes hashed. A checkpoint saved before hashes were recorded has none to check.
    """
    hashes = meta.get(HASH) or {}
    done = 0
    for i, (name, want) in enumerate(sorted(hashes.items())):
        if i % world != rank:
            continue
        path = Path(folder) / name
        if path.is_symlink() or not path.is_file():  # a FIFO or device would never end
            raise IntegrityError(f"{path}: recorded in meta.json but not a regular file")
        got = hash_file(path)
        if got != want:
            raise IntegrityError(f"{path}: content hash {got[:16]}... != recorded {want[:16]}... "
                                 "(the file changed after it was saved)")
        done += path.stat().st_size
    return done


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A step folder's meta.json, checked for the fields loading needs."""
    p = Path(path) / "meta.json"
    try:
        meta = json.loads(p.read_text())
    except UnicodeDecodeError as e:
        raise BadMetaError(f"{p}: not UTF-8 JSON ({e.reason})") from e
    except ValueError as e:
        raise BadMetaError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise BadMetaError(f"{p}: expected a JSON object, found {type(meta).__name__}")
    for key, typ in (("step", int), ("world_size", int), ("files", dict), ("config_yaml", str)):
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise BadMetaError(f"{p}: field {key!r} missing or not a {typ.__name__}")
    if meta["world_size"] < 1 or meta["step"] < 0:
        raise BadMetaError(f"{p}: step {meta['step']} / world_size {meta['world_size']} out of range")
    if not isinstance(meta.get(HASH, {}), dict):
        raise BadMetaError(f"{p}: field {HASH!r} is not an object")
    for name in [*meta["files"], *meta.get(HASH, {})]:
        if not isinstance(name, str) or "/" in name or "\0" in name or name in ("", ".", ".."):
            raise BadMetaError(f"{p}: {name!r} is not a file name inside the step folder")
    return meta


def read_latest(ckpt_dir: str | os.PathLike) -> str:
    """The step folder name RUN/checkpoints/latest names, or '' (with one warning line) when it
    is missing, a symlink, not a regular file, or not a step folder name. Its content is never
    logged unless it looks like one: a `latest` pointing at another file must not leak it."""
    p = Path(ckpt_dir) / "latest"
    if not os.path.lexists(p):
        return ""
    if p.is_symlink() or not p.is_file():
        log.warning("checkpoints/latest is %s, not the regular file this code writes; ignoring "
                    "it and scanning step folders", "a symlink" if p.is_symlink() else "not a file")
        return ""
    try:
        with open(p, "rb") as f:
            raw = f.read(_LATEST_MAX + 1)
    except OSError as e:
        log.warning("checkpoints/latest unreadable (%s); scanning step folders", e.strerror)
        return ""
    name = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _LATEST_MAX or not _STEP_NAME.match(name):
        log.warning("checkpoints/latest does not hold a step folder name (%d bytes); ignoring it "
                    "and scanning step folders", len(raw))
        return ""
    return name
