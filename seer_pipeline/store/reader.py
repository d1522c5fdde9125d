"""A seekable, retrying file object over a remote object: ranged GETs, resumed at the exact byte.

`tarfile` reads a shard through it as if it were a local file. Each GET asks for a window
(`bytes=pos-end`); a short forward seek (tar skipping a payload) reads through the open stream,
a long one starts a new GET. When a stream breaks (connection reset, idle cut, short body, 5xx,
429/503 throttling) the reader closes it, sleeps (exponential backoff, full jitter, at least any
Retry-After), and asks again from the first byte it has not handed out: the caller sees one
seamless byte stream, so a retry can never skip or repeat a sample. After `attempts` failures
without progress it raises `RemoteReadError` (an OSError: the loader's bad-data policy applies).

Every GET after the first is pinned to the object the first one saw: its ETag goes out as
If-Match, and an answer with another ETag, another total size (Content-Range) or a 412 raises
`ObjectChanged`, never retried. Without the pin, an object replaced between two windows would be
read as the old one's head followed by the new one's tail; with it the shard is a counted read
failure, and a `Content-Range` total that grows on every answer cannot keep a reader going.
"""
from __future__ import annotations

import io
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from seer_pipeline.store.client import http_pool, s3_client
from seer_pipeline.store.url import Url, parse

log = logging.getLogger(__name__)

# Process-wide counters (tests and the benchmark read them; never reset by the reader).
COUNTERS: Dict[str, int] = {"gets": 0, "retries": 0, "bytes": 0, "gave_up": 0}
_RETRY_STATUS = {429, 500, 502, 503, 504}
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RemoteReadError(OSError):
    """The object stayed unreadable after every retry."""


class ObjectChanged(RemoteReadError):
    """The object was replaced (ETag, size or a 412) between two GETs of one reader."""


class ObjectTooLarge(RemoteReadError):
    """`read_bytes` of an object over its caller's cap."""


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float = 0.0) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = int(os.environ.get("SEER_S3_ATTEMPTS", "10"))  # consecutive failures allowed
    base_s: float = 0.05
    max_s: float = 20.0

    def delay(self, failure: int, retry_after: float, rng: random.Random) -> float:
        # Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015): spreads
        # hundreds of throttled readers instead of having them retry in lock-step.
        return min(self.max_s, max(retry_after, rng.uniform(0, self.base_s * 2 ** failure)))


DEFAULT_POLICY = RetryPolicy()
# Bytes per GET: bounds what one broken stream costs and how long a connection stays open.
WINDOW_BYTES = int(os.environ.get("SEER_S3_WINDOW_BYTES", str(64 << 20)))


def _retry_after(headers: Any) -> float:
    try:
        return float((headers or {}).get("retry-after") or (headers or {}).get("Retry-After") or 0)
    except (TypeError, ValueError):
        return 0.0  # an HTTP date: fall back to our own backoff


