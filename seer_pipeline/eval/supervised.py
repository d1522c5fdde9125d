"""A small supervised trainer: the same trunk + a linear classifier, cross-entropy, for a fixed
number of steps (never a wall-clock budget: the result must not depend on the machine's load).
Its linear-probe accuracy is the demo's upper bound for what the trunk architecture can reach.

`python -m seer_pipeline.eval.supervised --trunk cpu_tiny --data fashion-mnist --steps 2500 --out DIR`
writes DIR/trunk.pt (a trunk state_dict under "trunk", loadable with weights_only=True) and a
DIR/config.yaml naming the trunk, so `seer-eval --checkpoint DIR/trunk.pt` finds it.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from seer_pipeline.core.io_utils import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from seer_pipeline.core.logging_utils import setup_logging
from seer_pipeline.eval import features as feats
from seer_pipeline.eval.datasets import load_data

log = logging.getLogger(__name__)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels (reflect padding) and horizontal flip."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    out = xp.gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def train_supervised(
    trunk_name: str, images: np.ndarray, labels: np.ndarray, num_classes: int, steps: int,
    batch_size: int = 128, lr: float = 0.1, weight_decay: float = 5e-4, seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train trunk + linear head for `steps` SGD steps (cosine LR over them)."""
    trunk = feats.build_random(trunk_name, seed)
    head = nn.Linear(trunk.out_dim, num_classes)
    # channels_last: ~2x faster grouped convs on CPU (measured in features.py's setting).
    model = nn.Sequential(trunk, head).train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay,
                          nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.from_numpy(labels)
    t0 = time.monotonic()
    step, seen, losses = 0, 0, []
    perm = torch.randperm(len(images), generator=gen)
    pos = 0
    with tqdm(total=steps, desc="supervised", unit="step", disable=not progress) as bar:
        while step < steps:
            if pos + batch_size > len(perm):
                perm, pos = torch.randperm(len(images), generator=gen), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            # Cosine schedule over the steps; a short warmup keeps BN stable at step 0.
            frac = step / steps
            cur = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
            for g in opt.param_groups:
                g["lr"] = cur
            x = augment(feats.to_input(images[idx.numpy()]), gen)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            step += 1
            seen += len(idx)
            bar.update(1)
            if step % 100 == 0:
                log.info("supervised step %d loss %.3f lr %.4f (%.0f img/s)", step,
                         np.mean(losses[-100:]), cur, seen / (time.monotonic() - t0))
    stats = {"steps": step, "images": seen, "epochs": round(seen / len(images), 2),
             "seconds": round(time.monotonic() - t0, 1),
             "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None}
    log.info("supervised: %s", stats)
    return trunk.eval(), stats


def save_trunk(trunk: nn.Module, trunk_name: str, out_dir: Path, stats: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save({"trunk": trunk.state_dict()}, buf)
    path = out_dir / "trunk.pt"
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(out_dir / "config.yaml", f"model:\n  trunk: {trunk_name}\n")
    atomic_write_json(out_dir / "supervised.json", stats)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seer_pipeline.eval.supervised",
                                description="supervised upper bound for a trunk")
    p.add_argument("--trunk", default="cpu_tiny", help="trunk name or training preset")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    setup_logging(0)
    feats.set_threads(args.threads)
    torch.manual_seed(args.seed)
    name = feats.trunk_name_from_config(args.trunk)
    data = load_data(args.data).subset(args.limit_train, 0, args.seed)
    trunk, stats = train_supervised(name, data.train_x, data.train_y, data.num_classes,
                                    args.steps, args.batch_size, args.lr, seed=args.seed,
                                    progress=not args.no_progress)
    stats.update(trunk=name, data=data.name)
    path = save_trunk(trunk, name, Path(args.out), stats)
    print(json.dumps({**stats, "weights": str(path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
