"""Shard sets in an object store: resolve for the loader, open for tar, manifest for stats.

The loader and `seer-shards stats` reach this through one call each (`resolve_remote`,
`open_shard`, `manifest_and_opener`); `seer-shards verify` of a remote set lives in
data_prep/verify_remote.py. The tar parsing stays in shards/format.py, fed a file object.
"""
from __future__ import annotations

import json
from typing import Any, BinaryIO, Dict, List, Tuple

from seer_pipeline.shards.format import MAX_MANIFEST_BYTES
from seer_pipeline.store.reader import ObjectTooLarge, open_remote, read_bytes
from seer_pipeline.store.url import Url, parse


def load_manifest_remote(url: str | Url) -> Dict[str, Any]:
    u = parse(url) if isinstance(url, str) else url
    try:
        return json.loads(read_bytes(u.join("manifest.json"), MAX_MANIFEST_BYTES))
    except ObjectTooLarge as e:
        raise ValueError(f"not a shard manifest: {e}") from e
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest.json under {u} (unfinished build? rerun the same command)") from None
    except ValueError as e:
        raise ValueError(f"{u.join('manifest.json')}: not a JSON manifest ({e})") from e


def resolve_remote(spec: str) -> Tuple[List[Tuple[str, int]], bool]:
    """([(url, count)], exact): a prefix with manifest.json is exact mode; a pattern or list of
    .tar URLs is resampled mode (count -1). The caller wraps the pairs in its Shard type."""
    # lazy: shards.reader imports this module for its remote branch
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


def manifest_and_opener(url: str) -> Tuple[Dict[str, Any], Any]:
    """(manifest, open(name) -> file object) for `seer-shards stats` over a remote set: json
    members only, image payloads skipped by ranged reads where they are large."""
    u = parse(url.rstrip("/"))
    return load_manifest_remote(u), lambda name: open_remote(u.join(name))


__all__ = ["resolve_remote", "open_shard", "manifest_and_opener",
           "load_manifest_remote"]
