"""`--dedup near` and `--exclude-near` inside `seer-shards build`, kept apart from the builder.

The workers compute each stored image's signature (data_prep.near) from the pixels they store;
it is kept in the build index's `near` table and written into the sample's `json` as `phash`.
Grouping needs every signature of the part, so it is one stage between scan and plan: it
marks the dropped copies `near_duplicate` (and the copies of evaluation images
`excluded_near`) in one transaction, with the kept image's source in `near.dup_of`. A build
killed during the stage redoes it; one killed after it finds `near_done` and goes on.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from array import array
from typing import Any, Iterator, Optional, Sequence

from data_prep.images import read_source
from data_prep.options import MAX_BYTES
from data_prep.sources import iter_inputs
from seer_pipeline.shards import format as fmt

log = logging.getLogger(__name__)
TABLE = "CREATE TABLE IF NOT EXISTS near (ordinal INTEGER PRIMARY KEY, sig TEXT, dup_of TEXT)"


def active(opts: Any) -> bool:
    """Does this build compute signatures? (`--dedup near` or any `--exclude-near`)."""
    return opts.dedup == "near" or bool(getattr(opts, "exclude_near", None))


def attach(idx: Any, opts: Any) -> None:
    missing = [p for p in getattr(opts, "exclude_near", []) if not os.path.exists(p)]
    if missing:  # before the scan, not after an hour of it
        raise FileNotFoundError(f"--exclude-near: no such file or folder: {', '.join(missing)}")
    idx.db.execute(TABLE)
    idx.near = True  # Index.ok_rows joins the signatures in: they go into each sample's json
    idx.commit()


def record(idx: Any, r: Any) -> None:
    if getattr(r, "signature", ""):
        idx.db.execute("INSERT OR REPLACE INTO near (ordinal, sig) VALUES (?, ?)", (r.ordinal, r.signature))


def apply(idx: Any, opts: Any) -> None:
    """The grouping stage: eval copies first (`excluded_near`), then near-duplicates."""
    if idx.get("near_done") == "1":
        return
    import numpy as np  # numpy: loaded only by near-duplicate builds, like data_prep.near

    from data_prep import near  # numpy and faiss: loaded only by near-duplicate builds

    # Columns, as merge_plan holds them: a row per image fetched as Python objects (source and
    # hex signature) held 530 bytes each, 5 GB for a 10^7-image part; these hold 72.
    ordinals, px, raw = array("q"), array("q"), bytearray()
    with SpilledStrings(idx.folder) as srcs:
        for o, src, p, sig in idx.db.execute(
                "SELECT items.ordinal, items.source, items.orig_width * items.orig_height, near.sig "
                "FROM items JOIN near USING (ordinal) WHERE items.reason IS NULL ORDER BY items.ordinal"):
            ordinals.append(o)
            srcs.append(src)
            px.append(p or 0)
            raw += bytes.fromhex(sig)
        sigs = np.frombuffer(raw, dtype=np.uint8).reshape(len(ordinals), near.PARTS * 8)  # no copy
        marks: dict[int, tuple[str, str]] = {}  # row -> (reason, duplicate_of, escaped)
        evals = load_signatures(opts.exclude_near) if getattr(opts, "exclude_near", None) else []
        if evals:
            for i, j, _ in near.pairs(sigs, [s for _, s in evals]):
                marks.setdefault(i, ("excluded_near", fmt.escape_name(evals[j][0])))
        if opts.dedup == "near":
            if marks:  # grouping sees only the rows left after excluded_near
                left: Sequence[int] = [k for k in range(len(ordinals)) if k not in marks]
                left_sigs, left_px = sigs[left], array("q", (px[k] for k in left))
            else:  # all of them: no copies of the columns
                left, left_sigs, left_px = range(len(ordinals)), sigs, px
            drop = near.dedup(left_sigs, left_px, _Picked(srcs, left))
            for d, k in drop.items():
                marks[left[d]] = ("near_duplicate", srcs[left[k]])
        for k, (reason, dup) in marks.items():
            idx.db.execute("UPDATE items SET reason=? WHERE ordinal=?", (reason, ordinals[k]))
            idx.db.execute("UPDATE near SET dup_of=? WHERE ordinal=?", (dup, ordinals[k]))
    idx.put("near_done", 1)
    idx.commit()
    log.info("near-duplicates: %d signatures, %d near_duplicate, %d excluded_near", len(ordinals),
             sum(m[0] == "near_duplicate" for m in marks.values()),
             sum(m[0] == "excluded_near" for m in marks.values()))


def skipped_rows(idx: Any) -> Iterator[tuple[str, ...]]:
    """skipped.tsv rows with the third column (sources unescaped)."""
    q = ("SELECT items.source, items.reason, near.dup_of FROM items LEFT JOIN near USING (ordinal) "
         "WHERE items.reason IS NOT NULL ORDER BY items.ordinal")
    for r in idx.db.execute(q):
        yield fmt.unescape_name(r[0]), r[1], fmt.unescape_name(r[2] or "")


def manifest_entry() -> dict:
    """What a later set needs to know to compare its signatures with this one's."""
    from data_prep import near  # numpy and faiss: loaded only by near-duplicate builds

    return {"signature": near.SIGNATURE, "threshold": near.THRESHOLD, "json_key": "phash"}