class RemoteFile(io.RawIOBase):
    """Read-only, seekable view of `url` (s3:// or http(s)://) over ranged GETs."""

    def __init__(self, url: str | Url, size: Optional[int] = None, window: Optional[int] = None,
                 skip_read: int = 1 << 20, policy: Optional[RetryPolicy] = None) -> None:
        super().__init__()
        self.url = parse(url) if isinstance(url, str) else url
        self.size, self.skip_read = size, skip_read
        self.window = max(1, window or WINDOW_BYTES)
        self.policy = policy or DEFAULT_POLICY
        self._pos = 0  # next byte handed to the caller
        self._body: Any = None
        self._spos = self._send = 0  # the open stream's next byte and end (exclusive)
        self._rng = random.Random()
        self.retries = 0
        # The object's identity from the first answer: (ETag or None, Last-Modified or None).
        self._etag: Optional[str] = None
        self._modified: Optional[str] = None
        self._pinned = False

    # -- io.RawIOBase ---------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            offset += self._size()
        elif whence == io.SEEK_CUR:
            offset += self._pos
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        self._pos = offset
        return offset

    def close(self) -> None:
        self._drop()
        super().close()

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if not len(view):
            return 0
        failures = 0
        while True:
            if self.size is not None and self._pos >= self.size:
                return 0
            try:
                self._position_stream()
                if self.size is not None and self._pos >= self.size:
                    return 0
                want = min(len(view), self._send - self._spos)
                chunk = self._body.read(want)
                if not chunk:
                    raise _Retryable(f"short read at byte {self._spos} of {self.size}")
                n = len(chunk)
                view[:n] = chunk
                self._spos += n
                self._pos += n
                COUNTERS["bytes"] += n
                if self._spos >= self._send:
                    self._drop()
                return n
            except (FileNotFoundError, PermissionError, RemoteReadError):  # ObjectChanged too
                raise
            except Exception as e:  # noqa: BLE001 - classified below; unknown errors are not retried
                retry_after = self._classify(e)
                self._drop()
                failures += 1
                self.retries += 1
                COUNTERS["retries"] += 1
                if failures >= self.policy.attempts:
                    COUNTERS["gave_up"] += 1
                    raise RemoteReadError(f"{self.url}: unreadable at byte {self._pos} after "
                                          f"{failures} attempts: {e}") from e
                d = self.policy.delay(failures, retry_after, self._rng)
                log.info("%s: %s; retrying from byte %d in %.2fs (%d/%d)", self.url, e, self._pos, d,
                         failures, self.policy.attempts)
                time.sleep(d)

    # -- streams --------------------------------------------------------------------------------
    def _size(self) -> int:
        if self.size is None:
            self._open(0)  # the first GET's Content-Range carries the total size
        assert self.size is not None
        return self.size

    def _position_stream(self) -> None:
        gap = self._pos - self._spos
        if self._body is not None and 0 <= gap <= self.skip_read and self._pos < self._send:
            while self._spos < self._pos:  # a short forward seek: read through, keep the stream
                chunk = self._body.read(min(self._pos - self._spos, 1 << 16))
                if not chunk:
                    raise _Retryable(f"short read at byte {self._spos}")
                self._spos += len(chunk)
            return
        self._drop()
        self._open(self._pos)

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - closing a broken stream may fail; it is gone anyway
                pass

    def _open(self, start: int) -> None:
        end = start + self.window if self.size is None else min(self.size, start + self.window)
        if self.size is not None and start >= self.size:
            return
        COUNTERS["gets"] += 1
        rng = f"bytes={start}-{end - 1}"
        if self.url.scheme == "s3":
            status, headers, body = self._get_s3(rng)
        else:
            status, headers, body = self._get_http(rng)
        if status == 412:  # If-Match failed: another object now lives under this key
            _close(body)
            raise ObjectChanged(f"{self.url}: replaced while being read (ETag {self._etag} no longer "
                                f"matches at byte {start}); the read is abandoned, not mixed")
        if status == 416:  # range past the end: only an empty object answers this at byte 0
            _close(body)
            if start == 0:
                self.size = 0
                return
            raise _Retryable(f"416 for {rng}")
        m = _RANGE.match(headers.get("content-range", "") or "")
        if status in (200, 206):
            self._pin(headers, body, int(m.group(3)) if status == 206 and m and m.group(3) != "*"
                      else int(headers.get("content-length", -1)) if status == 200 else None)
        if status == 206 and m:
            first, last = int(m.group(1)), int(m.group(2))
            if m.group(3) != "*":
                self.size = int(m.group(3))
            if first != start:
                _close(body)
                raise _Retryable(f"asked for byte {start}, got a range from {first}")
            self._body, self._spos, self._send = body, start, last + 1
        elif status == 200:  # a server without Range support: the whole object, skip to start
            self.size = int(headers.get("content-length", -1))
            if self.size < 0:
                _close(body)
                raise RemoteReadError(f"{self.url}: no Content-Length and no Range support")
            self._body, self._spos, self._send = body, 0, self.size
            while self._spos < min(start, self.size):  # discard up to `start`, however far
                chunk = body.read(min(start - self._spos, 1 << 16))
                if not chunk:
                    raise _Retryable(f"short read at byte {self._spos}")
                self._spos += len(chunk)
        else:
            _close(body)
            raise _Retryable(f"unexpected answer {status} to {rng}")

    def _pin(self, headers: Dict[str, str], body: Any, total: Optional[int]) -> None:
        """Remember the first answer's object; refuse any later answer from another object."""
        etag, modified = headers.get("etag") or None, headers.get("last-modified") or None
        if not self._pinned:
            self._etag, self._modified, self._pinned = etag, modified, True
            if self.size is not None and total is not None and total != self.size:
                _close(body)
                raise ObjectChanged(f"{self.url}: {total} bytes, {self.size} expected (listed or "
                                    f"given): replaced since")
            return
        why = (f"ETag {self._etag} became {etag}" if etag != self._etag else
               f"Last-Modified {self._modified} became {modified}" if modified != self._modified else
               f"size {self.size} became {total}" if total is not None and self.size is not None
               and total != self.size else "")
        if why:
            _close(body)
            raise ObjectChanged(f"{self.url}: replaced while being read ({why}); the read is abandoned, not mixed")

    def _conditions(self) -> Dict[str, str]:
        # A weak ETag (W/"...") never satisfies If-Match (RFC 9110 13.1.1: strong comparison);
        # such an object is still pinned by comparing each answer's ETag above.
        return {"If-Match": self._etag} if self._etag and not self._etag.startswith("W/") else {}

    def _get_s3(self, rng: str) -> tuple[int, Dict[str, str], Any]:
        from botocore.exceptions import ClientError  # lazy: boto3/urllib3 load on the first remote access, not at import

        extra = {"IfMatch": v} if (v := self._conditions().get("If-Match")) else {}
        try:
            r = s3_client(streaming=True).get_object(Bucket=self.url.host, Key=self.url.key, Range=rng, **extra)
        except ClientError as e:
            meta = e.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode", 0) or 0)
            code = e.response.get("Error", {}).get("Code", "")
            if status == 412 or code == "PreconditionFailed":
                return 412, {}, None
            if status == 416 or code == "InvalidRange":
                return 416, {}, None
            _raise_status(self.url, status, f"{code or status}", meta.get("HTTPHeaders"))
            raise
        headers = {k.lower(): v for k, v in r["ResponseMetadata"].get("HTTPHeaders", {}).items()}
        return int(r["ResponseMetadata"].get("HTTPStatusCode", 200)), headers, r["Body"]

    def _get_http(self, rng: str) -> tuple[int, Dict[str, str], Any]:
        r = http_pool().request("GET", self.url.http_url, headers={"Range": rng, **self._conditions()},
                                preload_content=False)
        headers = {k.lower(): v for k, v in r.headers.items()}
        if r.status not in (200, 206, 412, 416):
            r.release_conn()
            _raise_status(self.url, r.status, str(r.status), headers)
        return r.status, headers, r

    def _classify(self, e: BaseException) -> float:
        """Retry-After seconds for a retryable error; re-raises what retrying cannot fix."""
        if isinstance(e, _Retryable):
            return e.retry_after
        from botocore.exceptions import BotoCoreError  # lazy: boto3/urllib3 load on the first remote access, not at import
        from urllib3.exceptions import HTTPError  # lazy: boto3/urllib3 load on the first remote access, not at import

        if isinstance(e, (BotoCoreError, HTTPError, ConnectionError, TimeoutError, OSError)):
            return 0.0
        raise e


