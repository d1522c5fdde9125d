"""`seer-eval linear|knn|all --checkpoint RUN|FILE|random:CONFIG|raw --data SPEC`.

Prints progress bars on stderr, logs, and a JSON object as the last stdout line; the same
object is written atomically to RUN/eval/<mode>-<data>-<kind>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from seer_pipeline.core.io_utils import atomic_write_json
from seer_pipeline.checkpoint.checkpointer import CheckpointError
from seer_pipeline.core.logging_utils import setup_logging
from seer_pipeline.eval import features as feats
from seer_pipeline.eval.datasets import DataSpecError, load_data
from seer_pipeline.eval.knn import knn_accuracy
from seer_pipeline.eval.linear import WD_SWEEP, linear_probe

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seer-eval", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("linear", "knn", "all"), help="all = both on the same features")
    p.add_argument("--checkpoint", required=True,
                   help="run folder, trunk state_dict file, random:CONFIG, or raw (pixels)")
    p.add_argument("--data", required=True, help="fashion-mnist[:DIR] | imagefolder:PATH | wds:PATTERN")
    p.add_argument("--trunk", default=None, help="trunk name, if the checkpoint's run has no config")
    p.add_argument("--stage", type=int, default=-1, help="which stage to pool (-1: last)")
    p.add_argument("--size", type=int, default=None, help="resize images to SIZE (default: native)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="imagefolder/wds split")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--bn-images", type=int, default=4096,
                   help="clean train images to re-estimate BN statistics on (0: keep the saved ones)")
    p.add_argument("--limit-train", type=int, default=None, help="random train subset (smoke runs)")
    p.add_argument("--limit-test", type=int, default=None)
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


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    feats.set_threads(args.threads)
    progress = not args.no_progress
    spec = feats.parse_checkpoint(args.checkpoint, args.trunk)
    data = load_data(args.data, args.size, args.test_fraction)
    data = data.subset(args.limit_train, args.limit_test, args.seed)
    trunk = None if spec.kind == "raw" else feats.load_trunk(spec, args.seed)
    bn_n = 0
    if trunk is not None and args.bn_images > 0:
        bn_n = feats.recalibrate_bn(trunk, data.train_x, args.bn_images, args.batch_size,
                                    args.size, args.seed, progress)
    ftr = feats.extract(trunk, data.train_x, args.stage, args.batch_size, args.size, "train features", progress)
    fte = feats.extract(trunk, data.test_x, args.stage, args.batch_size, args.size, "test features", progress)
    ytr, yte = torch.from_numpy(data.train_y), torch.from_numpy(data.test_y)
    result: dict[str, Any] = {
        "mode": args.mode, "checkpoint": args.checkpoint, "kind": spec.kind,
        "trunk": spec.trunk_name or None, "data": data.name, "stage": args.stage,
        "n_train": len(ytr), "n_test": len(yte), "num_classes": data.num_classes,
        "checkpoint_step": spec.step, "feature_dim": int(ftr.shape[1]), "bn_images": bn_n, "skipped": data.skipped,
    }
    if args.mode in ("linear", "all"):
        lin = linear_probe(ftr, ytr, fte, yte, data.num_classes, WD_SWEEP, max_iter=args.max_iter,
                           seed=args.seed)
        result["linear"] = {"accuracy": round(lin.accuracy, 2), "weight_decay": lin.weight_decay,
                            "val_accuracy": lin.val_accuracy,
                            "train_accuracy": round(lin.train_accuracy, 2)}
    if args.mode in ("knn", "all"):
        acc = knn_accuracy(ftr, ytr, fte, yte, data.num_classes, args.k, args.temperature)
        result["knn"] = {"accuracy": round(acc, 2), "k": args.k, "temperature": args.temperature}
    result["seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out) if args.out else default_out(args, spec)
    result["out"] = str(out)
    atomic_write_json(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(0)

    try:
        result = run_eval(args)
    except (feats.CheckpointSpecError, CheckpointError, DataSpecError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"seer-eval: error: {msg}", file=sys.stderr)
        return 2
    for m in ("linear", "knn"):
        if m in result:
            log.info("%s accuracy: %.2f%% (%s, %s)", m, result[m]["accuracy"], result["kind"], result["data"])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
