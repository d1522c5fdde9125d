"""A fault that patches nothing: lets tests check that the mechanism itself arms (test_faults)."""
from __future__ import annotations

import os

ARMED: list[str] = []


def arm(value: str) -> None:
    ARMED.append(value)
    os.environ["SEER_TEST_FAULT_NOOP_ARMED"] = value
