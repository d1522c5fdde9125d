"""Training metrics: RUN/metrics.jsonl (one object per step), TensorBoard, and the console.

Only rank 0 writes. Every step appears exactly once across restarts: on resume from a
checkpoint at step S, lines with step > S (written after that checkpoint by the interrupted run)
are dropped, atomically, before anything new is appended, and the first new line carries
`resumed_from: S`. TensorBoard gets `purge_step` for the same reason.

The console line reads the way SLURM users tail a log: `step N/M`, images per second and the ETA
(from a smoothed step time), then the scalars.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from seer_pipeline.core import metrics_file
from seer_pipeline.core.io_utils import atomic_write_text

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl: objects with an integer `step`. A torn last line (a kill -9
    mid-write) is ignored silently; any other bad line is skipped with one warning
    (core.metrics_file says what counts as bad)."""
    parsed = metrics_file.read_records(path)
    if parsed.skipped:
        log.warning("%s", parsed.summary(str(path)))
    return parsed.rows


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep only records with step <= last_step; returns how many records were dropped.

    Unreadable lines never stop a resume: they are dropped from the file with one warning."""
    p = Path(path)
    parsed = metrics_file.read_records(p)
    if parsed.raw is None and not parsed.skipped:
        return 0  # no file yet
    if parsed.skipped:
        log.warning("%s; removing them so the run can resume", parsed.summary(str(p)))
    keep = [r for r in parsed.rows if r["step"] <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if parsed.raw is None or text.encode() != parsed.raw:
        atomic_write_text(p, text)
    return len(parsed.rows) - len(keep)


class Throughput:
    """Images and training seconds so far (across restarts) and a smoothed step time for the ETA.

    A per-rank checkpoint component (`load_state_dict` gets every saved rank's state): the
    totals are restored from saved rank 0, the rank that logs them.
    """

    _SMOOTH = 0.9  # EMA weight of the past step times: steady ETA, reacts within ~10 steps

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self.step_s: float | None = None

    def update(self, images: int, seconds: float) -> None:
        self.images += images
        self.seconds += seconds
        self.step_s = seconds if self.step_s is None else \
            self._SMOOTH * self.step_s + (1 - self._SMOOTH) * seconds

    def eta_s(self, steps_left: int) -> float:
        return max(0, steps_left) * (self.step_s or 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "seconds": self.seconds}

    def load_state_dict(self, states: list[dict[str, Any] | None]) -> None:
        if states and states[0]:  # None: a checkpoint written before this was saved
            self.images, self.seconds = int(states[0]["images"]), float(states[0]["seconds"])


def format_eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


CONSOLE_KEYS = ("loss", "lr")  # besides step, img/s and ETA


class MetricsLogger:
    """Rank-0 sink for per-step scalars: JSON lines, TensorBoard, console every `log_every`."""

    def __init__(
        self, run_dir: str | Path, rank: int, log_every: int = 10, tensorboard: bool = True,
        resumed_from: int | None = None, total_steps: int = 0,
    ) -> None:
        self.rank = rank
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.path = Path(run_dir) / "metrics.jsonl"
        self._resumed_from = resumed_from
        self._fh = None
        self._tb = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = resumed_from or 0
        dropped = truncate_metrics(self.path, start)
        if dropped:
            log.info("metrics.jsonl: dropped %d line(s) past the checkpoint step %d", dropped, start)
        self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                # optional dev extra and slow to import: only rank 0 with tensorboard on pays
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start + 1)
            except ImportError:  # tensorboard is a dev extra; metrics.jsonl is the record
                log.warning("tensorboard not installed: no event files (metrics.jsonl still written)")

    def log_step(self, step: int, values: Mapping[str, Any]) -> None:
        if self.rank != 0:
            return
        row: dict[str, Any] = {"step": step}
        row.update({k: _plain(v) for k, v in values.items()})
        if self._resumed_from is not None:
            row["resumed_from"] = self._resumed_from
            self._resumed_from = None
        assert self._fh is not None
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if step % self.log_every == 0 or step == 1 or step == self.total_steps:
            head = f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"
            if isinstance(row.get("img_s"), (int, float)):
                head += f" {row['img_s']:.1f} img/s"
            if isinstance(row.get("eta_s"), (int, float)):
                head += f" ETA {format_eta(row['eta_s'])}"
            # The console keeps to what a person watches; every other value (timings, data
            # counters, memory, SwAV statistics) is in metrics.jsonl and TensorBoard.
            shown = " ".join(_fmt(k, row[k]) for k in CONSOLE_KEYS if k in row)
            log.info("%s %s", head, shown)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class SampleLog:
    """`train.record_samples`: RUN/samples/rank{r}.jsonl, one line per step this rank executed:
    {"step", "epoch", "uids" (manifest-order sample ids, -1 in resampled mode), "time"}.

    Append-only, every rank its own file: a step redone after a resume appears again, and the
    last line of a step is the execution the final trajectory kept (the resume is exact, so it
    consumed the same ids). Off by default; it is the evidence that every sample of an epoch was
    consumed once (benchmarks/soak.py). A torn last line (kill -9) is the reader's to skip.
    """

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        path = Path(run_dir) / "samples" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    def log_step(self, step: int, epoch: int, uids: list[int], now: float) -> None:
        self._fh.write(json.dumps({"step": step, "epoch": epoch, "uids": [int(u) for u in uids],
                                   "time": now}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def _fmt(k: str, v: Any) -> str:
    if isinstance(v, float):
        return f"{k}={v:.4g}"
    return f"{k}={v}"
