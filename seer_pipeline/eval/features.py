"""Frozen-trunk features: load a trunk from a run/file/random spec, re-estimate BN, pool a stage.

BatchNorm running statistics are re-estimated on clean (un-augmented) training images before
any probe: the trainer's statistics come from augmented multi-crops (and one rank's copy: FSDP2 keeps BN
buffers per rank and DCP writes one), and a random trunk's are its initial 0/1, which would make the random
baseline look worse than it is. Every trunk gets the same treatment, so comparisons are fair.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from tqdm import tqdm

from seer_pipeline.weights.cli import consolidate
from seer_pipeline.config.base import ConfigError, load_saved_config
from seer_pipeline.config.train import trunk_name
from seer_pipeline.models import build_trunk
from seer_pipeline.weights import WeightsFormatError, load_trunk_state, load_weights
from seer_pipeline.weights.check import check_finite
from seer_pipeline.weights.convert import split_spec

log = logging.getLogger(__name__)

# The trainer's input normalisation (ImageNet mean/std), applied after grayscale -> 3 channels.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class CheckpointSpecError(ValueError):
    """A --checkpoint that names nothing loadable."""


@dataclass
class TrunkSpec:
    kind: str  # "run" | "file" | "random" | "raw"
    trunk_name: str  # model.trunk ("" for raw pixels)
    weights: Path | None
    run_dir: Path | None
    step: int | None = None  # training step of the loaded checkpoint, when known
    which: str | None = None  # a DINO run's weights: None / "teacher" (DINO's choice) or "student"
    weights_of: str | None = None  # the checkpoint entry the trunk came from ("teacher", "model")


def trunk_name_from_config(config: str) -> str:
    """config.train.trunk_name, its refusal as a CheckpointSpecError (what seer-eval reports)."""
    try:
        return trunk_name(config)
    except ConfigError as e:
        raise CheckpointSpecError(str(e)) from e


def _run_of(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if (p / "config.yaml").is_file():
            return p
    return None


def parse_checkpoint(spec: str, trunk: str | None = None) -> TrunkSpec:
    """random:CONFIG | raw | RUN_DIR | FILE (a consolidated trunk state_dict)."""
    if spec.startswith("random:"):
        return TrunkSpec("random", trunk or trunk_name_from_config(spec[7:]), None, None)
    if spec in ("raw", "raw-pixels"):
        return TrunkSpec("raw", "", None, None)
    declared, path = split_spec(spec)  # `timm:FILE`, `vissl:FILE`, ...: the prefix is checked
    if not path.exists():
        raise CheckpointSpecError(f"--checkpoint {spec}: no such run folder or file "
                                  "(or use random:CONFIG / raw)")
    run = _run_of(path)
    sidecar = Path(str(path) + ".json")  # written by seer-ckpt consolidate / export
    name = trunk or (json.loads(sidecar.read_text()).get("trunk", "") if sidecar.is_file() else "")
    if run and not name:
        try:  # read back without resolving anything (a planted ${oc.env:...} is refused)
            name = str(OmegaConf.select(load_saved_config(run / "config.yaml"), "model.trunk") or "")
        except ConfigError as e:
            raise CheckpointSpecError(str(e)) from e
    if path.is_file() and (declared or not name):
        try:  # a foreign file (timm, torchvision, VISSL): its format and trunk from keys and shapes
            name = name or load_weights(spec, name or None).preset or ""
        except WeightsFormatError as e:
            raise CheckpointSpecError(str(e)) from e
    if not name:
        raise CheckpointSpecError(f"{spec}: no config.yaml above it says which trunk; pass --trunk")
    if path.is_dir():
        if not (path / "checkpoints").is_dir():
            raise CheckpointSpecError(f"{path}: a run folder without checkpoints/")
        return TrunkSpec("run", name, None, path)
    return TrunkSpec("file", name, path, run)


def build_random(trunk_name: str, seed: int = 0) -> nn.Module:
    """A seeded, randomly initialised trunk on CPU (materialised if built on the meta device)."""
    torch.manual_seed(seed)
    trunk = build_trunk(trunk_name)
    if any(p.is_meta for p in trunk.parameters()):
        trunk = trunk.to_empty(device="cpu")
        torch.manual_seed(seed)
        if hasattr(trunk, "init_weights"):
            trunk.init_weights()
        else:
            for m in trunk.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        for name, b in trunk.named_buffers():
            if "running_var" in name:
                b.fill_(1.0)
            elif "running_mean" in name or "num_batches" in name:
                b.zero_()
    return trunk


def _match_state(trunk: nn.Module, saved: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Find the prefix under which the trunk's keys live in a saved dict (e.g. 'trunk.')."""
    want = list(trunk.state_dict().keys())
    cands = {k[: -len(want[0])] for k in saved if k.endswith(want[0])}
    for prefix in sorted(cands, key=len):
        if all(prefix + k in saved for k in want):
            return {k: saved[prefix + k] for k in want}
    missing = [k for k in want if k not in saved][:5]
    raise CheckpointSpecError(f"{where}: does not hold this trunk's weights (e.g. missing {missing})")


