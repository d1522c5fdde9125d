"""Test-only `seer-train` entry with fault injection: `python -m tests.fault_entry SPEC ARGS...`.

Arms SPEC (seer_pipeline.core.faults) and runs seer-train; locally spawned ranks are started
through this module too, so they are armed the same way. Production entry points never arm.
"""
from __future__ import annotations

import sys

from seer_pipeline.core import faults
from seer_pipeline.train import cli


def main(argv: list[str]) -> int:
    spec, *rest = argv
    faults.arm(spec)
    return cli.main(rest, rank_cmd=[sys.executable, "-m", "tests.fault_entry", spec])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
