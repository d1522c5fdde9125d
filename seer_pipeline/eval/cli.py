"""`seer-eval linear|knn|all --weights RUN|FILE|random:CONFIG|raw --data SPEC`; `seer-eval compare A B ...`.

Prints progress bars on stderr, logs, and a JSON object as the last stdout line; the same
object is written atomically to RUN/eval/<mode>-<data>-<kind>.json (or --out). Images stream
through a DataLoader with workers; features go to memmapped files (seer_pipeline.eval.feature_stream).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from seer_pipeline.checkpoint.layout import CheckpointError
from seer_pipeline.core.exit_codes import USAGE
from seer_pipeline.core.io_utils import atomic_write_json
from seer_pipeline.core.logging_utils import setup_logging
from seer_pipeline.eval import features as feats
from seer_pipeline.eval.augmented import train_sgd_linear_augmented
from seer_pipeline.eval.compare import CompareError, run_compare
from seer_pipeline.eval.datasets import DataSpecError
from seer_pipeline.eval.knn import knn_topk
from seer_pipeline.eval.linear import WD_SWEEP, linear_probe
from seer_pipeline.eval.linear_sgd import SGDConfig, rows, train_sgd_linear
from seer_pipeline.eval.lowshot import balanced_subset, parse_percents
from seer_pipeline.eval.sources import EvalTransform, open_source
from seer_pipeline.eval.feature_stream import extract_features, pick_indices, recalibrate_bn

log = logging.getLogger(__name__)


def _percents(text: str) -> tuple[float, ...]:
    try:
        return parse_percents(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seer-eval", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("linear", "knn", "all", "compare"),
                   help="all = both on the same features; compare = all, for each of MODELS")
    p.add_argument("models", nargs="*", help="compare: weights specs (as --weights), evaluated alike")
    p.add_argument("--checkpoint", "--weights", dest="checkpoint", default=None,
                   help="run folder, trunk state_dict file, random:CONFIG, or raw (pixels)")
    p.add_argument("--data", required=True, help="fashion-mnist[:DIR] | imagefolder:PATH | wds:PATTERN")
    p.add_argument("--trunk", default=None, help="trunk name, if the checkpoint's run has no config")
    # DINO evaluates its teacher (Caron et al. 2021, section 3.1), as seer-ckpt exports it.
    p.add_argument("--student", action="store_const", const="student", dest="which", default=None,
                   help="a DINO run folder: its student's trunk instead of the teacher's (the default)")
    p.add_argument("--stage", type=int, default=-1, help="which stage to pool (-1: last)")
    p.add_argument("--size", type=int, default=None,
                   help="centre-crop side (default: 224 for image files, native for fashion-mnist)")
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side before the crop (default: size * 256/224, VISSL's eval)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--features-dir", default=None,
                   help="keep the feature memmaps here (default: a temporary folder, removed after)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="imagefolder/wds split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--bn-images", type=int, default=4096,
                   help="clean train images to re-estimate BN statistics on (0: keep the saved ones)")
    p.add_argument("--limit-train", type=int, default=None, help="random train subset (smoke runs)")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--protocol", choices=("sgd", "lbfgs", "both", "sgd-aug"), default="sgd",
                   help="linear: sgd = VISSL's BN+linear head with SGD on precomputed features; "
                        "sgd-aug = the same with features recomputed per epoch from random-resized "
                        "crops + flips (slow); lbfgs = the quick full-batch probe; both = sgd + lbfgs")
    p.add_argument("--sgd-epochs", type=int, default=28)
    p.add_argument("--sgd-lr", type=float, default=0.01, help="per 256 images")
    p.add_argument("--sgd-schedule", choices=("step", "cosine"), default="step")
    p.add_argument("--low-shot", default=(1.0, 10.0), type=_percents,
                   help="class-balanced train percents probed too (L-BFGS), '' for none")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when present)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations of the final fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="result JSON path (default: RUN/eval/...)")
    p.add_argument("--out-dir", default="runs/eval", help="where random:/raw results go")
    p.add_argument("--no-progress", action="store_true")
    return p


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "x"


def default_out(args: argparse.Namespace, spec: feats.TrunkSpec) -> Path:
    base = spec.run_dir / "eval" if spec.run_dir else (
        spec.weights.parent / "eval" if spec.kind == "file" and spec.weights else Path(args.out_dir))
    kind = spec.kind if spec.kind != "file" else _slug(Path(args.checkpoint).stem)
    name = f"{args.mode}-{_slug(args.data.split(':')[0])}-{kind}"
    if spec.kind == "random":
        name += f"-{_slug(spec.trunk_name)}"
    if args.stage != -1:
        name += f"-stage{args.stage}"
    return base / f"{name}.json"


def pick_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_problem(device: str | None) -> str:
    """Why `--device` cannot be used here ('' when it can): checked before any work, so a CPU
    machine answers `--device cuda` with one line instead of torch's AssertionError mid-run."""
    if not device or not device.startswith("cuda"):
        return ""
    if not torch.cuda.is_available():
        why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        return f"--device {device}: {why}; use --device cpu (or leave --device out)"
    idx = device.partition(":")[2]
    if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return ""


