"""Fault injection points for the tests (kill -9 during a save, a rank dying mid-run).

Nothing arms them in a normal run: no environment variable is read, so an inherited or
forgotten export cannot kill a production job. A test arms them in-process with `arm()`; for
`seer-train` subprocesses it runs `python -m tests.fault_entry SPEC ARGS...`, which arms SPEC and
starts every local rank through itself (see tests/fault_entry.py).

Points: kill_in_save:S - rank 0 SIGKILLs itself after writing step S, before meta.json/rename;
kill_rank:R - rank R SIGKILLs itself at the start of step 3 (trainer).
"""
from __future__ import annotations

_ARMED: dict[str, int] = {}


def arm(spec: str) -> None:
    """Arm `name:value[,name:value]` in this process (tests only)."""
    for item in filter(None, spec.split(",")):
        key, sep, val = item.partition(":")
        if not sep or not key:
            raise ValueError(f"fault spec must be name:int[,name:int], got {item!r}")
        _ARMED[key] = int(val)


def disarm() -> None:
    _ARMED.clear()


def fault(name: str) -> int | None:
    """The armed value of fault point `name`, or None (always None unless a test armed it)."""
    return _ARMED.get(name)