# ---------------------------------------------------------------- evaluation images
def shard_set_signatures(d: str) -> Iterator[tuple[str, Optional[str], dict]]:
    """(source, signature, sample json) per sample of a shard set; the signature comes from the
    json (built with --dedup near) or, for older sets, from decoding the stored JPEG."""
    for _, _, src, sig, meta in _shard_signatures(d, fmt.load_manifest(d)):
        yield src, sig, meta


def _shard_signatures(d: str, man: dict) -> Iterator[tuple[str, int, str, Optional[str], dict]]:
    """(shard name, index in the shard, source, signature, json with `key`) per sample, in the
    manifest's order."""
    from data_prep import near  # numpy and faiss: loaded only by near-duplicate builds

    for e in man["shards"]:
        for i, key, s in fmt.read_samples(os.path.join(d, e["name"])):
            try:
                meta = json.loads((s or {}).get("json", b"{}"))
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            meta.setdefault("key", key)
            sig = meta.get("phash")
            if not _is_signature(sig, 16 * near.PARTS):  # absent (older sets) or damaged: recompute
                sig = near.signature_of_bytes((s or {}).get("jpg", b""))
            yield e["name"], i, fmt.unescape_name(str(meta.get("source", key))), sig, meta


def _is_signature(sig: Any, length: int) -> bool:
    return isinstance(sig, str) and len(sig) == length and all(c in "0123456789abcdefABCDEF" for c in sig)


