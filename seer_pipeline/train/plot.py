"""`seer-plot RUN [--out FILE]`: loss, lr and throughput of a run as one PNG."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from seer_pipeline.train.metrics import read_metrics


def _num(v: object) -> float | None:
    """A plottable number, or None: lines of a run folder may hold anything (issue #24)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # a 400-digit integer
        return None
    return f if math.isfinite(f) else None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    # matplotlib takes seconds to import (cold): only drawing pays, not `seer-plot --help`
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no rows to plot")
    out = Path(out) if out else Path(run_dir) / "training.png"
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for ax, key, label in zip(axes, ("loss", "lr", "img_s"), ("SwAV loss", "learning rate", "images/s")):
        pts = [(s, v) for s, r in zip(steps, rows) if (v := _num(r.get(key))) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for r in rows:
        if (at := _num(r.get("resumed_from"))) is not None:
            for ax in axes:
                ax.axvline(at, color="grey", ls="--", lw=0.8)
    axes[-1].set_xlabel("step")
    axes[0].set_title(f"{Path(run_dir).name}: {len(rows)} steps (dashed: resumes)")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seer-plot", description=__doc__)
    ap.add_argument("run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not Path(args.run).is_dir():  # not "no rows to plot": there is no run at all
        print(f"seer-plot: no such folder: {args.run}", file=sys.stderr)
        return 1
    try:
        print(plot_run(args.run, args.out))
    except (OSError, ValueError) as e:
        print(f"seer-plot: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
