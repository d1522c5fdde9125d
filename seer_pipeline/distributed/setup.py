"""One resolver for where this process sits in a job: torchrun, SLURM, submitit, or alone.

Every launcher (our local spawner, torchrun, srun from an sbatch template, submitit on SLURM
or its LocalExecutor) ends up here, so rank discovery has exactly one implementation.
A partial environment (e.g. RANK without WORLD_SIZE) is a misconfigured launcher and is
rejected with a message naming what is missing, rather than silently running as rank 0.

The collective device rule (one rule, everywhere): a collective's tensors live on the device its
process group serves, `collective_device(group)`: the rank's CUDA device when the group's backend
is NCCL, the CPU for gloo. The default group on CUDA is NCCL only, so a CPU tensor there fails
("No backend type associated with device type cpu"). We chose device tensors over a mixed
`"cpu:gloo,cuda:nccl"` group so that every collective of a step runs on one backend in one stream
order (no host round trip hidden in a gloo call, and DeviceMesh sub-groups inherit one backend).
Control values (loss, flags) are therefore packed into one small device tensor and read back with
one `.tolist()` per step. Object collectives (`broadcast_object_list`) get `device=` explicitly.
The only gloo group on a GPU run is the async checkpoint's own (`checkpoint.checkpointer`), whose
collectives DCP issues on CPU-staged data. tests/test_gpu_path.py enforces the rule on CPU.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SLURM_KEYS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID")
_SUBMITIT_LOCAL_KEYS = (
    "SUBMITIT_LOCAL_GLOBALID",
    "SUBMITIT_LOCAL_NTASKS",
    "SUBMITIT_LOCAL_LOCALID",
    "SUBMITIT_LOCAL_JOB_ID",
)


class DistEnvError(RuntimeError):
    """The environment names some, but not all, of a launcher's variables."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "submitit-local" | "single"
    job_id: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def export(self) -> None:
        """Set the torchrun variables so `init_process_group(init_method='env://')` works."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _require(env: Mapping[str, str], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in env]
    if missing:
        present = [k for k in keys if k in env]
        raise DistEnvError(
            f"partial {source} environment: {', '.join(present)} set but {', '.join(missing)} "
            f"missing. Launch with the full {source} environment, or unset these variables to run "
            "as a single process."
        )


def port_from_job_id(job_id: str, base: int = 20000, span: int = 20000) -> int:
    """A rendezvous port derived from the job id, so two jobs on one node do not collide."""
    digest = hashlib.sha1(job_id.encode()).digest()
    return base + int.from_bytes(digest[:4], "little") % span


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist (compressed forms like `node[01-04]` included)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # scontrol unavailable: expand the first entry of the simple `prefix[a-b,c]` form ourselves.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split("-")[0].split(",")[0].rstrip("]")
        return prefix + first
    return head


def resolve_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Find rank/world/rendezvous from the launcher's variables (see module docstring)."""
    env = os.environ if env is None else env
    # torchrun (and our own local spawner) first: inside an sbatch allocation torchrun's
    # RANK is the truth and SLURM_PROCID only names the srun task that started torchrun.
    if any(k in env for k in ("RANK", "WORLD_SIZE")):
        _require(env, _TORCHRUN_KEYS, "torchrun")
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env["LOCAL_RANK"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            source="torchrun",
            job_id=env.get("TORCHELASTIC_RUN_ID", env.get("SLURM_JOB_ID", "")),
        )
    # SLURM_PROCID is set in a job *step* (srun); the batch script alone has SLURM_JOB_ID only.
    if "SLURM_PROCID" in env:
        _require(env, _SLURM_KEYS, "SLURM")
        job_id = env["SLURM_JOB_ID"]
        world = int(env["SLURM_NTASKS"])
        nnodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env["SLURM_LOCALID"]),
            local_world_size=max(1, world // max(1, nnodes)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or port_from_job_id(job_id)),
            source="slurm",
            job_id=job_id,
        )
    # submitit's LocalExecutor sets only its own variables.
    if any(k in env for k in _SUBMITIT_LOCAL_KEYS):
        _require(env, _SUBMITIT_LOCAL_KEYS, "submitit-local")
        job_id = env["SUBMITIT_LOCAL_JOB_ID"]
        return DistEnv(
            rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
            world_size=int(env["SUBMITIT_LOCAL_NTASKS"]),
            local_rank=int(env["SUBMITIT_LOCAL_LOCALID"]),
            local_world_size=int(env["SUBMITIT_LOCAL_NTASKS"]),
            master_addr="127.0.0.1",
            master_port=port_from_job_id(job_id),
            source="submitit-local",
            job_id=job_id,
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")


def free_port() -> int:
    """An unused TCP port on localhost (racy by nature; fine for tests and local spawns)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def collective_device(group: Any = None) -> torch.device:
    """The device whose tensors `group` (default: WORLD) accepts: see the module docstring."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_cuda_device(local_rank: int) -> torch.device:
    """This rank's GPU among those the process sees.

    `local_rank % device_count()`, not `local_rank`: where SLURM binds one GPU per task
    (`--gpus-per-task=1`, `--gpu-bind=single:1`, or a cgroup per task) every task sees only its
    own GPU as cuda:0, and `set_device(local_rank)` fails for every local rank but 0. Where a
    task sees the whole node, the modulo is the identity (local_rank < device_count).
    """
    n = torch.cuda.device_count()
    if n < 1:
        raise RuntimeError("dist.backend=nccl but this process sees no CUDA device "
                           "(CUDA_VISIBLE_DEVICES, or the job's GPU request)")
    return torch.device("cuda", local_rank % n)


def init_distributed(
    denv: DistEnv, timeout_s: float = 600.0, backend: str | None = None
) -> torch.device:
    """Join the process group with a timeout on every collective; returns the compute device.

    The group is created when world > 1, and also at world 1 when `backend` is named
    explicitly (`dist.backend=nccl`): then every collective of the loop really runs on that
    backend, which is how one GPU checks the multi-GPU code path. On CUDA, NCCL async error
    handling makes a dead peer raise instead of hang; on CPU, gloo's timeout does the same job.
    """
    explicit = bool(backend)
    backend = backend or default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"dist.backend must be nccl or gloo (or empty), got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("dist.backend=nccl needs a CUDA device; use gloo (or leave it empty) on CPU")
    device = torch.device("cpu")
    if backend == "nccl":
        # Async error handling: a watchdog tears the communicator down after `timeout` so a
        # dead rank becomes an exception on the survivors instead of a silent hang.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        device = local_cuda_device(denv.local_rank)
        torch.cuda.set_device(device)
    if (denv.world_size > 1 or explicit) and not dist.is_initialized():
        denv.export()
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=_dt.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return device


# How a collective reports a peer that died or hangs: gloo raises a plain RuntimeError with
# "Connection reset by peer" / "Connection closed by peer" (a dead process) or "Timed out
# waiting 20000ms for recv operation" (a peer that stopped answering: a hung rank, a lost node),
# NCCL and torch's store a DistError subclass. Only those: an OSError (ConnectionError,
# TimeoutError) comes from this rank's own I/O - an S3 read, a shard on a flaky mount - and
# must be logged as this rank's failure with its traceback, not blamed on a peer.
_PEER_LOST = ("closed by peer", "reset by peer", "timed out waiting", "connection refused",
              "pair closure", "broken pipe")


def peer_lost(e: BaseException) -> bool:
    """Whether a collective's exception says another rank died or stopped answering."""
    if isinstance(e, dist.DistError):
        return True
    return (isinstance(e, RuntimeError) and not _io_in_chain(e)
            and any(k in str(e).lower() for k in _PEER_LOST))


def _io_in_chain(e: BaseException) -> bool:
    # gloo raises from C++ with nothing chained; a shard read that wraps an S3 or socket error
    # (ShardReadError "... from e") carries that OSError along.
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def wait_for_peers() -> None:
    """Block until every rank got here (a no-op alone); bounded by the group's `dist.timeout_s`.

    Used before a rank exits after a preemption save: under `srun --kill-on-bad-exit=1` (both
    the sbatch templates and submitit) the first task to exit with a non-zero code ends the
    step, and SLURM kills the others KillWait (30 s by default) later. Without this wait the
    other ranks leave right after DCP's last collective and rank 0 dies mid-commit when its
    finalize (renames, fsyncs, `latest`, purge) takes longer than KillWait on a slow
    filesystem: measured on the local SLURM, a 45 s finalize lost the save and the requeue.
    A rank that dies for real still ends the step at once: srun sees its bad exit.
    """
    if not dist.is_initialized():
        return
    token = torch.ones(1, device=collective_device())
    dist.all_reduce(token)
    token.item()  # NCCL collectives are asynchronous: wait for it on the host


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
