"""Shard sets in an object store: resolve for the loader, open for tar, verify and stats.

The loader and `seer-shards verify/stats` reach this through one call each (`resolve_remote`,
`open_shard`, `verify_remote`, `stats_remote`); the tar parsing and sample checks stay in their
modules, fed a file object instead of a path.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

from seer_pipeline.store.objects import list_prefix
from seer_pipeline.store.reader import RemoteFile, open_remote, read_bytes
from seer_pipeline.store.url import Url, parse


def load_manifest_remote(url: str | Url) -> Dict[str, Any]:
    u = parse(url) if isinstance(url, str) else url
    try:
        return json.loads(read_bytes(u.join("manifest.json")))
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest.json under {u} (unfinished build? rerun the same command)") from None
    except ValueError as e:
        raise ValueError(f"{u.join('manifest.json')}: not a JSON manifest ({e})") from e


def resolve_remote(spec: str) -> Tuple[List[Tuple[str, int]], bool]:
    """([(url, count)], exact): a prefix with manifest.json is exact mode; a pattern or list of
    .tar URLs is resampled mode (count -1). The caller wraps the pairs in its Shard type."""
    from seer_pipeline.shards.reader import braceexpand, _split_commas  # the local pattern rules

    parts = _split_commas(spec)
    if len(parts) > 1 or "{" in spec or spec.rstrip("/").endswith(".tar"):
        urls = [x for p in parts for x in braceexpand(p)]
        for x in urls:
            parse(x)
        return [(x, -1) for x in urls], False
    u = parse(spec.rstrip("/"))
    man = load_manifest_remote(u)
    try:
        shards = [(str(u.join(e["name"])), int(e["count"])) for e in man["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"shard manifest under {u} is malformed: {e}") from e
    return shards, True


def open_shard(path: str) -> BinaryIO:
    """A seekable, retrying file object for a remote shard (tarfile reads it like a file)."""
    return open_remote(path)  # type: ignore[return-value]


class HashingReader(io.RawIOBase):
    """Hashes every byte of a forward-only read (forward seeks read the gap through)."""

    def __init__(self, raw: RemoteFile) -> None:
        super().__init__()
        self.raw, self.sha, self.pos = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = self.raw.readinto(b)
        self.sha.update(memoryview(b)[:n])
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset}.get(whence)
        if target is None or target < self.pos:
            raise OSError("HashingReader reads forward only")
        while self.pos < target:
            if not self.read(min(target - self.pos, 1 << 20)):
                break
        return self.pos

    def finish(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def verify_remote(url: str, decode: bool = True) -> List[str]:
    """`seer-shards verify` over s3:// or http(s)://: every shard streamed once, hashed while parsed."""
    import tarfile

    from data_prep.verify import _check_sample, iter_samples

    u = parse(url.rstrip("/"))
    man = load_manifest_remote(u)
    problems: List[str] = []
    listed = {s["name"] for s in man["shards"]}
    prefix = man.get("config", {}).get("prefix", "shard")
    sizes: Optional[Dict[str, int]] = list_prefix(u) if u.scheme == "s3" else None  # http cannot list
    if sizes is not None:
        for name in sorted(sizes):
            if name.startswith(prefix + "-") and name.endswith(".tar") and name not in listed:
                problems.append(f"{name}: shard object not in the manifest")
    keys: set = set()
    total = 0
    for s in man["shards"]:
        if sizes is not None and s["name"] not in sizes:
            problems.append(f"{s['name']}: missing")
            continue
        if sizes is not None and sizes[s["name"]] != s["bytes"]:
            problems.append(f"{s['name']}: {sizes[s['name']]} bytes, manifest says {s['bytes']}")
        n = 0
        raw = HashingReader(RemoteFile(u.join(s["name"]), size=sizes.get(s["name"]) if sizes else None))
        try:
            f = io.BufferedReader(raw, 1 << 20)
            for key, g in iter_samples(f, with_jpg=decode):  # type: ignore[arg-type]
                n += 1
                problems.extend(_check_sample(s["name"], key, g, decode))
                if key in keys:
                    problems.append(f"{s['name']}: key {key} appears more than once in the set")
                keys.add(key)
            f.read()  # the tail after the last member (end-of-archive blocks) is hashed too
            if raw.finish() != s["sha256"]:
                problems.append(f"{s['name']}: sha256 differs from the manifest")
        except FileNotFoundError:
            problems.append(f"{s['name']}: missing")
            continue
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{s['name']}: unreadable tar ({e})")
        if n != s["count"]:
            problems.append(f"{s['name']}: {n} samples, manifest says {s['count']}")
        total += n
    if total != man["written"]:
        problems.append(f"set: {total} samples in shards, manifest says written={man['written']}")
    if man["inputs_seen"] != man["written"] + man["skipped"]:
        problems.append("manifest: inputs_seen != written + skipped")
    return problems


def manifest_and_opener(url: str) -> Tuple[Dict[str, Any], Any]:
    """(manifest, open(name) -> file object) for `seer-shards stats` over a remote set: json
    members only, image payloads skipped by ranged reads where they are large."""
    u = parse(url.rstrip("/"))
    return load_manifest_remote(u), lambda name: open_remote(u.join(name))


__all__ = ["resolve_remote", "open_shard", "verify_remote", "manifest_and_opener",
           "load_manifest_remote"]
