"""Reading RUN/metrics.jsonl without trusting it (issue #24).

The file lives in a run folder on a shared file system: any line may be damaged or planted
(non-UTF-8 bytes, a JSON list, `"step": NaN` or `"abc"`, nesting deep enough to exhaust the
parser's recursion). One such line used to stop every resume. Here each line either becomes a
record (a JSON object whose `step` is a non-negative integer) or is counted as skipped with its
reason; readers warn once with the count. Torch-free: `seer-status` reads through it.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A metrics line of ours is a few hundred bytes; anything this long is not one.
MAX_LINE_BYTES = 1 << 16


class BadLine(ValueError):
    """One metrics line that is not a record this project writes."""


def parse_record(raw: bytes) -> dict[str, Any]:
    """One line -> its record; BadLine saying why it is not one."""
    if len(raw) > MAX_LINE_BYTES:
        raise BadLine(f"{len(raw)} bytes long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLine("not UTF-8") from None
    try:
        rec = json.loads(text)
    except RecursionError:
        raise BadLine("JSON nested too deeply") from None
    except ValueError as e:
        raise BadLine(f"not JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(rec, dict):
        raise BadLine(f"a JSON {type(rec).__name__}, not an object")
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 1 << 62:
        raise BadLine(f"'step' is {str(step)[:20]!r}, not a step number")
    return rec


@dataclass
class Parsed:
    """What a metrics file held: its records, and the lines skipped (line number, reason)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    torn_tail: bool = False  # an unterminated last line that does not parse: a write in progress
    raw: bytes | None = None  # the bytes read; None when there was no regular file to read

    def summary(self, name: str) -> str:
        """One warning line, or '' when nothing was skipped."""
        if not self.skipped:
            return ""
        n, why = self.skipped[0]
        return (f"{name}: skipped {len(self.skipped)} unreadable line(s) (first: line {n}, {why})")


def read_file(path: str | os.PathLike) -> tuple[bytes | None, str]:
    """(bytes, '') of a regular file, (None, '') when absent, (None, why) for anything else.

    Opened non-blocking so a FIFO cannot hang the reader; devices (/dev/zero) are refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, os.strerror(e.errno or errno.EIO)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "not a regular file"
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), ""
    except OSError as e:
        return None, os.strerror(e.errno or errno.EIO)
    finally:
        os.close(fd)


def parse_lines(raw: bytes) -> Parsed:
    """Records and skipped lines of metrics.jsonl content."""
    out = Parsed(raw=raw)
    lines = raw.split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    unterminated = not raw.endswith(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.rows.append(parse_record(line.strip()))
        except BadLine as e:
            if i == last and unterminated and str(e).startswith("not JSON"):
                out.torn_tail = True  # the trainer is appending, or was killed mid-write
            else:
                out.skipped.append((i + 1, str(e)))
    return out


def read_records(path: str | os.PathLike) -> Parsed:
    """Parse RUN/metrics.jsonl (absent or not a regular file: no records, `raw` None)."""
    raw, why = read_file(path)
    if raw is None:
        out = Parsed()
        if why:
            out.skipped.append((0, f"{Path(path).name} is unreadable: {why}"))
        return out
    return parse_lines(raw)