def merge_plan(mans: Sequence[tuple[str, dict]], state: str, workers: int = 1) -> dict:
    """Near-duplicates across the parts of a `--dedup near` build, for data_prep.merge.

    Each part dropped its own copies; here every signature of every part is grouped once more
    and each cross-part copy is dropped by the same rule (largest, then first by source). A
    shard that loses samples is rewritten without them into `state` (same order, same bytes
    for the rest), and the merge moves that file instead of the part's. Returns
    {"replace": {"<part>/<shard>": {path, count, bytes, sha256}}, "skipped": [[source, reason,
    duplicate_of]], "dropped": n}. Rerunning it gives the same files: the rule is a pure function.
    """
    import numpy as np  # numpy: loaded only by near-duplicate merges, like data_prep.near

    from data_prep import near  # numpy and faiss: loaded only by near-duplicate builds

    # Per sample, columns rather than Python objects (a merge holds every part's samples): the
    # signature's 48 bytes, its shard (an index into `shards`), its index in that shard, its
    # pixel count, and where its source lies in a file: sources are read back only for the
    # members of a group (the keeper rule) and for the report.
    shards: list[tuple[str, str]] = []  # (absolute part folder, shard name)
    raw, shard_of, index, px = bytearray(), array("i"), array("i"), array("q")
    with SpilledStrings(state) as srcs:
        for p, man in mans:
            part = os.path.abspath(p)
            for shard, i, src, sig, meta in _shard_signatures(p, man):
                if sig is None:  # undecodable sample: kept, never compared (verify reports it)
                    continue
                if not shards or shards[-1] != (part, shard):
                    shards.append((part, shard))
                raw += bytes.fromhex(sig)
                shard_of.append(len(shards) - 1)
                index.append(i)
                px.append(int(meta.get("orig_width") or 0) * int(meta.get("orig_height") or 0))
                srcs.append(src)
        codes = np.frombuffer(raw, dtype=np.uint8).reshape(len(srcs), near.PARTS * 8)  # no copy
        drop = near.dedup(codes, px, srcs, workers)  # workers: hash-prefix buckets (data_prep.near_buckets)
        skipped = sorted(([srcs[d], "near_duplicate", srcs[k]] for d, k in drop.items()), key=lambda r: r[0])
    by_shard: dict[tuple[str, str], set[int]] = {}
    for d in drop:
        by_shard.setdefault(shards[shard_of[d]], set()).add(index[d])
    replace = {}
    for (p, shard), gone in sorted(by_shard.items()):
        dst = os.path.join(state, f"near-{len(replace):06d}.tar")
        kept = ((k, s["jpg"], s["json"]) for i, k, s in fmt.read_samples(os.path.join(p, shard)) if i not in gone)
        count, nbytes, sha = fmt.write_shard(dst, kept)
        replace[f"{p}/{shard}"] = {"path": dst, "count": count, "bytes": nbytes, "sha256": sha}
    return {"replace": replace, "skipped": skipped, "dropped": len(drop)}


class SpilledStrings(Sequence[str]):
    """An append-only list of strings kept in an unlinked file in `folder` (nothing is left
    behind by a kill), 8 bytes of memory each: a billion sources as Python strings are ~100 GB."""

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self._f = tempfile.TemporaryFile(dir=folder)
        self._ends = array("q")  # where each string ends in the file

    def append(self, s: str) -> None:
        b = s.encode("utf-8", "surrogateescape")  # sources may carry undecodable bytes
        self._f.write(b)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(b))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        self._f.flush()  # pread reads the file, not the write buffer; a no-op once flushed
        i = range(len(self._ends))[i]  # negative indexes; IndexError past the end
        start = self._ends[i - 1] if i else 0
        return os.pread(self._f.fileno(), self._ends[i] - start, start).decode("utf-8", "surrogateescape")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SpilledStrings":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Picked(Sequence[str]):
    """`strings[rows[k]]` as item k: the sources of the images left after excluded_near."""

    def __init__(self, strings: Sequence[str], rows: Sequence[int]) -> None:
        self.strings, self.rows = strings, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> str:  # type: ignore[override]
        return self.strings[self.rows[k]]


def load_signatures(paths: Sequence[str], what: str = "--exclude-near") -> list[tuple[str, str]]:
    """(name, signature) of every image under folders, archives, path lists or shard sets.

    Files that are not readable images are counted and logged (a decontamination that checks
    fewer images than it was given must say so); finding no image at all is an error.
    """
    from data_prep import near  # numpy and faiss: loaded only by near-duplicate builds

    out: list[tuple[str, str]] = []
    bad: list[str] = []
    for p in paths:
        if not os.path.exists(p):
            raise ValueError(f"{what} {p}: no such file or folder")
        if os.path.isdir(p) and os.path.exists(os.path.join(p, fmt.MANIFEST)):
            for src, sig, _ in shard_set_signatures(p):
                (out.append((src, sig)) if sig else bad.append(src))
            continue
        for it in iter_inputs([os.path.abspath(p)], lambda o, s: True):
            data = it.data
            if data is None and it.path is not None:
                data, _ = read_source(it.path, MAX_BYTES)
            sig = near.signature_of_bytes(data) if data else None
            (out.append((it.source, sig)) if sig else bad.append(it.source))
    if bad:  # counted and reported: the check covers fewer images than were given
        log.warning("%s: %d file(s) are not readable images and were not checked, e.g. %r",
                    what, len(bad), bad[0])
    if paths and not out:
        raise ValueError(f"{what} {' '.join(paths)}: no readable image found")
    return out
