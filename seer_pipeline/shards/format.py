"""The shard set format, owned here: names, keys, members, tar bytes, manifest, skipped.tsv.

A shard set is a folder of `<prefix>-NNNNNN.tar` files plus `manifest.json` and `skipped.tsv`.
Each shard is a ustar archive of samples; a sample is consecutive members sharing a key
(`<key>.jpg` + `<key>.json`), the WebDataset convention: the key ends at the first dot of the
member's base name. Every reader (the loader, `seer-shards verify`, the build's resume check) and
every writer (the build, the synthetic test sets) goes through this module.

Names of inputs (file paths, tar member names) are kept as `str` decoded with
`surrogateescape`, so bytes that are not UTF-8 survive. Wherever a name is stored as text
(the build index, a sample's `json`, `skipped.tsv`) it is written with `escape_name`:
    `\\` -> `\\\\`; TAB, LF, CR -> `\\t`, `\\n`, `\\r`; other control characters (< 0x20,
    0x7f) -> `\\xHH`; a byte that is not UTF-8 (0x80-0xff) -> `\\xHH`; any other lone
    surrogate -> `\\uHHHH`; everything else (quotes too) as is.
`unescape_name` inverts it exactly, and `os.fsencode(unescape_name(s))` gives the raw bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tarfile
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Optional, Union

from seer_pipeline.core.io_utils import atomic_open, atomic_write_json, atomic_write_text

FORMAT_VERSION = 1  # manifest "version"; manifests written before it existed are version 1
MANIFEST, SKIPPED = "manifest.json", "skipped.tsv"
SAMPLE_EXTS = ("jpg", "json")  # the members every sample has, in this order
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIPPED_HEADER = "source\treason"
SKIPPED_HEADER_DUP = "source\treason\tduplicate_of"  # near-duplicate builds (data_prep.near)
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar(1) and tarfile pad an archive to a whole record
# The largest member any reader holds in memory, and the build's default (and ceiling) for
# `--max-bytes` (data_prep/options.py): nothing the builder writes is larger, so a bigger member
# is hostile or damaged. SEER's Instagram images are a few hundred KB (Goyal et al. 2021, sec. 3.1).
MAX_MEMBER_BYTES = 256 << 20
# Extended headers (pax, GNU long names) are read whole by tarfile before any member: a name or
# a handful of pax records are bytes to kilobytes, so 1 MiB leaves room and bounds a hostile one.
MAX_HEADER_BYTES = 1 << 20
# manifest.json is read whole: an entry is ~150 bytes (name, count, bytes, sha256), so 1e9 images
# at the default 10,000 a shard (1e5 shards) is ~15 MB; 64 MiB is 4x that and bounds a hostile one.
MAX_MANIFEST_BYTES = 64 << 20
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)


class ShardReadError(RuntimeError):
    """The shard could not be opened or ended early (truncated / corrupt tar)."""


# ---------------------------------------------------------------- names
_ESC = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_NEEDS = re.compile(r"[\\\x00-\x1f\x7f\ud800-\udfff]")
_UNESC = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|[\\tnr])")


def _esc(m: re.Match) -> str:
    c = m.group(0)
    if c in _ESC:
        return _ESC[c]
    o = ord(c)
    if o < 0x80:
        return f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:  # surrogateescape's stand-in for the raw byte o - 0xdc00
        return f"\\x{o - 0xDC00:02x}"
    return f"\\u{o:04x}"


def _unesc(m: re.Match) -> str:
    g = m.group(1)
    if g[0] == "x":
        o = int(g[1:], 16)
        return chr(o) if o < 0x80 else chr(0xDC00 + o)
    if g[0] == "u":
        return chr(int(g[1:], 16))
    return {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}[g]


def escape_name(name: str) -> str:
    """A name as printable, valid UTF-8 text without TAB/LF/CR; reversible (module docstring)."""
    return _NEEDS.sub(_esc, name)


def unescape_name(text: str) -> str:
    """Inverse of `escape_name`: the surrogateescape'd `str` of the original name."""
    return _UNESC.sub(_unesc, text)


