"""`seer-shards contamination SHARDS EVAL...`: which evaluation images have near-copies in a set.

The shard set's signatures come from its samples' `json` (`phash`, written by `--dedup near`
and `--exclude-near` builds) or, for a set built without them, from decoding each stored JPEG
(slower: about the cost of `seer-shards verify`). Evaluation images are read like
`--exclude-near` reads them: folders, archives, path lists or other shard sets.
The report is markdown (printed) and JSON (`--json PATH`, written atomically).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from data_prep import near_build
from seer_pipeline.core.io_utils import atomic_write_json


def contamination(shards: str, evals: Sequence[str]) -> dict:
    """The report: every evaluation image with a near-copy in `shards`, and its copies."""
    from data_prep import near  # numpy and faiss: loaded only by this command and near builds

    if "://" in shards:
        raise ValueError(f"{shards}: contamination reads a local shard set (copy it down first)")
    if not os.path.isdir(shards):
        raise FileNotFoundError(f"{shards}: no such shard set folder")
    names, sigs, metas, unreadable = [], [], [], 0
    for src, sig, meta in near_build.shard_set_signatures(shards):
        if sig is None:  # counted in the report: those samples were not compared
            unreadable += 1
            continue
        names.append(src)
        sigs.append(sig)
        metas.append(meta)
    ev = near_build.load_signatures(list(evals), "evaluation images")
    found: dict[int, list[dict]] = {}
    for i, j, d in near.pairs([s for _, s in ev], sigs):
        found.setdefault(i, []).append({"source": names[j], "key": metas[j].get("key", ""),
                                        "sha256": metas[j].get("sha256", ""), "distance": d})
    hits = [{"eval": ev[i][0], "copies": sorted(found[i], key=lambda c: (c["distance"], c["source"]))}
            for i in sorted(found, key=lambda i: ev[i][0])]
    return {
        "shard_set": os.path.abspath(shards),
        "eval_inputs": [os.path.abspath(e) for e in evals],
        "signature": near.SIGNATURE,
        "threshold": near.THRESHOLD,
        "eval_images": len(ev),
        "shard_samples": len(sigs),
        "shard_samples_unreadable": unreadable,
        "contaminated": len(hits),
        "copies": sum(len(h["copies"]) for h in hits),
        "images": hits,
    }


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(rep: dict) -> str:
    lines = [f"# Contamination of {rep['shard_set']}", "",
             f"{rep['contaminated']} of {rep['eval_images']} evaluation images have near-copies "
             f"({rep['copies']} samples) among {rep['shard_samples']} samples "
             f"(signature {rep['signature']}, <= {rep['threshold']} bits).", ""]
    if rep["shard_samples_unreadable"]:
        lines += [f"{rep['shard_samples_unreadable']} samples could not be decoded and were not compared.", ""]
    if rep["images"]:
        lines += ["| evaluation image | copies in the set | distance (bits) |", "|---|---|---|"]
        for h in rep["images"]:
            for c in h["copies"]:
                lines.append(f"| {_cell(h['eval'])} | {_cell(c['source'])} | {c['distance']} |")
    return "\n".join(lines) + "\n"


def run(shards: str, evals: Sequence[str], json_path: Optional[str] = None) -> int:
    """The command: print markdown, write JSON; exit 1 when a copy is found, 0 when clean."""
    rep = contamination(shards, evals)
    if json_path:
        atomic_write_json(json_path, rep)
    print(markdown(rep), end="")
    return 1 if rep["contaminated"] else 0
