"""kill_rank:R - rank R SIGKILLs itself as step 3 starts (seam: `Trainer.train_step`)."""
from __future__ import annotations

import os
import signal


def arm(value: str) -> None:
    from seer_pipeline.train.trainer import Trainer

    target, original = int(value), Trainer.train_step

    def train_step(self, views):  # noqa: ANN001, ANN202 - the seam's own signature
        if self.rank == target and self.step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, views)

    Trainer.train_step = train_step
