"""The training configuration: one typed tree, a YAML preset, and dotlist overrides.

Sections: run, data (the loader's `DataConfig`), model, swav, optim, train, ckpt, dist, parallel,
init, slurm. `load_train_config(preset, overrides)` is the only way CLIs build it, so every
launcher (local, torchrun, submitit, SLURM) sees the same values and unknown keys fail early with
the list of valid ones.

Keys that may change when a run resumes are listed in `RESUME_MUTABLE` (prefixes); any other
change is refused by `check_resume_compatible` because it would silently change the
optimisation trajectory (model shape, recipe, data order, precision).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Sequence

from omegaconf import DictConfig, OmegaConf

from seer_pipeline.config.base import (
    ConfigError,
    diff_configs,
    load_config,
    non_finite_errors,
    to_container,
)
from seer_pipeline.config.slurm import SlurmConfig, has_control, slurm_errors
from seer_pipeline.config.data import DataConfig
from seer_pipeline.config.crops import CROP_PRESETS
from seer_pipeline.models.regnet import list_trunks


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run folder: config, logs, metrics, checkpoints
    seed: int = 0  # model init and any global RNG; the loader has its own data.seed
    # false only on file systems without POSIX locks: two jobs on one folder then destroy
    # each other's checkpoints.
    lock: bool = True  # one job per run folder: an exclusive lock on RUN/.lock (docs/run-folder.md)


@dataclass
class ModelConfig:
    trunk: str = "regnety_32gf"  # a name known to seer_pipeline.models.build_trunk
    # Projection head: trunk.out_dim -> hidden_dims... -> out_dim. Empty hidden_dims: a single
    # linear projection. SEER 32GF: 3712 -> 3712 -> 128 (VISSL's SEER configs).
    hidden_dims: List[int] = field(default_factory=lambda: [3712])
    out_dim: int = 128  # embedding dimension (L2-normalised) scored against the prototypes
    n_prototypes: int = 16000  # SEER "proto16k"
    head_bn: bool = False  # SEER uses no BN in the head ("noBNhead"); SwAV RN50 does
    channels_last: bool = False  # NHWC memory format (faster convolutions on CPU and tensor cores)


@dataclass
class SwavConfig:
    epsilon: float = 0.05  # 0.05 base, 0.03 for 10B (VISSL seer configs)
    sinkhorn_iters: int = 10  # SEER: 10; swav reference: 3
    temperature: float = 0.1  # softmax temperature of the swapped prediction (SwAV/SEER)
    crops_for_assign: List[int] = field(default_factory=lambda: [0, 1])  # crops whose codes are predicted
    freeze_prototypes_iters: int = 313  # SEER/swav at batch 4096
    queue_length: int = 0  # global queue length (0: no queue, as SEER)
    queue_start: int = 0  # step at which the queue starts filling


@dataclass
class DinoConfig:
    # DINO (Caron et al. 2021) with DINOv2's options; used when train.objective=dino. The head
    # reuses model.hidden_dims (MLP), model.out_dim (bottleneck) and model.n_prototypes (K).
    centering: str = "sinkhorn"  # mean (DINO's EMA centre) | sinkhorn (DINOv2/v3: SwAV's Sinkhorn-Knopp)
    global_crops: int = 2  # the first crops are global: the teacher sees only these (DINO: 2)
    student_temperature: float = 0.1  # DINO
    teacher_temperature: float = 0.07  # after warm-up (DINO appendix: 0.04 -> 0.07)
    warmup_teacher_temperature: float = 0.04  # DINO
    teacher_temperature_warmup_steps: int = 0  # linear warm-up length (DINO: 30 epochs)
    center_momentum: float = 0.9  # mean centering's EMA (DINO)
    sinkhorn_iters: int = 3  # DINOv2
    teacher_momentum: float = 0.996  # EMA momentum at step 0, cosine to 1 (DINO)
    freeze_last_layer_iters: int = 0  # last layer frozen this many steps (DINO: 1 epoch)
    koleo_weight: float = 0.0  # KoLeo on the student's global-crop trunk features (DINOv2: 0.1)


@dataclass
class OptimConfig:
    base_lr: float = 0.3  # per 256 images; peak lr = base_lr * global_batch / 256 (SEER)
    warmup_steps: int = 8000  # SEER "warmup8k"
    warmup_start_lr: float = 0.3  # warmup goes linearly from this to the peak (SEER/VISSL)
    final_lr_ratio: float = 0.001  # cosine to peak/1000
    weight_decay: float = 1e-5  # SEER (1e-6 in the SwAV ImageNet base)
    momentum: float = 0.9  # SGD momentum inside LARS
    lars_trust: float = 0.001  # LARC trust coefficient, no clipping
    lars_exclude_bn_bias: bool = False  # SEER applied LARS and wd to BN and biases too
    total_steps: int = 0  # schedule length; 0 = train.steps (fix it to extend a run later)


@dataclass
class TrainLoopConfig:
    objective: str = "swav"  # swav (SEER) | dino (self-distillation, section `dino`)
    steps: int = 1000  # optimizer steps of the run (may grow on resume)
    threads: int = 1  # torch intra-op threads per rank; changes results bitwise, so explicit
    # fp32 | bf16. bf16: FSDP2 bf16 parameters with fp32 reduction, BN and prototypes (autocast
    # when unsharded), on CPU and GPU alike. No fp16: it needs an agreed loss scaler, bf16 none.
    precision: str = "fp32"
    log_every: int = 10  # console/TensorBoard interval; metrics.jsonl has every step
    deterministic: bool = True  # torch.use_deterministic_algorithms where supported
    tensorboard: bool = True  # write RUN/tb event files
    record_samples: bool = False  # append each step's sample ids to RUN/samples/rank{r}.jsonl


def _ckpt_init(self: Any, **values: Any) -> None:
    """Defaults, then `values` by name (`CkptConfig(**{"async": True})`)."""
    for k, v in values.items():
        if k not in type(self).__annotations__:
            raise TypeError(f"CkptConfig has no field {k!r}")
        setattr(self, k, v)


# `ckpt.async` is a required key but `async` is a Python keyword, so this section is built
# with type(): a dataclass without generated __init__/__repr__/__eq__ (which would spell
# `self.async`), keyword arguments through `_ckpt_init` (what OmegaConf.to_object calls).
CkptConfig = dataclass(init=False, repr=False, eq=False)(type("CkptConfig", (), {
    "__doc__": "Checkpoint policy.",
    "__init__": _ckpt_init,
    "__annotations__": {"every": int, "keep_latest": int, "keep_every": int,
                        "save_final": bool, "async": bool},
    "every": 1000,  # steps between periodic saves (0: only on a signal and at the end)
    "keep_latest": 2,  # keep the newest K complete checkpoints
    "keep_every": 0,  # also keep every Mth step as a milestone (0: none)
    "save_final": True,  # also save when train.steps is reached
    "async": False,  # save in the background (dcp.async_save on its own gloo group)
}))


@dataclass
class DistConfig:
    nproc: int = 1  # local ranks seer-train spawns when no launcher set the rank
    timeout_s: float = 300.0  # collective timeout: a dead rank fails the job within this
    backend: str = ""  # "" = nccl on CUDA, gloo on CPU


@dataclass
class ParallelConfig:
    fsdp: str = "full"  # full | hybrid | none (none: plain replicated model, world 1 only)
    hybrid_shard_size: int = 0  # hybrid: ranks per shard group (0 = local world size)
    blocks_per_unit: int = 1  # RegNet blocks per FSDP unit
    ac: str = "none"  # none | stage | block  (activation checkpointing)
    compile: bool = False  # torch.compile each block
    sync_bn_group: int = 0  # CUDA only: SyncBN group size (0 = per node, -1 = off)
    reshard_after_forward: bool = True  # free gathered params after forward (ZeRO-3); False trades memory for speed


@dataclass
class InitConfig:
    weights: str = ""  # warm start: a trunk state_dict file (seer-ckpt consolidate output)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwavConfig = field(default_factory=SwavConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# Prefixes of keys that may differ between a checkpoint's config and the resuming run.
RESUME_MUTABLE: tuple[str, ...] = (
    "run.dir", "run.lock", "train.steps", "train.log_every", "train.tensorboard", "ckpt.", "slurm.",
    "train.record_samples", "dist.", "parallel.", "data.workers", "data.prefetch_factor", "data.shards", "data.s3_endpoint", "init.",
    "train.threads",  # allowed, but the continuation is then not bitwise equal (warned)
)
_PRECISIONS = ("fp32", "bf16")
_OBJECTIVES = ("swav", "dino")
_CENTERINGS = ("mean", "sinkhorn")


def _schema() -> DictConfig:
    return OmegaConf.structured(TrainConfig)


def sections(cfg: DictConfig) -> TrainConfig:
    """A loaded config as its typed sections, the dataclasses above: what the components take
    (the trainer resolves them once; the DictConfig stays what is saved and compared on resume)."""
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, TrainConfig):
        raise TypeError(f"not a training config: {type(typed).__name__}")
    return typed


def validate(cfg: DictConfig) -> None:
    """Reject values no component could use (cross-field checks included)."""
    errs = []
    if cfg.train.objective not in _OBJECTIVES:
        errs.append(f"train.objective must be one of {_OBJECTIVES}, got {cfg.train.objective!r}")
    if cfg.dino.centering not in _CENTERINGS:
        errs.append(f"dino.centering must be one of {_CENTERINGS}, got {cfg.dino.centering!r}")
    n_crops = _n_crops(cfg)
    if cfg.train.objective == "dino" and n_crops is not None and not 1 <= cfg.dino.global_crops < n_crops:
        errs.append(f"dino.global_crops must be in 1..{n_crops - 1} (the crops the teacher sees), "
                    f"got {cfg.dino.global_crops}")
    if cfg.train.precision not in _PRECISIONS:
        errs.append(f"train.precision must be one of {_PRECISIONS}, got {cfg.train.precision!r}"
                    + (" (fp16 is not supported: use bf16)" if cfg.train.precision == "fp16" else ""))
    if cfg.parallel.fsdp not in ("full", "hybrid", "none"):
        errs.append(f"parallel.fsdp must be full|hybrid|none, got {cfg.parallel.fsdp!r}")
    if cfg.parallel.ac not in ("none", "stage", "block"):
        errs.append(f"parallel.ac must be none|stage|block, got {cfg.parallel.ac!r}")
    for key in ("train.steps", "train.threads", "dist.nproc", "parallel.blocks_per_unit"):
        if OmegaConf.select(cfg, key) < 1:
            errs.append(f"{key} must be >= 1")
    for key in ("ckpt.every", "ckpt.keep_every", "optim.warmup_steps"):
        if OmegaConf.select(cfg, key) < 0:
            errs.append(f"{key} must be >= 0")
    if cfg.ckpt.keep_latest < 1:
        errs.append("ckpt.keep_latest must be >= 1 (the checkpoint being resumed from)")
    if len(cfg.swav.crops_for_assign) < 1:
        errs.append("swav.crops_for_assign must name at least one crop")
    errs += non_finite_errors(cfg) + _range_errors(cfg) + _model_errors(cfg) + slurm_errors(cfg.slurm)
    if _has_control(str(cfg.run.dir)):
        errs.append("run.dir contains a control character (newline, tab, ...)")
    if errs:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errs))


# key -> (lowest allowed, whether the bound itself is allowed). Values outside would crash
# deep in the loader, the loop or the schedule (e.g. train.log_every=0: ZeroDivisionError).
_BOUNDS: dict[str, tuple[float, bool]] = {
    "data.workers": (0, True), "data.batch_size": (1, True), "data.shuffle_buffer": (1, True),
    "data.prefetch_factor": (1, True), "data.epoch_samples": (0, True), "data.timeout_s": (0, True),
    "train.log_every": (1, True), "optim.base_lr": (0, True), "optim.warmup_start_lr": (0, True),
    "optim.final_lr_ratio": (0, True), "optim.weight_decay": (0, True), "optim.momentum": (0, True),
    "optim.lars_trust": (0, True), "optim.total_steps": (0, True), "dist.timeout_s": (0, False),
    "swav.epsilon": (0, False), "swav.temperature": (0, False), "swav.sinkhorn_iters": (1, True),
    "swav.freeze_prototypes_iters": (0, True), "swav.queue_length": (0, True),
    "swav.queue_start": (0, True), "model.out_dim": (1, True), "model.n_prototypes": (1, True),
    "dino.student_temperature": (0, False), "dino.teacher_temperature": (0, False),
    "dino.warmup_teacher_temperature": (0, False), "dino.teacher_temperature_warmup_steps": (0, True),
    "dino.center_momentum": (0, True), "dino.sinkhorn_iters": (1, True), "dino.teacher_momentum": (0, True),
    "dino.freeze_last_layer_iters": (0, True), "dino.koleo_weight": (0, True),
}


def _range_errors(cfg: DictConfig) -> list[str]:
    errs = []
    for key, (low, inclusive) in _BOUNDS.items():
        v = OmegaConf.select(cfg, key)
        if v < low or (v == low and not inclusive):
            errs.append(f"{key} must be {'>=' if inclusive else '>'} {low}, got {v}")
    if not 0 <= cfg.data.max_fail_fraction <= 1:
        errs.append(f"data.max_fail_fraction must be in [0, 1], got {cfg.data.max_fail_fraction}")
    if cfg.optim.momentum >= 1:
        errs.append(f"optim.momentum must be < 1, got {cfg.optim.momentum}")
    for key in ("dino.center_momentum", "dino.teacher_momentum"):
        if OmegaConf.select(cfg, key) > 1:
            errs.append(f"{key} must be <= 1, got {OmegaConf.select(cfg, key)}")
    if any(h < 1 for h in cfg.model.hidden_dims):
        errs.append(f"model.hidden_dims must all be >= 1, got {list(cfg.model.hidden_dims)}")
    return errs


def _n_crops(cfg: DictConfig) -> int | None:
    if cfg.data.crops == "custom":
        return sum(cfg.data.nmb_crops) or None
    return sum(CROP_PRESETS[cfg.data.crops][1]) if cfg.data.crops in CROP_PRESETS else None


def _model_errors(cfg: DictConfig) -> list[str]:

    errs = []
    if cfg.model.trunk.lower() not in list_trunks():
        errs.append(f"model.trunk {cfg.model.trunk!r} is not a known trunk: {', '.join(list_trunks())}")
    n = _n_crops(cfg)
    if n is None:
        errs.append(f"data.crops must be one of {sorted(CROP_PRESETS)} or custom (with nmb_crops), "
                    f"got {cfg.data.crops!r}")
    else:
        bad = [c for c in cfg.swav.crops_for_assign if not 0 <= c < n]
        if bad or len(set(cfg.swav.crops_for_assign)) != len(cfg.swav.crops_for_assign):
            errs.append(f"swav.crops_for_assign must be distinct crop indices in [0, {n}) for "
                        f"data.crops={cfg.data.crops}, got {list(cfg.swav.crops_for_assign)}")
    return errs


def _has_control(text: str) -> bool:
    return has_control(text)


def load_train_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """defaults <- preset YAML <- `key=value` overrides, validated."""
    cfg = load_config(_schema(), preset, list(overrides))
    validate(cfg)
    return cfg


def trunk_name(spec: str) -> str:
    """The trunk a spec names: a trunk name itself, or a preset name/YAML path (its model.trunk)."""
    if spec.lower() in list_trunks():
        return spec.lower()
    try:
        return str(load_train_config(spec).model.trunk)
    except ConfigError as e:
        raise ConfigError(
            f"{spec!r} is neither a trunk ({', '.join(list_trunks())}) nor a usable preset: {e}") from e


def schedule_len(cfg: dict) -> int:
    """The lr schedule's length: `optim.total_steps`, or `train.steps` when it is 0."""
    return int(cfg["optim"].get("total_steps") or cfg["train"]["steps"])


