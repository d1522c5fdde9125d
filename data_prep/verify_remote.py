"""`seer-shards verify` over s3:// or http(s)://: every shard streamed once, hashed while parsed."""
from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Any, Dict, List, Optional

from data_prep.verify import check_samples, count_matches, iter_samples, set_problems
from seer_pipeline.shards.format import ShardReadError
from seer_pipeline.shards.remote import load_manifest_remote
from seer_pipeline.store.objects import list_prefix
from seer_pipeline.store.reader import RemoteFile
from seer_pipeline.store.url import parse

# Objects a shard set's folder may hold before its listing is refused: shards + manifest +
# skipped.tsv, with room for strays; 1e5 shards is a billion images (shards/format.py).
MAX_LISTED = 1_000_000


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
    u = parse(url.rstrip("/"))
    man = load_manifest_remote(u)
    problems: List[str] = []
    listed = {s["name"] for s in man["shards"]}
    prefix = man.get("config", {}).get("prefix", "shard")
    sizes: Optional[Dict[str, int]] = list_prefix(u, MAX_LISTED) if u.scheme == "s3" else None  # http cannot list
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
        n = [0]
        raw = HashingReader(RemoteFile(u.join(s["name"]), size=sizes.get(s["name"]) if sizes else None))
        try:
            f = io.BufferedReader(raw, 1 << 20)
            check_samples(s["name"], iter_samples(f, with_jpg=decode), decode, keys, problems, n)
            f.read()  # the tail after the last member (end-of-archive blocks) is hashed too
            if raw.finish() != s["sha256"]:
                problems.append(f"{s['name']}: sha256 differs from the manifest")
        except FileNotFoundError:
            problems.append(f"{s['name']}: missing")
            continue
        except (ShardReadError, tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{s['name']}: unreadable tar ({e})")
        total += count_matches(s, n[0], problems)
    return problems + set_problems(man, total)
