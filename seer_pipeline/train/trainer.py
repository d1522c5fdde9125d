"""The SwAV pretraining loop: components are built here, policies live in the components.

`Trainer(cfg, denv, device).train()` returns an exit code: 0 when `train.steps` are done, PREEMPTED
(seer_pipeline.core.exit_codes) after a signal-triggered save. Per step: lr from the precomputed
schedule (an index), prototypes normalised, multi-crop forward, SwAV loss, backward, one tiny
all-reduce carrying [loss, non-finite flag, preemption flag], prototype freeze, LARS step,
metrics, then the checkpointer decides whether to save.

Checkpoint state comes from components: model, optimizer, progress (global) and RNG, loader,
queue, throughput (per rank) are each a `Stateful` registered once with the checkpointer. On a
change of world size, model/optimizer/BN statistics reshard exactly (DCP), the loader
redistributes the epoch, and the per-rank RNG streams and SwAV queue start afresh with a log line.
Precision: FSDP2 casts (bf16 parameters, fp32 reduction, fp32 BN and prototypes) when the model
is sharded; an unsharded model gets autocast instead. Every collective here uses tensors on the
compute device, the one the process group serves (seer_pipeline.distributed.setup).
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from seer_pipeline.checkpoint.checkpointer import Checkpointer
from seer_pipeline.config.base import parse_saved_config, save_config
from seer_pipeline.core.exit_codes import PREEMPTED
from seer_pipeline.core.requeue import OPERATOR_STOP, requeue_job
from seer_pipeline.config.train import TrainConfig, check_resume_compatible, schedule_len, sections
from seer_pipeline.data.loader import build_loader
from seer_pipeline.distributed.parallelize import (
    ParallelPlan,
    build_mesh,
    is_fsdp,
    parallelize,
    unwrap,
)
from seer_pipeline.distributed.setup import DistEnv, wait_for_peers
from seer_pipeline.models.materialize import load_full_state_, materialize
from seer_pipeline.models.build import build_for
from seer_pipeline.train.objective import build_objective
from seer_pipeline.train.metrics import MetricsLogger, SampleLog, Throughput
from seer_pipeline.train.optim import (
    LARS,
    build_param_groups,
    lr_at,
    lr_schedule,
    peak_lr,
)
from seer_pipeline.train.provenance import record_start
from seer_pipeline.train.signals import PreemptionFlag
from seer_pipeline.train.speed import apply_cudnn, speed_switches
from seer_pipeline.train.state import ModelState, OptimState, Progress, RankBNStats, RNGState, bn_buffers
from seer_pipeline.weights import load_trunk_state

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


@torch.no_grad()
def average_bn_stats(model: nn.Module) -> None:
    """BN running stats are plain per-rank buffers under FSDP2: their mean over ranks, in place,
    for the one copy DCP keeps (training-mode BN does not read them). The trainer puts each
    rank's own values back after the save (state.RankBNStats)."""
    if not dist.is_initialized():  # world 1 too: one GPU checks the NCCL path
        return
    bufs = bn_buffers(model)
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).double() for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for b in bufs:
        b.copy_(flat[i:i + b.numel()].view_as(b))
        i += b.numel()


