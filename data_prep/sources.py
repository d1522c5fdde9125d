"""Enumerate inputs in a deterministic order: directories, tar archives, and path lists.

Each input gets an ordinal (its index in the full enumeration); the ordinal plus the source
string identify an input across reruns and across `--part` runs.
"""
from __future__ import annotations

import bz2
import functools
import gzip
import io
import logging
import lzma
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

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
    """'dir', 'tar', 'list', 'file', 'special' (FIFO, device, socket: never opened) or 'missing'."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a device
    except OSError:
        return "missing"
    if stat.S_ISDIR(mode):
        return "dir"
    if not stat.S_ISREG(mode):
        return "special"
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(LIST_SUFFIXES):
        return "list"
    return "file"


# An input's ordinal is (entry << 32) | member: `entry` counts the top-level entries of the
# enumeration (a loose file, an archive, a list), `member` the members inside one. A part can
# then number the members of its own archives without reading anyone else's: a global counter
# would make every part read every archive to count its members (issue #22).
_MEMBER_BITS = 32
WHOLE_ARCHIVES_PER_PART = 4  # archives per part from which archives go to parts whole


def archive_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def count_archives(inputs: Sequence[str], prune: Sequence[str] = (), stop: Optional[int] = None) -> int:
    """Archives among the inputs and in their folders (listing only, nothing read); stops
    counting at `stop`."""
    n = 0
    for inp in inputs:
        if "://" in inp:
            # Here only: the object-store modules stay unloaded for local builds.
            from seer_pipeline.store.url import parse

            n += archive_name(parse(inp).key)
        elif input_kind(inp) == "tar":
            n += 1
        elif input_kind(inp) == "dir":
            n += sum(1 for p in walk_dir(inp, prune) if archive_name(p) and input_kind(p) == "tar")
        if stop is not None and n >= stop:
            break
    return n


def part_by_archive(inputs: Sequence[str], part: tuple[int, int], prune: Sequence[str] = ()) -> bool:
    """Whether `--part I/N` hands whole archives to parts (archive k to part k % N): only with
    at least WHOLE_ARCHIVES_PER_PART per part, where round robin keeps the parts within about
    one archive of each other. Fewer archives are split by member, every part reading each."""
    n = part[1]
    return n > 1 and count_archives(inputs, prune, stop=WHOLE_ARCHIVES_PER_PART * n) >= WHOLE_ARCHIVES_PER_PART * n


def iter_inputs(inputs: Sequence[str], want: Want, max_bytes: Optional[int] = None,
                prune: Sequence[str] = (), part: tuple[int, int] = (0, 1),
                whole_archives: bool = False) -> Iterator[Item]:
    """Yield every input item of `part`; member bytes of archives are read only when `want` says so.

    Loose files, list entries and (unless `whole_archives`) archive members belong to the part
    `in_part` picks from their source; with `whole_archives`, the k-th archive of the
    enumeration belongs whole to part k % N, and the other parts never open it. Archive members
    over `max_bytes` (per their header) are never read. Folders in `prune` (the build's own
    output) are left out of directory walks.
    """
    from data_prep.options import in_part  # options imports this module

    entry, archive = [0], [0]
    mine = lambda src: in_part(src, part)  # noqa: E731

    def counter() -> Callable[[], int]:
        base, m = entry[0] << _MEMBER_BITS, [0]
        entry[0] += 1

        def nxt() -> int:
            m[0] += 1
            return base | (m[0] - 1)
        return nxt

    def one(source: str, **kw: Any) -> Iterator[Item]:
        it = Item(counter()(), source, **kw)
        if mine(source):
            yield it

    def tar(path: str, opener: Optional[Callable[[], BinaryIO]] = None) -> Iterator[Item]:
        nxt, k = counter(), archive[0]
        archive[0] += 1
        if whole_archives and k % part[1] != part[0]:
            return  # another part's archive: not opened
        take = (lambda src: True) if whole_archives else mine
        kw = {} if opener is None else {"fileobj": opener()}
        for it in _iter_tar(path, nxt, lambda o, src: take(src) and want(o, src), max_bytes, **kw):
            if take(it.source):
                yield it

    for inp in inputs:
        if "://" in inp:  # s3:// or http(s):// (seer_pipeline.store)
            from seer_pipeline.store.inputs import iter_remote_input  # lazy: boto3 loads only for remote inputs

            from seer_pipeline.store.url import parse  # lazy, as above

            u = parse(inp)
            if archive_name(u.key):  # streamed, as seer_pipeline.store.inputs does
                from seer_pipeline.store.reader import open_remote

                yield from tar(str(u), functools.partial(open_remote, u))
                continue
            nxt = counter()
            yield from (it for it in iter_remote_input(inp, nxt, lambda o, src: mine(src) and want(o, src),
                                                       functools.partial(_iter_tar, max_bytes=max_bytes), Item,
                                                       max_bytes)
                        if mine(it.source))
            continue
        kind = input_kind(inp)
        if kind == "missing":
            raise FileNotFoundError(f"input does not exist: {inp}")
        if kind == "dir":
            for path in walk_dir(inp, prune):
                # Dumps arrive as folders of archives (img2dataset's output too): read them as archives.
                if archive_name(path) and input_kind(path) == "tar":
                    yield from tar(path)
                else:
                    yield from one(path, path=path)
        elif kind == "special":
            yield from one(inp, reason="not_a_file")
        elif kind == "tar":
            yield from tar(inp)
        elif kind == "list":
            nxt = counter()
            yield from (it for it in _iter_list(inp, nxt) if mine(it.source))
        else:
            yield from one(inp, path=inp)


def walk_dir(root: str, prune: Sequence[str] = ()) -> Iterator[str]:
    """Files under `root`, sorted, following directory symlinks but never into a loop.

    Folders in `prune` (compared by device and inode, so any path to them counts) are skipped.
    """
    seen: set[tuple[int, int]] = set()
    skip: set[tuple[int, int]] = set()
    for p in prune:
        try:
            st = os.stat(p)
            skip.add((st.st_dev, st.st_ino))
        except OSError:
            pass

    def visit(d: str) -> Iterator[str]:
        try:
            st = os.stat(d)
        except OSError:
            return
        ident = (st.st_dev, st.st_ino)
        if ident in skip:
            log.info("not walking %s: it is the build's output folder", d)
            return
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
    """Links, absolute names and `..` components are never inputs."""
    if m.issym() or m.islnk():
        return True
    name = m.name.replace("\\", "/")
    return name.startswith("/") or ".." in PurePosixPath(name).parts


# Extended headers (pax, GNU long names) are read whole into memory by tarfile, at whatever size
# their header declares: a gzip of a few MB can declare gigabytes. Real ones hold a path and a
# few attributes (kilobytes); past this cap the archive is reported damaged (`_iter_tar`).
MAX_META_BYTES = 1 << 20
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


class _Info(tarfile.TarInfo):
    """Notes why the header loop stopped: tarfile ends silently on a header cut in half. Refuses
    extended headers over `MAX_META_BYTES` before tarfile reads them."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > MAX_META_BYTES:
            raise tarfile.ReadError(f"an extended (pax or GNU long-name) header of {self.size} bytes, "
                                    f"over the {MAX_META_BYTES}-byte cap")
        return super()._proc_member(tf)  # type: ignore[misc]

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._seer_stop = type(e).__name__  # type: ignore[attr-defined]
            raise


