"""`seer-shards verify` and `seer-shards stats`: read a shard set back against its manifest."""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from typing import Any, Iterator

from PIL import Image

from seer_pipeline.shards import format as fmt
from seer_pipeline.shards.format import file_sha256, load_manifest
from seer_pipeline.store.url import is_remote

__all__ = ["format_stats", "iter_samples", "load_manifest", "stats", "verify"]

# Short-side bins for the resolution histogram (pixels, lower bounds).
_BINS = (0, 64, 128, 256, 512, 1024, 2048, 4096)


def iter_samples(path: Any, with_jpg: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample; `jpg` reads as b"" unless `with_jpg`. `path` may be an
    open file object (a remote shard, seer_pipeline.store)."""
    for _, key, group in fmt.read_samples(path, skip_exts=() if with_jpg else ("jpg",)):
        yield key, group or {}


def verify(d: str, decode: bool = True) -> list[str]:
    """Every problem found, as a line of text; an empty list means the set is sound."""
    if is_remote(d):  # s3:// or http(s)://: streamed, hashed while parsed
        from data_prep.verify_remote import verify_remote  # lazy: it imports this module; boto3 loads only for remote sets

        return verify_remote(d, decode)
    man = load_manifest(d)
    problems: list[str] = []
    keys: set[str] = set()
    total = 0
    listed = {s["name"] for s in man["shards"]}
    prefix = man.get("config", {}).get("prefix", "shard")
    for fn in sorted(os.listdir(d)):
        if fn.startswith(prefix + "-") and fn.endswith(".tar") and fn not in listed:
            problems.append(f"{fn}: shard file not in the manifest")
    for s in man["shards"]:
        path = os.path.join(d, s["name"])
        if not os.path.isfile(path):
            problems.append(f"{s['name']}: " + ("not a regular file" if os.path.lexists(path) else "missing"))
            continue
        if os.path.getsize(path) != s["bytes"]:
            # The hash cannot match either: not hashing spares reading a planted 6 GiB file.
            problems.append(f"{s['name']}: {os.path.getsize(path)} bytes, manifest says {s['bytes']}")
        elif file_sha256(path) != s["sha256"]:
            problems.append(f"{s['name']}: sha256 differs from the manifest")
        n = [0]
        try:
            check_samples(s["name"], iter_samples(path, with_jpg=decode), decode, keys, problems, n)
        except fmt.ShardReadError as e:
            problems.append(f"{s['name']}: unreadable tar ({e})")
        total += count_matches(s, n[0], problems)
    return problems + set_problems(man, total)


def check_samples(name: str, samples: Iterator[tuple[str, dict[str, bytes]]], decode: bool,
                  keys: set[str], problems: list[str], n: list[int]) -> None:
    """Check each sample of shard `name` and that its key is new to the set; n[0] counts them
    (a list, so the count survives a read error part way)."""
    for key, g in samples:
        n[0] += 1
        problems.extend(_check_sample(name, key, g, decode))
        if key in keys:
            problems.append(f"{name}: key {key} appears more than once in the set")
        keys.add(key)


def count_matches(entry: dict[str, Any], n: int, problems: list[str]) -> int:
    if n != entry["count"]:
        problems.append(f"{entry['name']}: {n} samples, manifest says {entry['count']}")
    return n


def set_problems(man: dict[str, Any], total: int) -> list[str]:
    """Problems of the set as a whole: the samples found against the manifest's accounting."""
    out = []
    if total != man["written"]:
        out.append(f"set: {total} samples in shards, manifest says written={man['written']}")
    if man["inputs_seen"] != man["written"] + man["skipped"]:
        out.append("manifest: inputs_seen != written + skipped")
    return out


def _check_sample(shard: str, key: str, g: dict[str, bytes], decode: bool) -> list[str]:
    where = f"{shard}: {key}"
    if set(g) != {"jpg", "json"}:
        return [f"{where}: members {sorted(g)}, expected jpg and json"]
    try:
        meta = json.loads(g["json"])
    except ValueError:
        return [f"{where}: json does not parse"]
    if not decode:
        return []
    try:
        with Image.open(io.BytesIO(g["jpg"])) as im:
            if im.format != "JPEG":
                return [f"{where}: jpg member is {im.format}"]
            im.load()
            size = im.size
    except Exception as e:  # any decoder failure is a finding, not a crash
        return [f"{where}: jpg does not decode ({e})"]
    if size != (meta.get("width"), meta.get("height")):
        return [f"{where}: decoded {size[0]}x{size[1]}, json says {meta.get('width')}x{meta.get('height')}"]
    return []


def stats(d: str) -> dict[str, Any]:
    """Counts, sizes and a short-side histogram; reads json members only."""
    opener = None
    if is_remote(d):
        from seer_pipeline.shards.remote import manifest_and_opener  # lazy: boto3 loads only for remote sets

        man, opener = manifest_and_opener(d)
    else:
        man = load_manifest(d)
    hist: Counter[int] = Counter()
    pixels = 0
    for s in man["shards"]:
        try:
            for _, g in iter_samples(opener(s["name"]) if opener else os.path.join(d, s["name"]), with_jpg=False):
                meta = json.loads(g.get("json", b"{}") or b"{}")
                w, h = meta.get("width", 0), meta.get("height", 0)
                pixels += w * h
                hist[max(b for b in _BINS if b <= min(w, h))] += 1
        except (fmt.ShardReadError, OSError) as e:  # one line from the CLI (rc 2), not a traceback
            raise ValueError(f"{s['name']}: unreadable ({e}); `seer-shards verify` lists every problem") from e
    nbytes = sum(s["bytes"] for s in man["shards"])
    n = man["written"]
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(_BINS, _BINS[1:])] + [f"{_BINS[-1]}+"]
    return {
        "shards": len(man["shards"]),
        "inputs_seen": man["inputs_seen"],
        "written": n,
        "skipped": man["skipped"],
        "duplicates": man["duplicates"],
        "reasons": man.get("reasons", {}),
        "bytes": nbytes,
        "mean_bytes_per_sample": round(nbytes / n) if n else 0,
        "mean_megapixels": round(pixels / n / 1e6, 4) if n else 0.0,
        "short_side_histogram": {lab: hist.get(lo, 0) for lab, lo in zip(labels, _BINS)},
    }


def format_stats(st: dict[str, Any]) -> str:
    lines = [
        f"shards {st['shards']}  written {st['written']}  skipped {st['skipped']} "
        f"(duplicates {st['duplicates']})  inputs {st['inputs_seen']}",
        f"bytes {st['bytes']:,}  mean/sample {st['mean_bytes_per_sample']:,}  "
        f"mean MP {st['mean_megapixels']}",
        "skip reasons: " + (", ".join(f"{k} {v}" for k, v in st["reasons"].items()) or "none"),
        "short side:",
    ]
    top = max(st["short_side_histogram"].values(), default=0) or 1
    for lab, c in st["short_side_histogram"].items():
        lines.append(f"  {lab:>10} {c:8d} {'#' * round(40 * c / top)}")
    return "\n".join(lines)
