"""Preemption signals: handlers only set a flag; ranks agree on it at step boundaries.

SLURM sends SIGTERM (and, with `--signal`, SIGUSR2) to every task; submitit uses SIGUSR2.
A handler that saved or exited right away (as submitit's does, on rank 0 only, mid-step) would
leave the other ranks blocked in a collective, so ours only records the signal. Ranks agree
on it in one place: the trainer's per-step all-reduce, which carries `PreemptionFlag.local`
beside the loss and the non-finite flag (one collective per step, not two), so all ranks see
the signal at the same step and save together.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Any, Callable

from seer_pipeline.core.exit_codes import INTERRUPTED
from seer_pipeline.core.requeue import STOP_SIGNALS

log = logging.getLogger(__name__)

# Ctrl-C is a preemption too (save at the next step, exit 75); a second one aborts at once.
# 130 = 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C.


class PreemptionFlag:
    """Records SIGUSR2/SIGTERM; the trainer's step all-reduce spreads `local` to every rank."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            # os.write/_exit: no logging or unwinding inside a signal handler (and no traceback).
            os.write(2, b"seer-train: second Ctrl-C: aborting without saving\n")
            os._exit(INTERRUPTED)
        if self.signum is None:
            self.signum = signum
            self.received_at = time.monotonic()

    def install(self) -> None:
        """Install the handlers (overriding e.g. submitit's), remembering the old ones."""
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        log.info("preemption handlers installed for %s",
                 ", ".join(signal.Signals(s).name for s in STOP_SIGNALS))

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def local(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "peer signal"


def forward_signals(targets: Callable[[], list[Any]]) -> dict[int, Any]:
    """In a local launcher: pass SIGUSR2/SIGTERM/SIGINT on to each child process."""
    def handler(signum: int, frame: FrameType | None) -> None:
        for p in targets():
            try:
                if p.poll() is None:
                    p.send_signal(signum)
            except OSError:
                pass

    old = {}
    for s in STOP_SIGNALS:
        old[s] = signal.signal(s, handler)
    return old
