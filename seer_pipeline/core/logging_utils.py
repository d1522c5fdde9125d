"""Logging, set up once per process: rank 0 to stdout, every rank to its own file."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FMT = "%(asctime)s %(levelname)s [rank%(rank)s] %(name)s: %(message)s"
_configured = False


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(
    rank: int = 0, log_dir: str | os.PathLike | None = None, level: int = logging.INFO,
    name: str = "seer",
) -> logging.Logger:
    """Configure the root logger. Safe to call again (e.g. once the run folder is known)."""
    global _configured
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_seer", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    fmt = logging.Formatter(_FMT, datefmt="%Y-%m-%d %H:%M:%S")
    rank_filter = _RankFilter(rank)
    if rank == 0:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(fmt)
        out.addFilter(rank_filter)
        out._seer = True  # type: ignore[attr-defined]
        root.addHandler(out)
    else:
        # Non-zero ranks still surface errors on stderr: a failing rank must be visible.
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.ERROR)
        err.setFormatter(fmt)
        err.addFilter(rank_filter)
        err._seer = True  # type: ignore[attr-defined]
        root.addHandler(err)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(log_dir) / f"rank{rank}.log")
        fh.setFormatter(fmt)
        fh.addFilter(rank_filter)
        fh._seer = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    _configured = True
    return logging.getLogger(name)
