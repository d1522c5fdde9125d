"""soak_trigger:DIR - save-time faults fired on demand, for a job that runs for a long time.

The other save faults fire at a step fixed when the process starts; the chaos soak
(benchmarks/soak.py) decides while the job runs. Armed in every task of every soak job, this
patches the seam `Checkpointer._finalize` (rank 0's commit, after every rank wrote its files):
when DIR holds a trigger file, rank 0 claims it with one rename (so it fires once, in one
process) and then
  DIR/kill_in_save   -> SIGKILLs itself before meta.json/rename/`latest` (as kill_in_save);
  DIR/slow_finalize  -> sleeps the seconds written in the file, then commits (as slow_finalize).
The claimed file is renamed to DIR/fired.NAME.STEP, which tells the soak the fault went off.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from _lazy import when_imported  # this folder is on sys.path wherever a fault is armed


def _claim(ctrl: Path, name: str, step: int) -> str | None:
    """The trigger's content if this process took it, else None."""
    src, dst = ctrl / name, ctrl / f"fired.{name}.{step}"
    try:
        text = src.read_text()
        os.rename(src, dst)  # atomic: a second claimer finds nothing
    except OSError:
        return None
    return text


def arm(value: str) -> None:
    ctrl = Path(value)
    when_imported("seer_pipeline.checkpoint.checkpointer", lambda m: _patch(m.Checkpointer, ctrl))


def _patch(Checkpointer: type, ctrl: Path) -> None:  # noqa: N803 - the class itself
    original = Checkpointer._finalize

    def _finalize(self, step, *args, **kwargs):  # noqa: ANN001, ANN202 - the seam's own signature
        if self.rank == 0:
            if _claim(ctrl, "kill_in_save", step) is not None:
                print(f"fault soak_trigger: rank 0 SIGKILLs itself committing step {step}",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            slow = _claim(ctrl, "slow_finalize", step)
            if slow is not None:
                print(f"fault soak_trigger: rank 0 sleeps {float(slow):g} s before committing "
                      f"step {step}", file=sys.stderr, flush=True)
                time.sleep(float(slow))
        return original(self, step, *args, **kwargs)

    Checkpointer._finalize = _finalize
