"""Near-duplicate signatures, the Hamming index over them, and grouping (`--dedup near`).

Signature: two 64-bit perceptual hashes (imagehash's pHash: DCT of a 32x32 grey thumbnail),
one of the whole image and one of its centre with `INNER` of each border cut off. Two images
are near-duplicates when the smallest of d(full, full), d(centre_a, full_b), d(full_a,
centre_b) is <= `THRESHOLD` bits. The centre hash is what makes a 2-5% border crop match: a
cropped copy's whole-image hash is close to the original's centre hash. Grey thumbnails make
greyscale and colour-space conversion free; resize, recompression and format change move a
pHash by <= 2 bits on the benchmark photos (docs/benchmarks.md, benchmarks/bench_near_dup.py).

Index: faiss's multi-index hashing (IndexBinaryMultiHash): the 64 bits are cut into `nhash`
substrings and a pair is a candidate when one substring is within `nflip` bits. Pigeonhole
makes it exact up to nhash * (nflip + 1) - 1 bits (3 here); pairs further apart (crops) are
found when their differing bits fall unevenly, which is measured, not assumed.

imagehash, scipy and faiss load only when a near-duplicate flag is used: `seer-shards` starts
without them.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from PIL import Image

SIGNATURE = "phash64-centre-v1"  # recorded in the manifest; a change of method must not mix sets
INNER = 0.035  # border fraction cut for the centre hash: the middle of the 2-5% crop range
THRESHOLD = 8  # bits; unrelated benchmark photos are >= 22 apart, copies <= 6 (docs/benchmarks.md)
_THUMB = 128  # decode JPEGs at a DCT scale of at least this: pHash itself looks at 32x32


def signature(img: Image.Image) -> str:
    """32 hex digits: pHash of the whole image, then of its centre."""
    import imagehash  # scipy + PyWavelets behind it: only near-duplicate builds pay for them

    g = img if img.mode == "L" else img.convert("L")
    w, h = g.size
    dx, dy = round(w * INNER), round(h * INNER)
    centre = g.crop((dx, dy, w - dx, h - dy)) if w - 2 * dx >= 8 and h - 2 * dy >= 8 else g
    return str(imagehash.phash(g)) + str(imagehash.phash(centre))


def signature_of_bytes(data: bytes) -> Optional[str]:
    """The signature of an encoded image, or None when it cannot be decoded."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":  # a 1/8-scale DCT decode is plenty for a 32x32 thumbnail
            img.draft("L", (_THUMB, _THUMB))
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        return signature(img)
    except Exception:  # any decoder failure: the caller counts the input, it never stops a run
        return None


def codes(sigs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(full, centre) uint8 arrays of shape (n, 8) from hex signatures."""
    raw = np.frombuffer(bytes.fromhex("".join(sigs)), dtype=np.uint8) if sigs else np.zeros(0, np.uint8)
    raw = raw.reshape(-1, 16)
    return np.ascontiguousarray(raw[:, :8]), np.ascontiguousarray(raw[:, 8:])


def _index(full: np.ndarray) -> Any:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    import faiss  # a large native library: loaded on the first search, never by a plain build

    # Short substrings (16 bits, no flips) while buckets stay small; above a million codes,
    # 32-bit substrings with one flip keep each probe's bucket near-empty. Both exact to 3 bits.
    nhash, bits, nflip = (4, 16, 0) if len(full) <= 1 << 20 else (2, 32, 1)
    idx = faiss.IndexBinaryMultiHash(64, nhash, bits)
    idx.nflip = nflip
    idx.add(full)
    return idx


def _search(idx: Any, q: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, index row, distance) of every candidate within `threshold` bits."""
    if len(q) == 0 or idx.ntotal == 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    lims, dist, ids = idx.range_search(q, threshold + 1)  # faiss keeps d < radius
    rows = np.repeat(np.arange(len(q)), np.diff(lims).astype(np.int64))
    return rows, ids.astype(np.int64), dist.astype(np.int64)


def pairs(a: Sequence[str], b: Optional[Sequence[str]] = None,
          threshold: int = THRESHOLD) -> list[tuple[int, int, int]]:
    """Near-duplicate pairs (i in a, j in b, distance): within `a` (i < j) when `b` is None."""
    fa, ca = codes(a)
    same = b is None
    fb, cb = (fa, ca) if same else codes(b)
    best: dict[tuple[int, int], int] = {}
    idx = _index(fb)

    def note(i: int, j: int, d: int) -> None:
        if same:
            if i == j:
                return
            i, j = min(i, j), max(i, j)
        best[(i, j)] = min(d, best.get((i, j), d))

    for q in (fa, ca):  # a's full and centre hashes against b's full hashes ...
        for i, j, d in zip(*_search(idx, q, threshold)):
            note(int(i), int(j), int(d))
    if not same:  # ... and b's centre hashes against a's full ones (within a: the same pairs)
        for j, i, d in zip(*_search(_index(fa), cb, threshold)):
            note(int(i), int(j), int(d))
    return sorted((i, j, d) for (i, j), d in best.items())


def groups(n: int, edges: Iterable[tuple[int, int, int]]) -> list[list[int]]:
    """Connected components (of size >= 2) of the near-duplicate graph, by union-find."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in edges:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    comp: dict[int, list[int]] = {}
    for x in range(n):
        comp.setdefault(root(x), []).append(x)
    return [c for c in comp.values() if len(c) > 1]


def keeper(members: Sequence[int], pixels: Sequence[int], sources: Sequence[str]) -> int:
    """The one image a group keeps: the largest, then the first by source name."""
    return min(members, key=lambda k: (-pixels[k], sources[k], k))


def dedup(sigs: Sequence[str], pixels: Sequence[int], sources: Sequence[str]) -> dict[int, int]:
    """{dropped row: kept row} over one set of images."""
    drop: dict[int, int] = {}
    for g in groups(len(sigs), pairs(sigs)):
        k = keeper(g, pixels, sources)
        drop.update({m: k for m in g if m != k})
    return drop
