"""A slow filesystem under rank 0's checkpoint commit: `slow_finalize:SECONDS`.

Patches the seam `Checkpointer._finalize(self, step, ...)` (rank 0 writes meta.json, renames
`step_N.partial`, switches `latest`, purges) so that rank 0 sleeps SECONDS before committing,
as renames and fsyncs of hundreds of files on a parallel filesystem would. Other ranks are not
delayed: they reach the end of the save at once, which is what made them leave early (#20).
Pick SECONDS above SLURM's KillWait (slurm/local-cluster: 30 s) to test the preemption path.
"""
from __future__ import annotations

import sys
import time
from typing import Any


def arm(value: str) -> None:
    seconds = float(value)
    # Imported here, not at module level: only processes that arm this fault pay for torch.
    from seer_pipeline.checkpoint import checkpointer

    real = checkpointer.Checkpointer._finalize

    def slow_finalize(self: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        if self.rank == 0:
            print(f"fault slow_finalize: rank 0 sleeps {seconds:g} s before committing step {step}",
                  file=sys.stderr, flush=True)
            time.sleep(seconds)
        return real(self, step, *args, **kwargs)

    checkpointer.Checkpointer._finalize = slow_finalize  # type: ignore[method-assign]
