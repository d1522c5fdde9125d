"""Remote build inputs: an s3:// prefix (every object under it), an s3:// or http(s):// tar
archive (streamed), a .txt list of URLs (or keys relative to the list), or one image URL.

Objects are enumerated in key order (S3 lists keys in UTF-8 binary order), so ordinals are as
stable as a local folder walk. Image bytes are fetched in the build's main process by a few
threads, in order, with a bounded window, and only for inputs of this --part.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import posixpath
from collections import deque
from typing import Any, Callable, Iterator, List, Optional

from seer_pipeline.store.objects import head, list_prefix
from seer_pipeline.store.reader import ObjectTooLarge, RemoteReadError, open_remote, read_bytes
from seer_pipeline.store.url import Url, parse

log = logging.getLogger(__name__)
_TAR = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_LIST = (".txt", ".lst", ".list")
FETCH_THREADS, WINDOW = 8, 64


def iter_remote_input(spec: str, nxt: Callable[[], int], want: Callable[[int, str], bool],
                      iter_tar: Callable[..., Iterator[Any]], item: type,
                      max_bytes: Optional[int] = None) -> Iterator[Any]:
    """Items (data_prep.sources.Item) for one remote input, ordinals from `nxt`; an object over
    `max_bytes` is the item's reason `too_large`, refused from its declared size before it is
    held (a bounded read: `read_bytes` stops at the cap when the size is not declared)."""
    u = parse(spec)
    low = u.key.lower()
    if low.endswith(_TAR):
        yield from iter_tar(str(u), nxt, want, fileobj=open_remote(u))
        return
    if low.endswith(_LIST):
        lines = read_bytes(u).decode("utf-8", "surrogateescape").splitlines()
        urls = [_relative(u, x.strip()) for x in lines if x.strip() and not x.strip().startswith("#")]
        yield from _fetch_in_order(urls, nxt, want, item, max_bytes)
        return
    if u.scheme == "s3" and (not u.key or u.key.endswith("/") or not _exists(u)):
        names = sorted(list_prefix(u))
        if not names:
            raise FileNotFoundError(f"input does not exist: {spec} (no object, no objects under it)")
        yield from _fetch_in_order([str(u.join(n)) for n in names], nxt, want, item, max_bytes)
        return
    yield from _fetch_in_order([str(u)], nxt, want, item, max_bytes)


def _relative(list_url: Url, entry: str) -> str:
    """A list entry: a URL, or a key relative to the list's folder (as local lists are)."""
    if "://" in entry:
        return entry
    folder = posixpath.dirname(list_url.key)
    key = posixpath.normpath(posixpath.join(folder, entry.lstrip("/") if entry.startswith("/") else entry))
    if key.startswith(".."):
        raise ValueError(f"{list_url}: entry {entry!r} points above the bucket")
    return str(Url(list_url.scheme, list_url.host, key))


def _exists(u: Url) -> bool:
    return head(u) is not None


def _get(url: str, max_bytes: Optional[int] = None) -> tuple:
    try:
        return read_bytes(url, max_bytes), None
    except FileNotFoundError:
        return None, "missing"
    except ObjectTooLarge:
        return None, "too_large"
    except (RemoteReadError, PermissionError) as e:
        log.warning("%s: %s", url, e)
        return None, "unreadable"


def _fetch_in_order(urls: List[str], nxt: Callable[[], int], want: Callable[[int, str], bool],
                    item: type, max_bytes: Optional[int] = None) -> Iterator[Any]:
    pending: deque = deque()
    with cf.ThreadPoolExecutor(FETCH_THREADS) as pool:
        def emit(entry: tuple) -> Any:
            o, url, fut = entry
            if fut is None:
                return item(o, url)
            data, reason = fut.result()
            return item(o, url, data=data) if reason is None else item(o, url, reason=reason)

        for url in urls:
            o = nxt()
            pending.append((o, url, pool.submit(_get, url, max_bytes) if want(o, url) else None))
            while len(pending) > WINDOW:
                yield emit(pending.popleft())
        while pending:
            yield emit(pending.popleft())
