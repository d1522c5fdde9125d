"""kill_rank:R - rank R SIGKILLs itself as step 3 starts (seam: `Trainer.train_step`)."""
from __future__ import annotations

import os
import signal

from _lazy import when_imported  # this folder is on sys.path wherever a fault is armed


def arm(value: str) -> None:
    when_imported("seer_pipeline.train.trainer", lambda m: _patch(m.Trainer, int(value)))


def _patch(Trainer: type, target: int) -> None:  # noqa: N803 - the class itself
    original = Trainer.train_step

    def train_step(self, views):  # noqa: ANN001, ANN202 - the seam's own signature
        if self.rank == target and self.step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, views)

    Trainer.train_step = train_step
