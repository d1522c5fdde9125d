"""`seer-eval compare A B ... --data SPEC`: several weight files on the same splits, one table.

Each model gets `seer-eval all` with the same data, transform, subsets, seed and low-shot
subsets; the label digest each run reports must agree, so the table never compares models on
different images. Writes OUT/compare.md, OUT/compare.json and OUT/compare.png.
"""
from __future__ import annotations

import argparse
import copy
import io
import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from seer_pipeline.core.io_utils import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

log = logging.getLogger(__name__)

# (column title, path into a result): the protocols of the SEER paper's tables, then the quick ones.
COLUMNS = (
    ("SGD linear top-1", ("linear_sgd", "accuracy")),
    ("SGD linear top-5", ("linear_sgd", "top5")),
    ("L-BFGS linear", ("linear", "accuracy")),
    ("1% low-shot", ("low_shot", "1%", "accuracy")),
    ("10% low-shot", ("low_shot", "10%", "accuracy")),
    ("k-NN top-1", ("knn", "accuracy")),
    ("k-NN top-5", ("knn", "top5")),
)


class CompareError(ValueError):
    """The models were not evaluated on the same images."""


def _get(res: dict[str, Any], path: tuple[str, ...]) -> float | None:
    cur: Any = res
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return float(cur) if isinstance(cur, (int, float)) else None


def table(results: list[dict[str, Any]], names: list[str]) -> tuple[list[str], list[list[float | None]]]:
    """Columns present in at least one result, and one row of values per model."""
    cols = [(t, p) for t, p in COLUMNS if any(_get(r, p) is not None for r in results)]
    return [t for t, _ in cols], [[_get(r, p) for _, p in cols] for r in results]


def markdown(names: list[str], titles: list[str], rows: list[list[float | None]], first: dict) -> str:
    head = "| model | " + " | ".join(titles) + " |\n|---|" + "---|" * len(titles) + "\n"
    body = "".join("| " + n + " | " + " | ".join("-" if v is None else f"{v:.2f}" for v in r) + " |\n"
                   for n, r in zip(names, rows))
    return (f"# seer-eval compare: {first['data']}\n\nTest accuracy (%), {first['n_train']} train / "
            f"{first['n_test']} test images, {first['num_classes']} classes, the same images for every "
            f"model (labels digest {first['labels_digest']}). SGD linear: BN + linear head on "
            f"precomputed features; low-shot: class-balanced subsets, L-BFGS probe; k-NN k=20, T=0.07.\n\n"
            + head + body)


def plot(names: list[str], titles: list[str], rows: list[list[float | None]], path: Path) -> None:
    import matplotlib  # lazy: matplotlib loads only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(titles) * max(1, len(names)) / 2), 4))
    width = 0.8 / max(1, len(names))
    xs = np.arange(len(titles))
    for i, (n, r) in enumerate(zip(names, rows)):
        ax.bar(xs + i * width, [np.nan if v is None else v for v in r], width, label=n)
    ax.set_xticks(xs + width * (len(names) - 1) / 2, titles, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _name(spec: str) -> str:
    p = Path(spec)
    return spec if ":" in spec or spec == "raw" else (p.name if p.is_dir() else p.stem)


def run_compare(args: argparse.Namespace, run_eval: Callable[[argparse.Namespace], dict]) -> dict[str, Any]:
    out_dir = Path(args.out) if args.out else Path(args.out_dir) / "compare"
    results, names = [], []
    for spec in args.models:
        a = copy.copy(args)
        a.mode, a.checkpoint = "all", spec
        name = _name(spec)
        while name in names:
            name += "'"
        a.out = str(out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + ".json"))
        a.features_dir = None
        log.info("compare: evaluating %s", spec)
        results.append(run_eval(a))
        names.append(name)
    digests = {r["labels_digest"] for r in results}
    if len(digests) != 1:
        raise CompareError(f"the models saw different labelled images (digests {sorted(digests)})")
    titles, rows = table(results, names)
    summary = {"data": results[0]["data"], "models": names, "columns": titles, "rows": rows,
               "results": results, "table": str(out_dir / "compare.md"), "plot": str(out_dir / "compare.png")}
    atomic_write_text(out_dir / "compare.md", markdown(names, titles, rows, results[0]))
    atomic_write_json(out_dir / "compare.json", summary)
    plot(names, titles, rows, out_dir / "compare.png")
    log.info("compare: table %s, plot %s", summary["table"], summary["plot"])
    return summary
