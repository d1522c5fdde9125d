"""Near-duplicate signatures, the Hamming index over them, and grouping (`--dedup near`).

Signature: six 64-bit perceptual hashes (pHash as imagehash computes it: DCT of a 32x32 grey thumbnail) of
the whole image, of its centre (`INNER` cut from every border) and of the four crops that cut
`INNER` from two adjacent borders. Two images are near-duplicates when any hash of one is
within `THRESHOLD` bits of the other's whole-image hash. The crop hashes are what make a 2-5%
border crop match: the cropped copy's whole-image hash is close to one of the original's
crop hashes, whichever borders were cut. Grey thumbnails make greyscale and colour-space
conversion free; resize, recompression and format change move a pHash by <= 4 bits on the
benchmark photos (docs/benchmarks.md, benchmarks/bench_near_dup.py).

Index (faiss): brute force (IndexBinaryFlat, exact) up to `FLAT_MAX` images; above, multi-index
hashing (IndexBinaryMultiHash): the 64 bits are cut into two 32-bit halves and a pair is a
candidate when one half is within one bit, which pigeonhole makes exact up to 3 bits: nearly
every resize, recompression, format change and greyscale copy of the benchmark, but only some
crops (4-8 bits away). More probes cost 27x the time (docs/benchmarks.md has the measured trade).

numpy and faiss load only when a near-duplicate flag is used: `seer-shards` starts without them.
imagehash itself is the tests' reference (tests/test_near_dup.py), not a runtime dependency.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from PIL import Image

SIGNATURE = "phash64x6-v1"  # recorded in the manifest; a change of method must not mix sets
INNER = 0.035  # border fraction cut for the centre hash: the middle of the 2-5% crop range
THRESHOLD = 8  # bits; unrelated benchmark photos are >= 22 apart, copies <= 6 (docs/benchmarks.md)
PARTS = 6  # 64-bit hashes per signature: whole, centre, 4 corner-anchored crops
FLAT_MAX = 1 << 15  # codes up to which the index is brute force (exact at THRESHOLD)
_THUMB = 128  # decode JPEGs at a DCT scale of at least this: pHash itself looks at 32x32


# DCT-II rows 0..7 over 32 samples, unnormalised like scipy.fftpack.dct (what imagehash uses):
# C[k, n] = 2 cos(pi k (2n + 1) / 64).
_DCT = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)
_GRID = 128  # the decoded image is squashed to GRID x GRID once; every hash is read from it
_CUT = round(_GRID * INNER)  # 4 of 128: INNER in grid pixels
# (first, last) grid columns (or rows) of whole, centre and the four corner-anchored crops
_SPANS = [((0, _GRID), (0, _GRID)), ((_CUT, _GRID - _CUT), (_CUT, _GRID - _CUT)),
          ((0, _GRID - _CUT), (0, _GRID - _CUT)), ((_CUT, _GRID), (0, _GRID - _CUT)),
          ((0, _GRID - _CUT), (_CUT, _GRID)), ((_CUT, _GRID), (_CUT, _GRID))]  # (x span, y span)


def _area(a: int, b: int) -> np.ndarray:
    """(32, GRID) area-averaging weights taking grid pixels [a, b) to 32 samples."""
    step = (b - a) / 32
    lo = a + step * np.arange(32)[:, None]
    px = np.arange(_GRID)[None, :]
    return np.clip(np.minimum(px + 1, lo + step) - np.maximum(px, lo), 0, None) / step


# Per span: DCT rows times the area resampling, so a hash is L_y @ grid @ L_x.T (8 x 8). float32:
# 35% less time than float64 per signature, the same bits on the benchmark grids.
_LY = np.stack([_DCT @ _area(*y) for _, y in _SPANS]).astype(np.float32)
_LXT = np.ascontiguousarray(np.stack([(_DCT @ _area(*x)).T for x, _ in _SPANS])).astype(np.float32)


def signature(img: Image.Image) -> str:
    """96 hex digits: pHashes of the whole image, its centre, then its four corner-anchored crops.

    pHash as imagehash computes it (a 32x32 grey thumbnail, 2-D DCT, the 8x8 low frequencies
    against their median), but with the six thumbnails area-averaged out of one 128x128 grid by
    matrix products: imagehash.phash called six times (a LANCZOS resize, scipy's DCT and a bit
    string each) cost more than a resize build's own work per image (docs/benchmarks.md). The
    whole-image hash stays within a few bits of imagehash's (tests/test_near_dup.py).
    """
    if img.mode == "RGB":  # box first, grey after: Pillow's box filter takes half the time on
        # RGB that it takes on L (0.10 vs 0.20 ms at 256x358). Both steps are linear, so only the
        # rounding moves: <= 2 bits of the signature, 0 on 86% of the build benchmark's images.
        g = img.resize((_GRID, _GRID), Image.Resampling.BOX).convert("L")
    else:
        g = (img if img.mode == "L" else img.convert("L")).resize((_GRID, _GRID), Image.Resampling.BOX)
    low = (_LY @ np.asarray(g, dtype=np.float32) @ _LXT).reshape(len(_SPANS), 64)
    srt = np.sort(low, axis=1)
    bits = low > (srt[:, 31:32] + srt[:, 32:33]) / 2  # above the median of the 64
    return np.packbits(bits, axis=1).tobytes().hex()


def jpeg_scale(width: int, height: int) -> tuple[int, int]:
    """The size a JPEG is decoded at for its signature: the DCT scale (1/2, 1/4, 1/8) that
    Pillow's draft() picks for a `_THUMB` thumbnail, so that simplejpeg (the build's strict
    decode, data_prep.images) and Pillow (`signature_of_bytes`) hash the same pixels."""
    s = min(width // _THUMB, height // _THUMB)
    m = next((m for m in (8, 4, 2) if s >= m), 1)
    return -(-width // m), -(-height // m)


def signature_of_grey(arr: np.ndarray) -> str:
    """The signature of a decoded grey image, (h, w) or (h, w, 1) uint8."""
    return signature(Image.fromarray(np.ascontiguousarray(arr.reshape(arr.shape[0], arr.shape[1]))))


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


Signatures = Union[Sequence[str], np.ndarray]  # hex strings, or their bytes as uint8 rows


def codes(sigs: Signatures) -> tuple[np.ndarray, np.ndarray]:
    """(whole, all): uint8 arrays of shape (n, 8) and (n * PARTS, 8) from hex signatures, or
    from an (n, PARTS * 8) uint8 array of their bytes (a merge's millions of signatures)."""
    if isinstance(sigs, np.ndarray):
        if sigs.dtype != np.uint8 or sigs.ndim != 2 or sigs.shape[1] != PARTS * 8:
            raise ValueError(f"signature rows must be uint8 of width {PARTS * 8}, not {sigs.dtype} {sigs.shape}")
        raw = sigs
    else:
        raw = np.frombuffer(bytes.fromhex("".join(sigs)), dtype=np.uint8) if sigs else np.zeros(0, np.uint8)
    raw = raw.reshape(-1, PARTS, 8)
    return np.ascontiguousarray(raw[:, 0]), np.ascontiguousarray(raw.reshape(-1, 8))


BRUTE_MAX = 1 << 25  # query x code comparisons up to which numpy searches without faiss


class _Brute:
    """Exact Hamming range search in numpy, for small sets: importing faiss alone costs 0.15 s
    of CPU, 10% of a 1,000-image build; numpy compares its 6,000 x 1,000 codes in 0.02 s.
    Same interface and the same pairs as faiss's IndexBinaryFlat (tests/test_near_dup.py)."""

    def __init__(self, full: np.ndarray) -> None:
        self.codes = full.view(np.uint64).ravel()
        self.ntotal = len(self.codes)

    def range_search(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qq = q.view(np.uint64).ravel()
        step = max(1, (1 << 20) // max(self.ntotal, 1))  # a block's XOR is at most 8 MiB
        rows, ids, dist = [], [], []
        for s in range(0, len(qq), step):
            d = np.bitwise_count(qq[s:s + step, None] ^ self.codes[None, :])
            r, j = np.nonzero(d < radius)  # faiss's rule: d < radius
            rows.append(r + s)
            ids.append(j)
            dist.append(d[r, j])
        r = np.concatenate(rows)
        lims = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=len(qq)))])
        return lims, np.concatenate(dist), np.concatenate(ids)