def load_trunk(spec: TrunkSpec, seed: int = 0) -> nn.Module:
    """The trunk of a spec, weights loaded, on CPU, in eval mode."""
    trunk = build_random(spec.trunk_name, seed)
    if spec.kind == "file":
        assert spec.weights is not None

        try:  # any format (seer, timm, torchvision, VISSL), checked against the trunk's shapes
            saved = load_trunk_state(spec.weights, spec.trunk_name)
        except WeightsFormatError as e:
            raise CheckpointSpecError(str(e)) from e
        if isinstance(saved, dict) and isinstance(saved.get("trunk"), dict):
            saved = saved["trunk"]
        trunk.load_state_dict(_match_state(trunk, saved, str(spec.weights)))
    elif spec.kind == "run":
        assert spec.run_dir is not None
        # The newest complete checkpoint, gathered from its shards in this one process.
        with tempfile.TemporaryDirectory() as tmp:
            info = consolidate(spec.run_dir, Path(tmp) / "trunk.pt", which=spec.which)
            saved = torch.load(Path(tmp) / "trunk.pt", map_location="cpu", weights_only=True)
        trunk.load_state_dict(_match_state(trunk, saved, info["source"]))
        spec.step, spec.weights_of = int(info["step"]), str(info["weights"])
        log.info("loaded %s (step %d, %s)", info["source"], spec.step, spec.weights_of)
    if spec.kind in ("file", "run"):  # NaN weights give NaN features and still an "accuracy"
        try:
            check_finite(trunk.state_dict(), str(spec.weights or spec.run_dir))
        except WeightsFormatError as e:
            raise CheckpointSpecError(str(e)) from e
    return trunk.eval()


def to_input(batch: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 [B,H,W,C] -> normalised float [B,3,H,W]; grayscale replicated to 3 channels."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    # channels_last: grouped convs on CPU ran 2.4x faster so (cpu_tiny, 28 px, 2 threads).
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _batches(n: int, bs: int, desc: str, progress: bool):
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, n, bs):
            yield slice(i, min(n, i + bs))
            bar.update(min(n, i + bs) - i)


def bn_layers(trunk: nn.Module) -> list[nn.Module]:
    return [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def exact_bn_stats(trunk: nn.Module) -> Iterator[None]:
    """Inside: the trunk in train mode with its BN running stats reset, so the forwards inside
    set them to their exact average over the batches seen; after: momenta back, eval mode."""
    bns = bn_layers(trunk)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # None = cumulative moving average: the exact mean over batches
    trunk.train()
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        trunk.eval()


@torch.no_grad()
def recalibrate_bn(trunk: nn.Module, images: np.ndarray, n: int = 4096, batch_size: int = 256,
                   size: int | None = None, seed: int = 0, progress: bool = True) -> int:
    """Replace BN running stats by their exact average over `n` clean train images (in memory;
    feature_stream.recalibrate_bn streams them from a Source)."""
    if not bn_layers(trunk):
        return 0
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
    trunk.to(memory_format=torch.channels_last)
    with exact_bn_stats(trunk):
        for sl in _batches(len(idx), batch_size, "bn stats", progress):
            trunk(to_input(images[idx[sl]], size))
    return len(idx)


@torch.inference_mode()
def extract(trunk: nn.Module | None, images: np.ndarray, stage: int = -1, batch_size: int = 512,
            size: int | None = None, desc: str = "features", progress: bool = True) -> torch.Tensor:
    """Global-average-pooled features of `stage` ([N, C] float32); raw pixels if trunk is None."""
    if trunk is None:  # raw pixels: one channel is enough (the copies add nothing)
        x = to_input(images, size)
        return (x[:, :1] if images.shape[-1] == 1 else x).flatten(1)
    trunk.eval().to(memory_format=torch.channels_last)
    fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: trunk.forward_features(x, stage=stage)
    out = [fn(to_input(images[sl], size)).float() for sl in _batches(len(images), batch_size, desc, progress)]
    feats = torch.cat(out)
    if feats.dim() > 2:  # a stage map rather than pooled features
        feats = feats.mean(dim=(2, 3))
    return feats


def set_threads(threads: int | None) -> None:
    n = threads or int(os.environ.get("SEER_EVAL_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(max(1, n))