class Trainer:
    def __init__(self, cfg: DictConfig, denv: DistEnv, device: torch.device) -> None:
        # `cfg` is what config.yaml and the resume check see; `c`, its typed sections, is what
        # the components take, each its own section (resolved once, here).
        self.cfg, self.denv, self.device = cfg, denv, device
        c: TrainConfig = sections(cfg)
        self.c = c
        self.rank, self.world = denv.rank, denv.world_size
        self.run_dir = Path(c.run.dir)
        self.speed = speed_switches(device.type, deterministic=c.train.deterministic,
                                    channels_last=c.model.channels_last, pin_memory=c.data.pin_memory)
        apply_cudnn(self.speed)
        plan = ParallelPlan.from_config(c.parallel, c.train.precision)
        mesh = build_mesh(plan, device.type, self.world, denv.local_world_size)
        model = self._meta_model()
        self.model = self._place(model, plan, mesh, device)
        self.inner = unwrap(self.model)
        teacher = None
        if c.train.objective == "dino":
            # The same builder and seed: the teacher starts equal to the student (DINO's
            # initialisation), and is sharded into the same units so EMA works shard by shard.
            teacher = self._place(self._meta_model().requires_grad_(False), plan, mesh, device)
        self.optimizer = LARS(
            build_param_groups(model, c.optim.lars_exclude_bn_bias), lr=0.0,
            momentum=c.optim.momentum, weight_decay=c.optim.weight_decay, trust=c.optim.lars_trust,
        )
        torch.manual_seed(c.run.seed + 1000 * self.rank + 1)  # per-rank stream from here on
        # CUDA: pinned batches for async host-to-device copies (train.speed decides).
        self.loader = build_loader(dataclasses.replace(c.data, pin_memory=self.speed.pin_memory),
                                   self.rank, self.world)
        self.global_batch = c.data.batch_size * self.world
        self.total = schedule_len(cfg)
        self.schedule = lr_schedule(
            peak=peak_lr(c.optim.base_lr, self.global_batch), total_steps=self.total,
            warmup_steps=c.optim.warmup_steps, warmup_start=c.optim.warmup_start_lr,
            final_ratio=c.optim.final_lr_ratio)
        self.ckpt = Checkpointer(self.run_dir, c.ckpt, rank=self.rank, world_size=self.world,
                                 config_yaml=OmegaConf.to_yaml(cfg), timeout_s=c.dist.timeout_s)
        # Saves hold the BN statistics' mean over ranks; each rank trains on with its own.
        self.bn = RankBNStats([self.model] + ([teacher] if teacher is not None else []),
                              self.rank, self.world)
        self.ckpt.before_save(lambda: self.bn.average(average_bn_stats), after=self.bn.restore_own)
        self.progress = Progress(self.total, self.global_batch)
        self.throughput = Throughput()
        # Everything a checkpoint holds: one line per component.
        self.ckpt.register("model", ModelState(self.model))
        self.ckpt.register("optim", OptimState(self.model, self.optimizer))
        self.ckpt.register("train", self.progress)
        self.ckpt.register("rng", RNGState(self.rank, self.world), per_rank=True)
        # What every rank needs of every other rank's loader on a resume (the rest: rank 0's).
        self.ckpt.register("loader", self.loader, per_rank=True,
                           summary=("rank", "outputs", "pads", "metrics"))
        self.ckpt.register("metrics", self.throughput, per_rank=True)
        self.ckpt.register("bn", self.bn, per_rank=True)
        self.flag = PreemptionFlag()
        # Sharded: FSDP2 casts per unit (parallelize). Unsharded: autocast does the same job.
        use_autocast = c.train.precision == "bf16" and not is_fsdp(self.model)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast
                         else nullcontext())
        self.objective = build_objective(c, self.model, teacher, self.autocast, total_steps=self.total,
                                         rank=self.rank, world=self.world, device=device)
        self.objective.register(self.ckpt)

    def _meta_model(self) -> nn.Module:
        """Built on the meta device, sharded, then each rank writes only its rows: no rank ever
        holds the whole fp32 model (seer_10b: 37 GB). Values are those of the unsharded model
        for the same seed at any world size (models.materialize)."""
        with torch.device("meta"):
            model = build_for(self.cfg)
        model.channels_last = self.speed.channels_last
        return model

    def _place(self, model: nn.Module, plan: ParallelPlan, mesh: Any, device: torch.device) -> nn.Module:
        sharded = plan.fsdp != "none" and mesh is not None
        if not sharded:  # DDP broadcasts real values at construction: materialize first
            self._materialize(model, device)
        out = parallelize(model, plan, mesh, device, self.denv.local_world_size)
        if sharded:
            self._materialize(model, device)
        return out

    def _materialize(self, model: nn.Module, device: torch.device) -> None:
        c = self.c
        materialize(model, device, c.run.seed)
        if c.init.weights:
            sd = load_trunk_state(c.init.weights, c.model.trunk)  # any format, shape-checked
            load_full_state_(model.trunk, sd)  # each rank keeps its rows
            log.info("warm start: trunk weights from %s", c.init.weights)

    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    # -- checkpoint state ---------------------------------------------------------------------
    def _check_config(self, meta: dict[str, Any]) -> None:
        changed = check_resume_compatible(parse_saved_config(meta["config_yaml"], "checkpoint config"),
                                          self.cfg)
        if changed:
            log.info("config keys changed on resume (allowed): %s", ", ".join(changed))
        if {"train.threads", "data.workers", "dist.nproc"} & set(changed):
            log.warning("train.threads/data.workers/dist.nproc changed: the continuation is valid "
                        "but not bitwise equal to an uninterrupted run")

    def resume(self) -> int | None:
        return self.ckpt.restore(self._check_config)

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> int:
        loop = self.c.train
        resumed = self.resume()
        if self.rank == 0:
            save_config(self.cfg, self.run_dir / "config.yaml")
            record_start(self.run_dir, world_size=self.world, threads=loop.threads, resumed_from=resumed)
        metrics = MetricsLogger(self.run_dir, rank=self.rank, log_every=loop.log_every,
                                tensorboard=loop.tensorboard, resumed_from=resumed,
                                total_steps=loop.steps)
        samples = SampleLog(self.run_dir, self.rank) if loop.record_samples else None
        self.flag.install()  # after submitit's own USR2 handler: ours must win
        it = iter(self.loader)
        log.info("training steps %d..%d, global batch %d, %d rank(s)", self.step + 1, loop.steps,
                 self.global_batch, self.world)
        try:
            while self.step < loop.steps:
                t0 = time.perf_counter()
                views = next(it)
                t_data = time.perf_counter() - t0
                values, stop = self.train_step(views)
                self.step += 1
                dt = time.perf_counter() - t0
                self.throughput.update(self.global_batch, dt)
                values.update(img_s=self.global_batch / dt, step_s=dt, data_wait=t_data / dt,
                              eta_s=self.throughput.eta_s(loop.steps - self.step),
                              images_seen=self.throughput.images,
                              rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                if self.step % loop.log_every == 0 or self.step == loop.steps:
                    values.update({f"data_{k}": v for k, v in self.loader.metrics().items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
                metrics.log_step(self.step, values)
                if samples is not None:  # the batch's epoch: the loader moves on at the next batch
                    samples.log_step(self.step, self.loader.epoch, self.loader.last_uids, time.time())
                if stop:
                    return self._preempted(stop)
                self.ckpt.after_step(self.step, last=self.step >= loop.steps, preempted=False)
            if resumed is not None and resumed >= loop.steps:  # nothing left to train
                self.ckpt.after_step(self.step, last=True, preempted=False)
            return 0
        except Exception:
            log.error("rank %d stopped in step %d", self.rank, self.step + 1)
            raise
        finally:
            # Stop the loader's workers now, whatever ended the loop. They ignore SIGTERM, so
            # an iterator kept alive by the exception's traceback (DCP's CheckpointException, a
            # BaseException, e.g. a save on a full disk) left them to multiprocessing's exit
            # hook, which terminates and joins them: the rank hung for good (found by the soak).
            it.close()
            metrics.close()
            if samples is not None:
                samples.close()
            self.flag.restore()

    def _preempted(self, reason: str) -> int:
        log.warning("%s received: saving at step %d before exiting", reason, self.step)
        t0 = time.monotonic()
        self.ckpt.after_step(self.step, last=False, preempted=True)
        secs = time.monotonic() - t0
        log.warning("preemption save took %.2fs", secs)
        if self.rank == 0:
            requeue_job(self.run_dir, max_requeues=self.c.slurm.max_requeues, step=self.step,
                        reason=reason)
        # No rank exits before rank 0 committed the save and requeued (dist.setup.wait_for_peers).
        wait_for_peers()
        return PREEMPTED

    def train_step(self, views: list[torch.Tensor]) -> tuple[dict[str, Any], str]:
        """One optimizer step: (logged values, '' or why every rank stops after it: the signal,
        OPERATOR_STOP when any rank got Ctrl-C)."""
        step = self.step
        lr = lr_at(self.schedule, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        views = [v.to(self.device, non_blocking=True) for v in views]
        log_now = (step + 1) % self.c.train.log_every == 0
        loss, stats, describe = self.objective.forward(self.model, views, step, log_now)
        loss.backward()
        # One collective per step, on the compute device (the group's): [sum of losses, ranks
        # with a non-finite loss, ranks signalled, ranks given Ctrl-C]. It is also how ranks
        # agree on preemption, and on whether it is an operator's stop (never requeued).
        finite = torch.isfinite(loss.detach())
        # torch.full, not torch.tensor([...], device=): a fill kernel, no host-to-device copy
        # (a blocking copy would sync with the backward before the all-reduce is queued).
        flags = (float(self.flag.local), float(self.flag.name() == OPERATOR_STOP))
        packed = torch.stack((torch.where(finite, loss.detach(), 0.0).double(), (~finite).double(),
                              *(torch.full((), f, dtype=torch.float64, device=loss.device) for f in flags)))
        if dist.is_initialized():
            dist.all_reduce(packed)
        loss_sum, n_bad, n_signalled, n_interrupted = packed.tolist()  # the step's one host sync
        if n_bad > 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} (local loss {float(loss.detach())} on rank "
                f"{self.rank}; {describe()})")
        self.objective.before_optimizer_step(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.after_optimizer_step(step)
        values: dict[str, Any] = {"loss": loss_sum / self.world, "lr": lr}
        if log_now:
            values.update({k: float(v) for k, v in stats.items() if k != "loss"})
        stop = OPERATOR_STOP if n_interrupted > 0 else self.flag.name() if n_signalled > 0 else ""
        return values, stop
