"""save_enospc:S - every rank's checkpoint write of step S fails with ENOSPC, as on a full file
system (seam: `safe_dcp.HashingFileSystemWriter.write_data`, each rank's file writes of a save).
"""
from __future__ import annotations

import errno
import os

from _lazy import when_imported  # this folder is on sys.path wherever a fault is armed


def arm(value: str) -> None:
    when_imported("seer_pipeline.checkpoint.safe_dcp", lambda m: _patch(m.HashingFileSystemWriter, int(value)))


def _patch(Writer: type, target: int) -> None:  # noqa: N803 - the class itself
    original = Writer.write_data

    def write_data(self, plan, planner):  # noqa: ANN001, ANN202 - the seam's own signature
        if os.path.basename(str(self.path)).startswith(f"step_{target:09d}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return original(self, plan, planner)

    Writer.write_data = write_data