_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


class _Prefixed(io.RawIOBase):
    """`head` followed by the rest of a non-seekable stream."""

    def __init__(self, head: bytes, f: BinaryIO) -> None:
        self._head, self._f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


def _decompressed(f: BinaryIO) -> BinaryIO:
    """The archive's bytes, decompressed by a reader that never inflates more than it is asked for.

    tarfile's own stream decompression inflates whole input blocks and copies its buffer on
    every small read: skipping a 512 MB member of a 510 KB gzip bomb took minutes and a read held
    it all. These readers decompress at most what each read asks for, so a member skipped by
    its header costs time proportional to its size and no memory.
    """
    head = f.read(6)
    if f.seekable():
        f.seek(0)
    else:  # a remote stream (seer_pipeline.store): put the peeked bytes back in front
        f = io.BufferedReader(_Prefixed(head, f))  # type: ignore[assignment]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if head[:3] == b"BZh":
        return bz2.BZ2File(f, "rb")  # type: ignore[return-value]
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f, "rb")  # type: ignore[return-value]
    return f


def _iter_tar(tar_path: str, nxt: Callable[[], int], want: Want, max_bytes: Optional[int] = None,
              fileobj: Optional[BinaryIO] = None) -> Iterator[Item]:
    # Stream mode reads member by member without seeking back; nothing is extracted to disk.
    try:
        raw = fileobj if fileobj is not None else open(tar_path, "rb")
    except OSError as e:
        log.warning("cannot open archive %s: %s", tar_path, e)
        yield Item(nxt(), tar_path, reason="unreadable")
        return
    try:
        tf = tarfile.open(fileobj=_decompressed(raw), mode="r|", tarinfo=_Info)
    except _ERRORS as e:
        log.warning("cannot open archive %s: %s", tar_path, e)
        raw.close()
        yield Item(nxt(), tar_path, reason="corrupt")
        return
    seen, cut = 0, False
    with raw, tf:
        while True:
            try:
                m = tf.next()
            except _ERRORS as e:
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
            if not m.isreg():  # FIFO, device, ...: nothing to read
                yield Item(ordinal, source, reason="not_a_file")
                continue
            if max_bytes is not None and m.size > max_bytes:
                # Decided from the header: the stream skips the payload in small reads, so a
                # compressed bomb is decompressed through, never held.
                yield Item(ordinal, source, reason="too_large")
                continue
            if not want(ordinal, source):
                yield Item(ordinal, source)
                continue
            try:
                f = tf.extractfile(m)
                data = f.read() if f is not None else None
            except _ERRORS:
                data = None
            if data is None or len(data) != m.size:
                cut = True
                yield Item(ordinal, source, reason="truncated")
                continue
            yield Item(ordinal, source, data=data)
