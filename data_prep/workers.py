"""Code that runs in the worker processes (or in-process with --workers 1).

Workers write what they produce straight to their own spool file and shards straight to disk,
so image bytes never travel through the main process: it only keeps the books.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

from PIL import Image  # already loaded by data_prep.images

from data_prep.images import ProcessOptions, Result, process_bytes, read_source
from data_prep.sources import Item
from seer_pipeline.shards.format import write_shard

_W: dict[str, Any] = {}


def init_worker(opts: ProcessOptions, exclude: frozenset[str], spool_dir: str, session: int,
                in_pool: bool = False) -> None:
    """Per-process state; in a pool, also die with the parent (kill -9 must not leave orphans)."""
    _W.clear()
    _W.update(opts=opts, exclude=exclude, spool_dir=spool_dir, session=session, spool=None, readers={})
    _keep_memory()
    if in_pool:  # Ctrl-C reaches the whole process group: the parent alone answers it (cli.py)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if in_pool and sys.platform.startswith("linux"):
        # A forked worker holds the task pipe open itself, so it never sees EOF when the parent
        # is killed with -9: have the kernel send it SIGKILL instead.
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _keep_memory() -> None:
    """Reuse freed image buffers instead of returning them to the kernel after every image.

    Measured here on 303 photos (resize to 256): page faults 199k -> 38k, system time
    0.32 s -> 0.07 s (about a tenth of the CPU). Bounded: 8 Pillow blocks (16 MB each) and
    glibc keeping up to 128 MB of free heap per process.
    """
    if hasattr(Image.core, "set_blocks_max"):
        Image.core.set_blocks_max(8)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: decoder buffers come from the heap
            libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):
            pass


def _spool() -> Any:
    if _W["spool"] is None:
        name = f"spool-{_W['session']:05d}-{os.getpid()}.bin"
        _W["spool_name"] = name
        _W["spool"] = open(os.path.join(_W["spool_dir"], name), "ab")
    return _W["spool"]


def scan_chunk(jobs: list[Item]) -> list[Result]:
    """Process inputs; stored bytes go to this process's spool, results carry their location."""
    out = []
    for it in jobs:
        data, reason = (it.data, None) if it.data is not None else read_source(it.path or "", _W["opts"].max_bytes)
        if data is None:
            out.append(Result(it.ordinal, it.source, reason=reason))
            continue
        r = process_bytes(it.ordinal, it.source, data, _W["opts"], _W["exclude"])
        if r.reason is None and _W["opts"].signature and not r.signature:  # pass-through: from its bytes
            r.signature = _near_signature(r)
        if r.reason is None:
            f = _spool()
            r.spool, r.off, r.length = _W["spool_name"], f.tell(), len(r.data)
            f.write(r.data)
            r.data = b""
        out.append(r)
    if _W["spool"] is not None:
        _W["spool"].flush()  # in the OS before the main process may commit rows pointing here
    return out


def _near_signature(r: Result) -> str:
    from data_prep.near import signature_of_bytes  # numpy loads only in near builds

    return signature_of_bytes(r.data) or ""


def close_spool() -> None:
    if _W.get("spool") is not None:
        _W["spool"].close()
        _W["spool"] = None
    for fd in _W.get("readers", {}).values():
        os.close(fd)
    _W["readers"] = {}


def _read(spool: str, off: int, n: int) -> bytes:
    fd = _W["readers"].get(spool)
    if fd is None:
        try:
            fd = _W["readers"][spool] = os.open(os.path.join(_W["spool_dir"], spool), os.O_RDONLY)
        except FileNotFoundError:
            raise RuntimeError(f"{spool} is gone (a finished build removes its spool): a shard "
                               "changed after the build; rebuild into a new --out") from None
    data = os.pread(fd, n, off)  # one syscall, one copy; no shared file position
    if len(data) != n:
        raise RuntimeError(f"spool {spool} is short at {off}: was {_W['spool_dir']} altered?")
    return data


def write_shard_job(path: str, rows: list[tuple[str, str, int, int, bytes]]) -> tuple[int, int, str]:
    """Write one shard from spooled samples (key, spool, off, len, json); atomic."""
    return write_shard(path, ((k, _read(s, o, n), meta) for k, s, o, n, meta in rows))
