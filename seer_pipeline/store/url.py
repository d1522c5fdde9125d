"""Where shards live: a local path, `s3://bucket/key` or `http(s)://host/path`."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import urlsplit

REMOTE_SCHEMES = ("s3", "http", "https")


def is_remote(spec: object) -> bool:
    """True for s3:// and http(s):// URLs; local paths (and os.PathLike) are not remote."""
    return isinstance(spec, str) and spec.split("://", 1)[0].lower() in REMOTE_SCHEMES and "://" in spec


@dataclass(frozen=True)
class Url:
    """A parsed remote location. For s3, `host` is the bucket and `key` the object key (no
    leading slash); for http(s), `host` is host[:port] and `key` the path (no leading slash)."""

    scheme: str
    host: str
    key: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}/{self.key}"

    def join(self, *names: str) -> "Url":
        key = self.key.rstrip("/")
        for n in names:
            key = f"{key}/{n.lstrip('/')}" if key else n.lstrip("/")
        return Url(self.scheme, self.host, key)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key.rstrip("/"))

    @property
    def http_url(self) -> str:
        if self.scheme == "s3":
            raise ValueError(f"{self} is an s3 URL; it has no plain HTTP address")
        return str(self)


def parse(spec: str) -> Url:
    """Parse and check a remote URL; raises ValueError naming what is wrong."""
    if not is_remote(spec):
        raise ValueError(f"not an s3:// or http(s):// URL: {spec!r}")
    parts = urlsplit(spec)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise ValueError(f"{spec!r}: query strings and fragments are not supported in shard URLs")
    if not parts.netloc:
        raise ValueError(f"{spec!r}: no {'bucket' if scheme == 's3' else 'host'}")
    if "@" in parts.netloc:  # credentials in a URL would end up in logs and configs
        raise ValueError(f"{spec!r}: credentials in URLs are refused; use the AWS environment/profile")
    key = parts.path.lstrip("/")
    if scheme == "s3" and (".." in key.split("/")):
        raise ValueError(f"{spec!r}: '..' is not allowed in an s3 key")
    return Url(scheme, parts.netloc, key)
