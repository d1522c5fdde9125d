"""Test-only fault injection, the project's one mechanism (docs/architecture.md, "Faults").

Production code has no hooks and reads no variable: a fault is a test patching a *named seam*,
an ordinary function or method of the production code (as torchtitan's tests patch
`dcp.save`). In-process, a test patches the seam with pytest's monkeypatch or calls
`fault_<name>.arm(value)`. For subprocesses (seer-train ranks, SLURM tasks, seer-shards) a test
prepends this folder to PYTHONPATH and sets SEER_TEST_FAULTS="name:value[,name:value]"
(`tests.faultinject.env`): Python imports this `sitecustomize` at start-up, and for each name
it imports `fault_<name>` from this folder and calls its `arm(value)`, which patches its seam.
A child process inherits both variables, so ranks spawned locally or by SLURM are armed alike.
"""
from __future__ import annotations

import importlib
import os


def _arm_from_env() -> None:
    for item in filter(None, os.environ.get("SEER_TEST_FAULTS", "").split(",")):
        name, sep, value = item.partition(":")
        if not sep or not name:
            raise ValueError(f"SEER_TEST_FAULTS items are name:value, got {item!r}")
        importlib.import_module(f"fault_{name}").arm(value)


_arm_from_env()
