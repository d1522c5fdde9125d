"""The one test-only fault mechanism arms in subprocesses and nowhere else."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.faultinject import env


def test_subprocess_arms_named_fault() -> None:
    code = "import os; print(os.environ.get('SEER_TEST_FAULT_NOOP_ARMED', 'unarmed'))"
    out = subprocess.run([sys.executable, "-c", code], env=env("example_noop:7"),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "7"


def test_plain_environment_arms_nothing() -> None:
    base = {k: v for k, v in os.environ.items() if k != "SEER_TEST_FAULTS"}
    base["SEER_TEST_FAULTS"] = "example_noop:7"  # the variable alone, without the folder: inert
    code = "import os; print(os.environ.get('SEER_TEST_FAULT_NOOP_ARMED', 'unarmed'))"
    out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "unarmed"
