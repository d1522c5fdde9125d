"""The build state folder and its lock: one `seer-shards` build or merge per output folder."""
from __future__ import annotations

import fcntl
import os

STATE = ".seer-shards"


def lock_out(out: str, what: str = "build") -> int:
    """An exclusive flock on `<out>/.seer-shards/lock`; the kernel drops it when the holder dies.

    Returns the descriptor (close it to release). A held lock is a ValueError naming the folder.
    """
    os.makedirs(os.path.join(out, STATE), exist_ok=True)
    fd = os.open(os.path.join(out, STATE, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another seer-shards build or merge is running in {out}; "
                         f"this {what} would overwrite its files") from None
    return fd
