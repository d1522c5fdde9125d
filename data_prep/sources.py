"""Enumerate inputs in a deterministic order: directories, tar archives, and path lists.

Each input gets an ordinal (its index in the full enumeration); the ordinal plus the source
string identify an input across reruns and across `--part` runs.
"""
from __future__ import annotations

import logging
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass
class Item:
    """One input. Exactly one of `path` (read by a worker), `data` or `reason` is set when wanted."""

    ordinal: int
    source: str
    path: Optional[str] = None
    data: Optional[bytes] = None
    reason: Optional[str] = None


Want = Callable[[int, str], bool]


def input_kind(path: str) -> str:
    """'dir', 'tar', 'list', 'file' or 'missing'."""
    if os.path.isdir(path):
        return "dir"
    if not os.path.exists(path):
        return "missing"
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(LIST_SUFFIXES):
        return "list"
    return "file"


def iter_inputs(inputs: Sequence[str], want: Want) -> Iterator[Item]:
    """Yield every input item; member bytes of archives are read only when `want` says so."""
    counter = [0]

    def nxt() -> int:
        counter[0] += 1
        return counter[0] - 1

    for inp in inputs:
        if "://" in inp:  # s3:// or http(s):// (seer_pipeline.store)
            from seer_pipeline.store.inputs import iter_remote_input

            yield from iter_remote_input(inp, nxt, want, _iter_tar, Item)
            continue
        kind = input_kind(inp)
        if kind == "missing":
            raise FileNotFoundError(f"input does not exist: {inp}")
        if kind == "dir":
            for path in walk_dir(inp):
                yield Item(nxt(), path, path=path)
        elif kind == "tar":
            yield from _iter_tar(inp, nxt, want)
        elif kind == "list":
            yield from _iter_list(inp, nxt)
        else:
            yield Item(nxt(), inp, path=inp)


def walk_dir(root: str) -> Iterator[str]:
    """Files under `root`, sorted, following directory symlinks but never into a loop."""
    seen: set[tuple[int, int]] = set()

    def visit(d: str) -> Iterator[str]:
        try:
            st = os.stat(d)
        except OSError:
            return
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            log.warning("not following %s: directory already visited (symlink loop?)", d)
            return
        seen.add(ident)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list %s: %s", d, e)
            return
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                yield from visit(e.path)
            else:
                yield e.path  # broken links included: the reader reports them

    yield from visit(root)


def _iter_list(list_path: str, nxt: Callable[[], int]) -> Iterator[Item]:
    # Relative entries are relative to the list's folder, so a dump and its list travel together.
    base = os.path.dirname(os.path.abspath(list_path))
    with open(list_path, "r", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = entry if os.path.isabs(entry) else os.path.join(base, entry)
            if not os.path.lexists(path):
                yield Item(nxt(), path, reason="missing")
            else:
                yield Item(nxt(), path, path=path)


def unsafe_member(m: tarfile.TarInfo) -> bool:
    """Links, devices, absolute names and `..` components are never inputs."""
    if not m.isreg():
        return True
    name = m.name.replace("\\", "/")
    return name.startswith("/") or ".." in PurePosixPath(name).parts


class _Info(tarfile.TarInfo):
    """Notes why the header loop stopped: tarfile ends silently on a header cut in half."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._seer_stop = type(e).__name__  # type: ignore[attr-defined]
            raise


def _iter_tar(tar_path: str, nxt: Callable[[], int], want: Want, fileobj: Optional[object] = None) -> Iterator[Item]:
    # Stream mode reads member by member without seeking back; nothing is extracted to disk.
    try:
        tf = tarfile.open(tar_path, mode="r|*", tarinfo=_Info, fileobj=fileobj)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        log.warning("cannot open archive %s: %s", tar_path, e)
        yield Item(nxt(), tar_path, reason="corrupt")
        return
    seen, cut = 0, False
    with tf:
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                log.warning("archive %s is damaged after %d members: %s", tar_path, seen, e)
                if not cut:  # a member already reported truncated is the same damage
                    yield Item(nxt(), f"{tar_path}::<damaged>", reason="corrupt")
                return
            if m is None:
                # A zero block (or plain end of file) ends an archive; half a header means damage.
                if getattr(tf, "_seer_stop", "") not in ("EOFHeaderError", "EmptyHeaderError"):
                    log.warning("archive %s ends inside a header: cut short", tar_path)
                    yield Item(nxt(), f"{tar_path}::<damaged>", reason="truncated")
                return
            tf.members = []  # TarFile keeps every header otherwise: unbounded on huge archives
            seen += 1
            if m.isdir():
                continue
            ordinal = nxt()
            source = f"{tar_path}::{m.name}"
            if unsafe_member(m):
                yield Item(ordinal, source, reason="unsafe_member")
                continue
            if not want(ordinal, source):
                yield Item(ordinal, source)
                continue
            try:
                f = tf.extractfile(m)
                data = f.read() if f is not None else None
            except (tarfile.TarError, OSError, EOFError, zlib.error):
                data = None
            if data is None or len(data) != m.size:
                cut = True
                yield Item(ordinal, source, reason="truncated")
                continue
            yield Item(ordinal, source, data=data)