def write_skipped(path: str, rows: Iterable[tuple[str, ...]]) -> None:
    """skipped.tsv: a header, then one `escaped source<TAB>reason` line per skipped input.

    Rows of three (source, reason, duplicate_of), written by `--dedup near`/`--exclude-near`
    builds, add a third column naming the kept (or evaluation) image; without them the file
    is byte for byte the two-column one.
    """
    rows = list(rows)
    if any(len(r) > 2 for r in rows):
        lines = [SKIPPED_HEADER_DUP] + [f"{escape_name(r[0])}\t{r[1]}\t{escape_name(r[2]) if len(r) > 2 else ''}"
                                        for r in rows]
    else:
        lines = [SKIPPED_HEADER] + [f"{escape_name(src)}\t{reason}" for src, reason in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_skipped(path: str, raw: bool = False, dup: bool = False) -> list[tuple[str, ...]]:
    """(source, reason) rows of skipped.tsv, or (source, reason, duplicate_of) with `dup`
    ("" where there is none); names unescaped unless `raw`. Reads both header forms."""
    with open(path, "r", encoding="utf-8", newline="\n") as f:  # only LF ends a row
        lines = f.read().split("\n")
    if not lines or lines[0] not in (SKIPPED_HEADER, SKIPPED_HEADER_DUP):
        raise ValueError(f"{path}: not a skipped.tsv (header {lines[0][:40]!r})")
    three = lines[0] == SKIPPED_HEADER_DUP
    rows: list[tuple[str, ...]] = []
    for ln in lines[1:]:
        if ln:
            other = ""
            if three:  # escaped names hold no TAB: the last TAB starts the third column
                ln, _, other = ln.rpartition("\t")
            src, _, reason = ln.rpartition("\t")
            name = (lambda x: x) if raw else unescape_name
            rows.append((name(src), reason, name(other)) if dup else (name(src), reason))
    return rows


# ---------------------------------------------------------------- keys and members
def split_key(name: str) -> tuple[str, str]:
    """'dir/abc.def.jpg' -> ('dir/abc', 'def.jpg') as WebDataset does (key ends at the first dot)."""
    base = os.path.basename(name)
    dot = base.find(".")
    if dot < 0:
        return name, ""
    prefix = name[: len(name) - len(base)]
    return prefix + base[:dot], base[dot + 1:].lower()


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def sample_json(row: Mapping[str, Any]) -> bytes:
    """The `json` member of a built sample; compact and key-ordered so its size is predictable.

    `source` must already be escaped (`escape_name`): the index stores it that way.
    """
    meta = {k: row[k] for k in ("source", "sha256", "width", "height", "orig_width", "orig_height")}
    if "phash" in row.keys() and row["phash"]:  # --dedup near / --exclude-near builds: data_prep.near
        meta["phash"] = row["phash"]
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------- writing
def member_bytes(nbytes: int) -> int:
    """Bytes one member occupies in a ustar archive: header plus data padded to a block."""
    return BLOCK + (nbytes + BLOCK - 1) // BLOCK * BLOCK


def tar_bytes(payload: int) -> int:
    """Archive size given the summed `member_bytes`: two zero blocks, padded to a record."""
    total = payload + 2 * BLOCK
    return (total + RECORD - 1) // RECORD * RECORD


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


class _HashingWriter:
    """Hashes what is written, so a shard is never read back to get its sha256."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> None:
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)


def write_shard(path: str, samples: Iterable[tuple[str, bytes, bytes]]) -> tuple[int, int, str]:
    """Write (key, jpg, json) samples to `path` atomically; returns (count, bytes, sha256).

    Byte-deterministic: the same samples give the same file, so a resumed build and an
    uninterrupted one produce identical shards.
    """
    d, base = os.path.split(path)
    count = 0
    with atomic_open(path, os.path.join(d, f".{base}.tmp")) as raw:
        hw = _HashingWriter(raw)
        for key, jpg, meta in samples:
            for ext, data in zip(SAMPLE_EXTS, (jpg, meta)):
                hw.write(ustar_header(f"{key}.{ext}", len(data)))
                hw.write(data)
                if len(data) % BLOCK:
                    hw.write(b"\0" * (BLOCK - len(data) % BLOCK))
            count += 1
        hw.write(b"\0" * (tar_bytes(hw.n) - hw.n))  # two zero blocks, then a whole record
    return count, hw.n, hw.h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open_shard(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- reading
def open_shard(path: Union[str, BinaryIO]) -> BinaryIO:
    """The one place a shard's bytes are opened; an open file object (a remote shard from
    seer_pipeline.store) is used as it is.

    Regular files only, as the builder reads its inputs (data_prep/images.read_source): the open
    is O_NONBLOCK so a FIFO cannot block it (a plain open waits for a writer forever), and the
    type comes from fstat of the opened descriptor, so a swap after any earlier check is caught.
    """
    if hasattr(path, "read"):
        return path  # type: ignore[return-value]
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is {_file_kind(mode)}, not a regular file (shards are read from regular files only)")
        os.set_blocking(fd, True)  # back to plain reads: O_NONBLOCK was only for the open
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


class _CappedInfo(tarfile.TarInfo):
    """A header whose declared size is checked before tarfile acts on it.

    tarfile reads a pax or GNU long-name header's payload whole while parsing, and a member's
    payload whole on `extractfile().read()`: a header declaring 1 TiB would be a MemoryError
    (or a hang on a sparse file), not a read failure. `_proc_member` is where tarfile dispatches
    on the type after parsing the 512-byte block, before it reads anything more.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        cap = MAX_HEADER_BYTES if self.type in _META_TYPES else MAX_MEMBER_BYTES
        if self.size > cap:
            what, const = (("extended header", "MAX_HEADER_BYTES") if self.type in _META_TYPES
                           else ("member", "MAX_MEMBER_BYTES"))
            raise MemberTooLarge(f"{what} {self.name!r} declares {self.size} bytes, over the "
                                 f"{cap} byte cap (shards/format.py {const})")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class MemberTooLarge(ShardReadError):
    """A tar header declares more bytes than any reader holds (MAX_MEMBER_BYTES)."""