def extension_error(saved: dict, current: DictConfig | dict, run_dir: str = "RUN") -> str:
    """'' when `current` continues `saved`'s lr schedule, else the one message that says how to
    extend a run. A run is extended in one of two ways (docs/config.md):

    - same schedule: raise `train.steps` and pin `optim.total_steps` to the saved schedule's
      length; steps past its end keep its final lr (train.optim.lr_at). Resumes exactly.
    - new schedule: a new `run.dir` with `init.weights=OLD_RUN` (trunk weights only: a fresh
      optimizer, schedule, loader and queue), since a longer cosine changes every step's lr.
    """
    cur = to_container(current) if isinstance(current, DictConfig) else current
    old, new = schedule_len(saved), schedule_len(cur)
    if old == new:
        return ""
    return (f"{run_dir} was trained on a {old}-step lr schedule and this command's is {new} steps. "
            f"To train longer on the same schedule add optim.total_steps={old} (the lr stays at "
            f"its final value after step {old}); for a new schedule start a new run.dir with "
            f"init.weights={run_dir} (weights only).")


def check_resume_compatible(saved: dict, current: DictConfig) -> list[str]:
    """Refuse a resume whose config changed a key outside `RESUME_MUTABLE`.

    Returns the list of (allowed) changed keys so the caller can log them. `optim.total_steps`
    counts by its effect: 0 -> N where N was the saved schedule's length is no change.
    """
    cur = to_container(current)
    changed = diff_configs(saved, cur)
    bad = [k for k in changed if k != "optim.total_steps"
           and not any(k == p or k.startswith(p) for p in RESUME_MUTABLE)]
    if bad:
        raise ConfigError(
            "cannot resume: these config keys differ from the checkpoint's and would change the "
            f"training trajectory: {', '.join(bad)}. Keys that may change on resume: "
            f"{', '.join(RESUME_MUTABLE)}. Start a new run.dir, or use init.weights=FILE to "
            "warm-start from weights only."
        )
    problem = extension_error(saved, cur, str(cur.get("run", {}).get("dir", "RUN")))
    if problem:
        raise ConfigError(f"cannot resume: {problem}")
    return changed