def _index(full: np.ndarray, queries: Optional[int] = None) -> Any:
    """The index over `full`; with the number of `queries` to come, numpy brute force when
    that is cheaper than loading faiss."""
    if queries is not None and len(full) * queries <= BRUTE_MAX and hasattr(np, "bitwise_count"):
        return _Brute(full)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    import faiss  # a large native library: loaded on the first search, never by a plain build

    # Short substrings (16 bits, no flips) while buckets stay small; above a million codes,
    # 32-bit substrings with one flip keep each probe's bucket near-empty. Both exact to 3 bits.
    if len(full) <= FLAT_MAX:  # brute force is exact and, this small, fast enough
        idx = faiss.IndexBinaryFlat(64)
    else:  # two 32-bit halves, one flip: 0.05 ms a query at 10^6 codes; (4, 16, 1), exact to
        # 7 bits, cost 1.4 ms (docs/benchmarks.md)
        idx = faiss.IndexBinaryMultiHash(64, 2, 32)
        idx.nflip = 1
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


def pairs(a: Signatures, b: Optional[Signatures] = None,
          threshold: int = THRESHOLD, workers: int = 1) -> list[tuple[int, int, int]]:
    """Near-duplicate pairs (i in a, j in b, distance): within `a` (i < j) when `b` is None.
    Above FLAT_MAX codes, `workers` > 1 share the search out by hash-prefix buckets
    (data_prep.near_buckets): the same pairs as the single index."""
    fa, qa = codes(a)
    same = b is None
    fb, qb = (fa, qa) if same else codes(b)
    best: dict[tuple[int, int], int] = {}

    def note(i: int, j: int, d: int) -> None:
        if same:
            if i == j:
                return
            i, j = min(i, j), max(i, j)
        best[(i, j)] = min(d, best.get((i, j), d))

    # every hash of a against b's whole-image hashes; and every hash of b against a's (within
    # one set the first search already covers both directions)
    for i, j, d in _found(fb, qa, threshold, workers):
        note(int(i) // PARTS, int(j), int(d))
    if not same:
        for j, i, d in _found(fa, qb, threshold, workers):
            note(int(i), int(j) // PARTS, int(d))
    return sorted((i, j, d) for (i, j), d in best.items())


def _found(full: np.ndarray, q: np.ndarray, threshold: int, workers: int) -> Iterator[tuple[Any, Any, Any]]:
    """(query row, code row, distance) of every pair: one index, or hash-prefix buckets."""
    if workers > 1 and len(full) > FLAT_MAX:
        from data_prep import near_buckets  # the parallel search: merges of large sets only

        for r, j, d in near_buckets.search(full, q, threshold, workers):
            yield from zip(r, j, d)
        return
    yield from zip(*_search(_index(full, len(q)), q, threshold))


def groups(n: int, edges: Iterable[tuple[int, int, int]]) -> list[list[int]]:
    """Connected components (of size >= 2) of the near-duplicate graph, by union-find.

    Only images that have an edge enter the union-find: one slot per image in a list, and a
    component list per singleton, cost 2.0 GB and 11 s for a 10^7-image part with 10^5 copies;
    images without an edge are their own group and never dropped. Groups come in the order
    of their smallest member, members ascending (each root is its component's minimum)."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        path = []
        while (up := parent.get(x, x)) != x:
            path.append(x)
            x = up
        for y in path:  # path compression
            parent[y] = x
        return x

    for i, j, _ in edges:
        if not (0 <= i < n and 0 <= j < n):
            raise IndexError(f"edge ({i}, {j}) outside {n} images")
        parent.setdefault(i, i)
        parent.setdefault(j, j)
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    comp: dict[int, list[int]] = {}
    for x in sorted(parent):
        comp.setdefault(root(x), []).append(x)
    return [c for c in comp.values() if len(c) > 1]


def keeper(members: Sequence[int], pixels: Sequence[int], sources: Sequence[str]) -> int:
    """The one image a group keeps: the largest, then the first by source name."""
    return min(members, key=lambda k: (-pixels[k], sources[k], k))


def dedup(sigs: Signatures, pixels: Sequence[int], sources: Sequence[str], workers: int = 1) -> dict[int, int]:
    """{dropped row: kept row} over one set of images."""
    drop: dict[int, int] = {}
    for g in groups(len(sigs), pairs(sigs, workers=workers)):
        k = keeper(g, pixels, sources)
        drop.update({m: k for m in g if m != k})
    return drop