def read_samples(path: Union[str, BinaryIO], want: Callable[[int], bool] = lambda i: True, stop: Optional[int] = None,
                 skip_exts: tuple[str, ...] = ()) -> Iterator[tuple[int, str, Optional[dict[str, bytes]]]]:
    """(index, key, {ext: bytes} or None when not wanted) per sample of a shard, in order.

    Payloads are read only for wanted samples and extensions not in `skip_exts` (those read as
    b""); a seekable file skips them without reading. Raises ShardReadError (after yielding what
    was readable) when the file cannot be opened or the tar is damaged. Stops before `stop`.
    A file object passed in stays open (its caller owns it); a path's file is closed here.
    """
    try:
        f = open_shard(path)
    except OSError as e:
        raise ShardReadError(f"cannot open shard {path}: {e}") from e
    try:
        tf = tarfile.open(fileobj=f, mode="r:" if f.seekable() else "r|", tarinfo=_CappedInfo)
    except (OSError, tarfile.TarError, ShardReadError) as e:
        if f is not path:
            f.close()
        raise ShardReadError(f"cannot open shard {path}: {e}") from e
    with (contextlib.nullcontext() if f is path else f), tf:
        key, idx, cur = None, -1, None
        try:
            while True:
                member = tf.next()
                if member is None:
                    break
                tf.members = []  # tarfile keeps every header otherwise
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key:
                    if key is not None:
                        yield idx, key, cur
                        if stop is not None and idx + 1 >= stop:
                            return
                    key, idx = k, idx + 1
                    cur = {} if want(idx) else None
                if cur is not None:
                    if ext in skip_exts:
                        cur[ext] = b""
                        continue
                    m = tf.extractfile(member)
                    data = m.read() if m is not None else b""
                    if len(data) != member.size:
                        raise ShardReadError(f"shard {path}: member {member.name} is truncated")
                    cur[ext] = data
        except (OSError, tarfile.TarError, EOFError, MemberTooLarge) as e:
            raise ShardReadError(f"shard {path} is damaged after sample {idx}: {e}") from e
        if key is not None:
            yield idx, key, cur


def shard_keys(path: str) -> list[str]:
    """Sample keys of a shard in order, from the tar headers only."""
    return [k for _, k, _ in read_samples(path, want=lambda i: False)]


# ---------------------------------------------------------------- manifest
def check_manifest(man: Any, where: str) -> dict:
    """The manifest, checked: a supported version, and shard entries that name plain files."""
    if not isinstance(man, dict):
        raise ValueError(f"{where}: a manifest is a JSON object, got {type(man).__name__}")
    version = man.get("version", 1)  # unversioned manifests predate the field: version 1
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: manifest version {version!r} is not supported (this seer_pipeline "
                         f"reads version {FORMAT_VERSION}); rebuild the set or upgrade seer_pipeline")
    shards = man.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{where}: manifest has no 'shards' list")
    for e in shards:
        name = e.get("name") if isinstance(e, dict) else None
        if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", ".."):
            raise ValueError(f"{where}: shard entry {e!r} does not name a file in the set's folder")
        for k in ("count", "bytes"):
            if k in e and (not isinstance(e[k], int) or e[k] < 0):
                raise ValueError(f"{where}: shard {name}: {k} must be a non-negative integer")
    return man


def load_manifest(shard_dir: str) -> dict:
    """`<shard_dir>/manifest.json`, checked. FileNotFoundError when absent, ValueError when bad."""
    p = os.path.join(shard_dir, MANIFEST)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no {MANIFEST} in {shard_dir} (unfinished build? rerun the same command)")
    if os.path.getsize(p) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{p}: {os.path.getsize(p)} bytes, over the {MAX_MANIFEST_BYTES} byte cap of a manifest")
    try:
        with open(p, "r", encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read shard manifest {p}: {e}") from e
    return check_manifest(man, p)


def write_manifest(shard_dir: str, manifest: Mapping[str, Any]) -> dict:
    """Write the manifest atomically, stamped with the current version; returns what was written."""
    man = {"version": FORMAT_VERSION, **{k: v for k, v in manifest.items() if k != "version"}}
    check_manifest(man, shard_dir)
    atomic_write_json(os.path.join(shard_dir, MANIFEST), man)
    return man