# top-k needs more than k classes to mean anything: with 5 or fewer every sample is a top-5 hit.
TOP5_MIN_CLASSES = 6


def drop_trivial_top5(out: dict[str, Any], num_classes: int) -> None:
    if num_classes >= TOP5_MIN_CLASSES:
        return
    for res in [out.get("linear"), out.get("linear_sgd"), out.get("knn"),
                *(out.get("low_shot") or {}).values()]:
        if isinstance(res, dict):
            res.pop("top5", None)


def probe(args: argparse.Namespace, ftr: torch.Tensor | np.ndarray, ytr: torch.Tensor,
          fte: torch.Tensor | np.ndarray, yte: torch.Tensor,
          num_classes: int) -> dict[str, Any]:
    """Run the probes `args` asks for on (train, test) features; ftr/fte may be memmaps."""
    out: dict[str, Any] = {}
    device = pick_device(args.device)
    linear = args.mode in ("linear", "all")
    if linear and args.protocol in ("lbfgs", "both"):
        lin = linear_probe(rows(ftr, slice(None)), ytr, rows(fte, slice(None)), yte, num_classes,
                           WD_SWEEP, max_iter=args.max_iter, seed=args.seed)
        out["linear"] = {"accuracy": round(lin.accuracy, 2), "top5": round(lin.top5, 2),
                         "protocol": "lbfgs (quick probe)", "weight_decay": lin.weight_decay,
                         "val_accuracy": lin.val_accuracy, "train_accuracy": round(lin.train_accuracy, 2)}
    if linear and args.protocol in ("sgd", "both"):
        cfg = SGDConfig(epochs=args.sgd_epochs, base_lr=args.sgd_lr, schedule=args.sgd_schedule)
        r = train_sgd_linear(ftr, ytr, fte, yte, num_classes, cfg, seed=args.seed, device=device)
        out["linear_sgd"] = {"accuracy": round(r.top1, 2), "top5": round(r.top5, 2),
                             "protocol": "sgd, BN+linear head, precomputed features",
                             "epochs": r.epochs, "lr": r.lr, "schedule": cfg.schedule,
                             "train_accuracy": round(r.train_top1, 2)}
    if linear and args.low_shot:
        out["low_shot"] = {}
        for pct in args.low_shot:
            idx = balanced_subset(ytr.numpy(), pct, args.seed)
            sub = rows(ftr, idx)
            try:
                r = linear_probe(sub, ytr[idx], rows(fte, slice(None)), yte, num_classes, WD_SWEEP,
                                 max_iter=args.max_iter, seed=args.seed)
            except ValueError as e:  # a subset too small to hold out a validation part: say so
                out["low_shot"][f"{pct:g}%"] = {"skipped": str(e), "n_train": int(len(idx))}
                continue
            out["low_shot"][f"{pct:g}%"] = {"accuracy": round(r.accuracy, 2), "top5": round(r.top5, 2),
                                             "n_train": int(len(idx)), "protocol": "lbfgs"}
    if args.mode in ("knn", "all"):
        t1, t5 = knn_topk(ftr, ytr, fte, yte, num_classes, args.k, args.temperature, device=device)
        out["knn"] = {"accuracy": round(t1, 2), "top5": round(t5, 2), "k": args.k,
                      "temperature": args.temperature}
    drop_trivial_top5(out, num_classes)
    return out


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    feats.set_threads(args.threads)
    progress = not args.no_progress
    device = pick_device(args.device)
    spec = feats.parse_checkpoint(args.checkpoint, args.trunk)
    if args.which and spec.kind != "run":
        raise feats.CheckpointSpecError(f"--student picks a model of a run folder; {args.checkpoint} is a "
                                        f"{spec.kind} spec (a consolidated file holds one trunk already)")
    spec.which = args.which
    tf = EvalTransform.for_spec(args.data, args.size, args.resize)
    src = open_source(args.data, tf, args.test_fraction)
    if args.protocol == "sgd-aug" and (spec.kind == "raw" or not src.indexable()):
        raise DataSpecError("--protocol sgd-aug needs a trunk and an imagefolder or fashion-mnist source")
    trunk = None if spec.kind == "raw" else feats.load_trunk(spec, args.seed)
    if trunk is not None:
        trunk.to(device).to(memory_format=torch.channels_last)
    rng = np.random.default_rng(args.seed)
    indices, limits, train_idx = None, (args.limit_train, args.limit_test), None
    if src.indexable():  # a seeded subset, chosen up front (the same for every trunk)
        train_idx = pick_indices(src, 0, args.limit_train, rng)
        indices = np.concatenate([train_idx, pick_indices(src, 1, args.limit_test, rng)])
        limits = (None, None)
    bn_n = 0
    if trunk is not None and args.bn_images > 0:
        bn_n = recalibrate_bn(trunk, src, args.bn_images, args.batch_size, args.workers, device,
                              args.seed, progress, train_idx)
    with tempfile.TemporaryDirectory(prefix="seer-eval-") as tmp:
        fdir = Path(args.features_dir) if args.features_dir else Path(tmp)
        fs = extract_features(trunk, src, fdir, args.stage, args.batch_size, args.workers, device,
                              indices, len(indices) if indices is not None else None, limits, progress)
        ytr, yte = torch.from_numpy(fs.train_y), torch.from_numpy(fs.test_y)
        digest = hashlib.sha1(fs.train_y.tobytes() + b"|" + fs.test_y.tobytes()).hexdigest()[:16]
        result: dict[str, Any] = {
            "mode": args.mode, "checkpoint": args.checkpoint, "kind": spec.kind,
            "trunk": spec.trunk_name or None, "data": src.name, "stage": args.stage,
            "n_train": len(ytr), "n_test": len(yte), "num_classes": fs.num_classes,
            "labels_digest": digest, "device": device, "image_size": args.size,
            "checkpoint_step": spec.step, "weights_of": spec.weights_of, "feature_dim": int(fs.train_x.shape[1]), "bn_images": bn_n,
            "skipped": fs.skipped,
        }
        if fs.skipped:
            log.warning("%s: skipped %s", src.name, fs.skipped)
        result.update(probe(args, fs.train_x, ytr, fs.test_x, yte, fs.num_classes))
        if args.mode in ("linear", "all") and args.protocol == "sgd-aug":
            assert trunk is not None and train_idx is not None
            crop = tf.crop or int(src.dataset[int(train_idx[0])][0].shape[0])
            cfg = SGDConfig(epochs=args.sgd_epochs, base_lr=args.sgd_lr, schedule=args.sgd_schedule)
            r = train_sgd_linear_augmented(trunk, src, train_idx, fs.test_x, yte, fs.num_classes, crop,
                                           cfg, args.stage, args.workers, device, args.seed)
            result["linear_sgd"] = {
                "accuracy": round(r.top1, 2), "top5": round(r.top5, 2), "epochs": r.epochs, "lr": r.lr,
                "protocol": "sgd, BN+linear head, features recomputed per epoch (random-resized crop + flip)",
                "schedule": cfg.schedule, "train_accuracy": round(r.train_top1, 2)}
            drop_trivial_top5(result, fs.num_classes)
        del fs  # close the memmaps before the folder goes
    result["seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out) if args.out else default_out(args, spec)
    result["out"] = str(out)
    atomic_write_json(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "compare" and len(args.models) < 1:
        parser.error("compare needs one or more weights specs: seer-eval compare A B ... --data SPEC")
    if args.mode != "compare" and (args.models or not args.checkpoint):
        parser.error(f"{args.mode} needs --weights (and no positional models)")
    bad_device = device_problem(args.device)
    if bad_device:
        print(f"seer-eval: error: {bad_device}", file=sys.stderr)
        return USAGE
    setup_logging(0)

    try:
        if args.mode == "compare":
            result = run_compare(args, run_eval)
            print(json.dumps(result), flush=True)
            return 0
        result = run_eval(args)
    except (feats.CheckpointSpecError, CheckpointError, DataSpecError, CompareError, FileNotFoundError,
            KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"seer-eval: error: {msg}", file=sys.stderr)
        return USAGE
    for m in ("linear", "linear_sgd", "knn"):
        if m in result:
            log.info("%s accuracy: %.2f%% (%s, %s)", m, result[m]["accuracy"], result["kind"], result["data"])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
