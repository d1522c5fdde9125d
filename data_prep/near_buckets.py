"""The near-duplicate search above `near.FLAT_MAX` images, cut into hash-prefix buckets.

`seer-shards merge` groups every part's signatures again. One faiss index over them all holds
every code in one process (1.9 GiB at 10^7; ~190 GiB at 10^9) and searches on one core. Here
the same pairs are found bucket by bucket, each bucket independent, so `--workers` processes
share them and each holds one bucket's codes at a time (as data_prep.dedup does for exact dedup).

The rule is the scale index's (near._index above FLAT_MAX: faiss IndexBinaryMultiHash, two 32-bit
halves, one flip): a query and a whole-image code are a candidate when one 32-bit half of each
is within one bit, and a pair when their 64-bit distance is <= the threshold. A half within one
bit has one of its two 16-bit quarters equal (the flipped bit, if any, is in the other one). So
bucket (quarter q, top `PREFIX_BITS` of its value) holds every code and query by that quarter,
and finds, among those with the quarter equal, the pairs whose sibling quarter is within one
bit: 17 exact lookups of the half per query in the bucket's sorted halves. Every candidate of
the single index is found in at least one bucket, and nothing else is (tests/test_near_dup.py
compares the two pair for pair).
"""
from __future__ import annotations

import concurrent.futures as cf
from typing import Iterator

import numpy as np

PREFIX_BITS = 4  # 4 quarters x 16 prefixes = 64 buckets, each ~1/16 of the codes and queries


_SHARED: dict = {}  # the codes of the search in progress: forked workers inherit them


def _halves(c: np.ndarray) -> np.ndarray:
    """(n, 2) uint32 halves of (n, 8) uint8 codes: bytes 0-3 and 4-7, as faiss cuts them."""
    return np.ascontiguousarray(c).view(">u4").reshape(-1, 2).astype(np.uint32)


def _bucket(q: int, prefix: int, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, code row, distance) of the pairs found in bucket (quarter q, prefix)."""
    h, hi = q // 2, q % 2 == 0  # the half holding quarter q; is q its high quarter?
    shift = np.uint32(16 + (16 - PREFIX_BITS) if hi else 16 - PREFIX_BITS)
    mask = np.uint32((1 << PREFIX_BITS) - 1)

    def members(halves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        half = halves[:, h]
        rows = np.nonzero((half >> shift) & mask == prefix)[0]
        return rows, half[rows]

    crow, ckey = members(_SHARED["full_halves"])
    qrow, qkey = members(_SHARED["query_halves"])
    order = np.argsort(ckey, kind="stable")
    crow, ckey = crow[order], ckey[order]
    sibling = 0 if hi else 16  # the bit offset of the other quarter of the half
    flips = np.array([0] + [1 << (sibling + b) for b in range(16)], dtype=np.uint32)
    out_q, out_c = [], []
    for f in flips:  # the sibling quarter equal, then each one-bit change of it
        probe = qkey ^ f
        lo = np.searchsorted(ckey, probe, "left")
        n = np.searchsorted(ckey, probe, "right") - lo
        hit = np.nonzero(n)[0]
        if len(hit) == 0:
            continue
        reps = n[hit]
        out_q.append(np.repeat(qrow[hit], reps))
        first = np.repeat(lo[hit] - (np.cumsum(reps) - reps), reps)  # code range of each hit, flattened
        out_c.append(crow[first + np.arange(int(reps.sum()))])
    if not out_q:
        e = np.zeros(0, np.int64)
        return e, e, e
    qi, ci = np.concatenate(out_q), np.concatenate(out_c)
    d = np.bitwise_count(_SHARED["queries"][qi] ^ _SHARED["full"][ci]).astype(np.int64)
    keep = d <= threshold
    return qi[keep], ci[keep], d[keep]


def _run(tasks: list[tuple[int, int]], threshold: int) -> list:
    return [_bucket(q, p, threshold) for q, p in tasks]


def search(full: np.ndarray, queries: np.ndarray, threshold: int,
           workers: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(query row, code row, distance) arrays, one triple per bucket, for (n, 8) uint8 codes;
    a pair found in two buckets comes twice (callers keep one, as near.pairs does)."""
    tasks = [(q, p) for q in range(4) for p in range(1 << PREFIX_BITS)]
    _SHARED.update(full=np.ascontiguousarray(full).view(np.uint64).ravel(), full_halves=_halves(full),
                   queries=np.ascontiguousarray(queries).view(np.uint64).ravel(), query_halves=_halves(queries))
    try:
        import multiprocessing as mp  # only a parallel merge pays for the pool

        if workers <= 1 or "fork" not in mp.get_all_start_methods():
            yield from _run(tasks, threshold)
            return
        # fork: the workers inherit _SHARED instead of receiving the codes pickled
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for res in pool.map(_run, [tasks[i::workers] for i in range(workers)], [threshold] * workers):
                yield from res
    finally:
        _SHARED.clear()
