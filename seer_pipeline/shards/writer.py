"""Byte-deterministic WebDataset shard writing (plain tarfile: webdataset's writer imports torch).

Same members in the same order give the same shard bytes, so a resumed run and an
uninterrupted one produce identical files (and identical sha256 in the manifest).
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from typing import Any, BinaryIO, Iterable, Mapping

from seer_pipeline.core.io_utils import atomic_open

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to a whole record


def sample_json(row: Mapping[str, Any]) -> bytes:
    """The `json` member of a sample; compact and key-ordered so its size is predictable."""
    meta = {
        "source": row["source"],
        "sha256": row["sha256"],
        "width": row["width"],
        "height": row["height"],
        "orig_width": row["orig_width"],
        "orig_height": row["orig_height"],
    }
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def member_bytes(nbytes: int) -> int:
    """Bytes one member occupies in a ustar archive: header plus data padded to a block."""
    return BLOCK + (nbytes + BLOCK - 1) // BLOCK * BLOCK


def tar_bytes(payload: int) -> int:
    """Archive size given the summed `member_bytes`: two zero blocks, padded to a record."""
    total = payload + 2 * BLOCK
    return (total + RECORD - 1) // RECORD * RECORD


class _HashingWriter:
    """Hashes what tarfile writes, so a shard is never read back to get its sha256."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def tell(self) -> int:
        return self.n

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


_FIXED = (b"0000444\0" b"0000000\0" b"0000000\0")  # mode, uid, gid
_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 64 + b"\0" * 16 + b"\0" * 167  # no dev fields, as tarfile


def ustar_header(name: str, size: int) -> bytes:
    """A ustar header for a regular file (mtime 0, root, mode 0444).

    Built by hand: tarfile.addfile costs ~90 us a member, which dominated tiny images.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:
        raise ValueError(f"member {name!r} ({size} bytes) does not fit a ustar header")
    head = raw.ljust(100, b"\0") + _FIXED + b"%011o\0" % size + b"00000000000\0"
    chk = sum(head) + sum(_TAIL) + 8 * 32  # the checksum field counts as eight spaces
    return head + b"%06o\0 " % chk + _TAIL


def write_shard(path: str, samples: Iterable[tuple[str, bytes, bytes]]) -> tuple[int, int, str]:
    """Write (key, jpg, json) samples to `path` atomically; returns (count, bytes, sha256)."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.tmp")
    count = 0
    with atomic_open(path, tmp) as raw:
        hw = _HashingWriter(raw)
        for key, jpg, meta in samples:
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", meta)):
                hw.write(ustar_header(name, len(data)))
                hw.write(data)
                if len(data) % BLOCK:
                    hw.write(b"\0" * (BLOCK - len(data) % BLOCK))
            count += 1
        # End of archive: two zero blocks, then zeros to a whole record, as tar(1) writes.
        hw.write(b"\0" * (tar_bytes(hw.n) - hw.n))
    return count, hw.n, hw.h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_keys(path: str) -> list[str]:
    """Sample keys of a shard in order (each key once), from the tar headers only."""
    keys: list[str] = []
    with tarfile.open(path, mode="r|") as tf:
        for m in tf:
            k = m.name.split(".", 1)[0]
            if not keys or keys[-1] != k:
                keys.append(k)
    return keys
