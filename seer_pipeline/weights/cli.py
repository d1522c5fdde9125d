"""`seer-ckpt consolidate RUN --out FILE`: one trunk state_dict file from a sharded checkpoint.

The output loads with `torch.load(FILE, weights_only=True)` into `build_trunk(name)` (the name
is printed and stored next to it as FILE.json). No process group is needed: DCP reads every
shard in this one process (`no_dist=True`), whatever world size wrote it. Every file's recorded
hash is checked first, and nothing is unpickled beyond DCP's metadata classes (safe_dcp); a
checkpoint that fails either is skipped for the previous one, with a warning.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from seer_pipeline.checkpoint import integrity, safe_dcp
from seer_pipeline.checkpoint.layout import (
    CheckpointError,
    find_resumable,
    verify_step_dir,
)
from seer_pipeline.config.base import ConfigError, parse_saved_config
from seer_pipeline.config.train import load_train_config
from seer_pipeline.core.io_utils import atomic_write_bytes, atomic_write_json
from seer_pipeline.core.safe_pickle import UnsafePickleError
from seer_pipeline.weights import WeightsFormatError, load_weights, save_weights
from seer_pipeline.weights.run import model_for

log = logging.getLogger(__name__)


def consolidate(run_or_step: str | Path, out: str | Path, step: int | None = None,
                which: str | None = None) -> dict:
    """Write the trunk weights of the newest loadable checkpoint (or `step`) to `out`; of a DINO
    run, the teacher's unless `which="student"`."""

    src = Path(run_or_step)
    if src.is_file():  # a weights file in any format (timm, torchvision, VISSL): import it
        return export(src, out, "seer", trunk_only=True)
    if (src / "meta.json").exists():
        cands = [(-1, src, verify_step_dir(src))]
    else:
        cands = find_resumable(src / "checkpoints")
        if step is not None:
            cands = [c for c in cands if c[0] == step]
        if not cands:
            raise CheckpointError(f"no complete checkpoint under {src}/checkpoints"
                                  + (f" for step {step}" if step is not None else ""))
    errors = []
    for _, path, meta in cands:  # newest first; a corrupt one falls back to the previous
        saved = parse_saved_config(meta["config_yaml"], f"{path}/meta.json config_yaml")
        cfg = OmegaConf.merge(load_train_config(None, []), saved)
        model, key = model_for(cfg, which)
        template = {key: model.state_dict()}
        try:
            integrity.verify_hashes(path, meta)
            safe_dcp.load(template, path, no_dist=True)
            break
        except (integrity.IntegrityError, UnsafePickleError, CheckpointException, OSError,
                RuntimeError, ValueError) as e:
            errors.append(f"{path}: {e}")
            log.warning("checkpoint %s not usable (%s); trying the previous one", path, e)
    else:
        raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))
    trunk = {k[len("trunk."):]: v.clone() for k, v in template[key].items() if k.startswith("trunk.")}
    model.trunk.load_state_dict(trunk, strict=True)  # every key present and shaped right

    buf = io.BytesIO()
    torch.save(trunk, buf)
    atomic_write_bytes(out, buf.getvalue())
    info = {"trunk": cfg.model.trunk, "step": int(meta["step"]), "source": str(path), "weights": key,
            "tensors": len(trunk), "params": sum(v.numel() for k, v in trunk.items()
                                                 if "running" not in k and "num_batches" not in k)}
    atomic_write_json(str(out) + ".json", info)
    return info


def export(src: str | Path, out: str | Path, fmt: str, preset: str | None = None,
           step: int | None = None, trunk_only: bool = False, vissl_layout: str = "consolidated",
           shards: int = 1, which: str | None = None) -> dict:
    """Convert a run folder or a weights file in any format to `fmt` (see docs/weights.md)."""
    ws = load_weights(src, preset, step, which)
    if trunk_only:
        ws.head, ws.classifier = {}, {}
    info = save_weights(ws, fmt, out, vissl_layout, shards)
    return {"out": str(out), "tensors": len(ws.trunk), "params": sum(
        v.numel() for k, v in ws.trunk.items() if "running" not in k and "num_batches" not in k),
        **info}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seer-ckpt", description="checkpoint tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="single-file trunk state_dict from a sharded checkpoint")
    c.add_argument("run", help="run folder (newest checkpoint) or a step_XXXXXXXXX folder")
    c.add_argument("--out", required=True)
    c.add_argument("--step", type=int, default=None)
    x = sub.add_parser("export", help="convert a run or a weights file to timm/torchvision/vissl/seer")
    x.add_argument("src", metavar="RUN_OR_FILE", help="run folder, step folder or weights file (any format)")
    x.add_argument("--format", required=True, choices=("timm", "torchvision", "vissl", "seer"))
    x.add_argument("--out", required=True)
    x.add_argument("--trunk", default=None, help="preset the weights must match (checked from shapes)")
    x.add_argument("--step", type=int, default=None)
    x.add_argument("--trunk-only", action="store_true", help="drop the SwAV head and classifier")
    x.add_argument("--vissl-layout", default="consolidated", choices=("consolidated", "sharded", "sliced"))
    x.add_argument("--shards", type=int, default=1, help="shard files for --vissl-layout sharded")
    for p in (c, x):  # DINO runs hold two models; DINO evaluates (and so exports) the teacher
        p.add_argument("--student", action="store_const", const="student", dest="which", default=None,
                       help="a DINO run's student instead of its teacher (the default)")
    args = ap.parse_args(argv)
    src = args.src if args.cmd == "export" else args.run
    if not os.path.exists(src):  # not "no complete checkpoint": there is nothing there at all
        print(f"seer-ckpt {args.cmd}: no such folder or file: {src}", file=sys.stderr)
        return 1

    try:
        if args.cmd == "export":
            info = export(args.src, args.out, args.format, args.trunk, args.step, args.trunk_only,
                          args.vissl_layout, args.shards, args.which)
        else:
            info = consolidate(args.run, args.out, args.step, args.which)
    except (CheckpointError, CheckpointException, WeightsFormatError, ConfigError, OSError,
            ValueError, KeyError) as e:
        print(f"seer-ckpt: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
