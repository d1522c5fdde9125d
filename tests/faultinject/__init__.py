"""Helpers for tests that arm faults in subprocesses (see sitecustomize.py beside this file)."""
from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def env(spec: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default os.environ) whose processes arm `spec` ("name:value,...") at
    start-up: this folder first on PYTHONPATH, SEER_TEST_FAULTS set."""
    out = dict(os.environ if base is None else base)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), out.get("PYTHONPATH", "")]))
    out["SEER_TEST_FAULTS"] = spec
    return out