def _raise_status(url: Url, status: int, what: str, headers: Any) -> None:
    if status == 404:
        raise FileNotFoundError(f"{url}: not found ({what})")
    if status in (401, 403):
        raise PermissionError(f"{url}: access denied ({what}); check the AWS credentials/profile")
    if status in _RETRY_STATUS:
        raise _Retryable(f"{url}: {what}", _retry_after(headers))
    raise RemoteReadError(f"{url}: {what}")


def _close(body: Any) -> None:
    if body is not None:
        try:
            body.close()
        except Exception:  # noqa: BLE001
            pass


def open_remote(url: str | Url, size: Optional[int] = None, buffer: int = 1 << 20) -> io.BufferedReader:
    """A buffered, seekable reader of a remote object (what `tarfile.open(fileobj=...)` wants)."""
    return io.BufferedReader(RemoteFile(url, size=size), buffer_size=buffer)


def read_bytes(url: str | Url, max_bytes: Optional[int] = None) -> bytes:
    """The whole object, with the reader's retries; `ObjectTooLarge` past `max_bytes`.

    The cap is checked against the declared size before a byte is kept, and against what was
    read (a server that sends more than it declared, or declares nothing, is cut at the cap).
    """
    with RemoteFile(url) as f:
        if max_bytes is None:
            return f.readall()
        out = bytearray()
        while len(out) <= max_bytes:
            if f.size is not None and f.size > max_bytes:  # known after the first GET (1 MiB read)
                raise ObjectTooLarge(f"{f.url}: {f.size} bytes, over the {max_bytes} byte cap for this object")
            chunk = f.read(min(1 << 20, max_bytes + 1 - len(out)))
            if not chunk:
                return bytes(out)
            out += chunk
        raise ObjectTooLarge(f"{f.url}: more than the {max_bytes} byte cap for this object")
