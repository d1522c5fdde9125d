"""kill_in_save:S - rank 0 SIGKILLs itself in step S's commit, after every rank's files are
written and before meta.json/rename/`latest` (seam: `Checkpointer._finalize`)."""
from __future__ import annotations

import os
import signal

from _lazy import when_imported  # this folder is on sys.path wherever a fault is armed


def arm(value: str) -> None:
    when_imported("seer_pipeline.checkpoint.checkpointer", lambda m: _patch(m.Checkpointer, int(value)))


def _patch(Checkpointer: type, target: int) -> None:  # noqa: N803 - the class itself
    original = Checkpointer._finalize

    def _finalize(self, step, *args, **kwargs):  # noqa: ANN001, ANN202 - the seam's own signature
        if self.rank == 0 and step == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step, *args, **kwargs)

    Checkpointer._finalize = _finalize
