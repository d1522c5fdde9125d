"""One job per run folder: an exclusive POSIX lock on RUN/.lock, with the holder recorded in it.

Two jobs on one run.dir (resubmitting while a job still runs) resume from each other's
checkpoints, delete each other's in-flight saves and truncate each other's metrics. The first
process of a job (the local launcher, or rank 0 under torchrun/SLURM) takes the lock before it
writes anything; a second job finds it held and stops at once, naming the holder.

Mechanism: `fcntl.lockf` (POSIX record locks), because that is the lock NFS carries between
nodes (NLM for NFSv3, part of the protocol in NFSv4) and Lustre with `-o flock`; BSD `flock()`
is emulated by fcntl locks on Linux NFS anyway. The kernel drops the lock when the holder dies.
The holder writes {job_id, host, pid, token, time} into the locked file so others can name it.
Ranks of one job share it: spawned local ranks carry the holder's random token
(SEER_RUN_LOCK_TOKEN) and join only while the lock is held and records that very token (a
stale inherited token matches nothing); under torchrun/SLURM rank 0 tells the others.

Limits (also in docs/run-folder.md): NFSv3 mounted with `nolock`, and Lustre with `localflock`,
make the lock node-local (two jobs on different nodes are not kept apart); Lustre `noflock`
refuses locks (we then stop with a clear error; `run.lock=false` runs without). On NFSv4 a node
that crashes or loses the server keeps the lock until its lease expires (typically 90 s), and a
partitioned node may lose it silently. POSIX locks are per process: closing any descriptor of
the lock file in the holding process releases it, so nothing else in that process opens it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any

from seer_pipeline.core.exit_codes import LOCKED as LOCKED_EXIT

LOCK_NAME = ".lock"
TOKEN_ENV = "SEER_RUN_LOCK_TOKEN"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLocked(RuntimeError):
    """Another job holds the run folder."""

    def __init__(self, run_dir: Path, holder: dict[str, Any]) -> None:
        self.holder = holder
        super().__init__(f"run folder {run_dir} is in use by {describe(holder)}; wait for it to "
                         "end, use another run.dir, or (seer-submit) --after-holder to queue behind it")


class RunLockError(RuntimeError):
    """The file system refused to lock (no lock support): stop rather than run unprotected."""


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (holder not recorded yet)"
    job = holder.get("job_id") or "-"
    return f"job {job} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')})"


def job_identity() -> str:
    """The scheduler's id of this job ('' when run by hand)."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_lock_file(path: Path, flags: int) -> int:
    """A descriptor of RUN/.lock, which must be a regular file we can lock.

    Never follows a link (a `.lock` symlink would make us truncate its target, a dangling one
    would create it), and opens non-blocking so a FIFO cannot hang the open; anything but a
    regular file is refused with RunLockError naming what it is (issue #24)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EWOULDBLOCK):
            raise
        try:
            what = _kind(os.lstat(path).st_mode)
        except OSError:
            what = "not a regular file"
        raise RunLockError(f"{path} is {what}, not the regular lock file seer-train writes; "
                           "remove it and retry") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = _kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else \
            f"a hard link ({st.st_nlink} names: writing it would change another file)"
        raise RunLockError(f"{path} is {what}, not the regular lock file seer-train writes; "
                           "remove it and retry")
    return fd


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(raw[:4096].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def read_holder(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The recorded holder (may be stale: only a failed lock attempt proves it is alive).

    Never call this in the holding process (closing the descriptor would drop its lock)."""
    try:
        fd = _open_lock_file(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except (OSError, RunLockError):
        return {}
    try:
        return _parse(os.pread(fd, 4096, 0))
    except OSError:
        return {}
    finally:
        os.close(fd)


class RunLock:
    """The held lock; `release()` (or process exit) frees it."""

    def __init__(self, run_dir: str | os.PathLike, fd: int | None, holder: dict[str, Any]) -> None:
        self.run_dir, self.fd, self.holder = Path(run_dir), fd, holder

    @property
    def token(self) -> str:
        return str(self.holder.get("token", ""))

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the kernel drops the lock with the last descriptor
            self.fd = None


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if e.errno in _UNSUPPORTED:
            raise RunLockError(
                f"{path}: the file system does not support locks ({os.strerror(e.errno)}); "
                "mount it with lock support (NFS without `nolock`, Lustre with `flock`) or set "
                "run.lock=false to run without the one-job-per-folder guard") from e
        raise


def acquire(run_dir: str | os.PathLike, job_id: str | None = None) -> RunLock:
    """Take RUN/.lock or raise RunLocked naming the holder. Creates RUN if needed; writes
    nothing else and truncates nothing unless the lock was obtained."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
    try:
        if not _try_lock(fd, path):
            holder = _parse(os.pread(fd, 4096, 0))
            raise RunLocked(run, holder)
        holder = {"job_id": job_identity() if job_id is None else job_id,
                  "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(run, fd, holder)


def acquire_or_join(run_dir: str | os.PathLike) -> RunLock:
    """Rank 0 of a job: join the lock our launcher holds (token from the environment, checked
    against the file and against the lock being held), else acquire it."""
    token = os.environ.get(TOKEN_ENV, "")
    if token:
        holder = read_holder(run_dir)
        if holder.get("token") == token and is_locked(run_dir):
            return RunLock(run_dir, None, holder)
    return acquire(run_dir)


def is_locked(run_dir: str | os.PathLike) -> bool:
    """Whether another process holds RUN/.lock now (probe: lock and release at once)."""
    path = Path(run_dir) / LOCK_NAME
    if not os.path.lexists(path):
        return False
    fd = _open_lock_file(path, os.O_RDWR)  # RunLockError for a link, FIFO, directory ...
    try:
        return not _try_lock(fd, path)
    finally:
        os.close(fd)


def holder_if_locked(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The live holder of RUN/.lock ({} if it recorded nothing yet), or None when free."""
    if not is_locked(run_dir):
        return None
    return read_holder(run_dir)
