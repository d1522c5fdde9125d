"""One recipe trial of the demo: fixed-length SwAV (or DINO) pretraining, then linear + k-NN on a subset.

    python benchmarks/demo_trial.py --steps 700 [--objective dino] [KEY=VALUE ...]

The demo's own command line (`seer_pipeline.demo.run.RECIPE` on the `cpu_tiny` preset, 2 ranks)
plus your overrides, for a fixed number of steps instead of a time budget, so that trials on a
busy machine give the same numbers (only slower). Then `seer-eval` on a validation split that
never reads the test set (the default, `--eval-on validation`): Fashion-MNIST *train* images
50,000-54,999 fit the probes and 55,000-59,999 score them. The pretraining saw those images
without labels, as it sees every train image in the demo. `--eval-on test` is the 20,000 / 5,000
train / test subset the SwAV sweep of docs/demo.md used. It needs the demo's shards (`make demo`
once, or --shards DIR). Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from seer_pipeline.demo.run import OBJECTIVES, Settings, _cmd, _train_cmd  # noqa: E402
from seer_pipeline.eval.fmnist import load_split, write_png  # noqa: E402

VALIDATION = (50_000, 55_000, 60_000)  # train images: probe fit [a, b), probe score [b, c)


def validation_folder(root: Path) -> Path:
    """ROOT/{train,test}/c<label>/<index>.png from Fashion-MNIST train images (once)."""
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    images, labels = load_split("train")
    a, b, c = VALIDATION
    for i in range(a, c):
        d = root / ("train" if i < b else "test") / f"c{labels[i]}"
        d.mkdir(parents=True, exist_ok=True)
        write_png(d / f"{i}.png", images[i])
    done.touch()
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--shards", default=str(REPO / "runs" / "demo" / "shards"))
    ap.add_argument("--out", default=str(REPO / "runs" / "trials" / "trial"))
    ap.add_argument("--objective", choices=[o.name for o in OBJECTIVES], default="swav",
                    help="which demo row's recipe (DINO: the cpu_tiny_dino preset)")
    ap.add_argument("--eval-on", choices=("validation", "test"), default="validation",
                    help="validation: held-out train images (tuning); test: the test subset")
    ap.add_argument("--limit-train", type=int, default=20000, help="--eval-on test only")
    ap.add_argument("--limit-test", type=int, default=5000, help="--eval-on test only")
    ap.add_argument("overrides", nargs="*", help="extra seer-train KEY=VALUE (win over the recipe)")
    a = ap.parse_args(argv)
    if not (Path(a.shards) / "manifest.json").exists():
        sys.exit(f"no shards at {a.shards}: run `make demo` once, or pass --shards DIR")
    run = Path(a.out)
    shutil.rmtree(run, ignore_errors=True)
    s = Settings(overrides=list(a.overrides))
    t0 = time.monotonic()
    subprocess.run(_train_cmd(s, run, Path(a.shards), [
        f"train.steps={a.steps}", f"optim.total_steps={a.steps}", "ckpt.every=0", "train.log_every=100"],
        next(o for o in OBJECTIVES if o.name == a.objective)),
        check=True)
    t1 = time.monotonic()
    if a.eval_on == "test":
        data = ["--data", "fashion-mnist", "--limit-train", str(a.limit_train), "--limit-test", str(a.limit_test)]
    else:
        val = validation_folder(run.parent / "validation")
        data = ["--data", f"imagefolder:{val}", "--size", "28", "--resize", "28"]
    res = subprocess.run(_cmd("seer_pipeline.eval.cli") + [
        "all", "--checkpoint", str(run), *data, "--threads", "2", "--no-progress", "--protocol", "both",
        "--low-shot", ""],
        check=True, stdout=subprocess.PIPE, text=True)
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps({"objective": a.objective, "overrides": a.overrides, "steps": a.steps,
                      "eval_on": a.eval_on, "train_s": round(t1 - t0, 1),
                      "linear": ev["linear"]["accuracy"], "linear_sgd": ev["linear_sgd"]["accuracy"],
                      "knn": ev["knn"]["accuracy"],
                      "n_train": ev["n_train"], "n_test": ev["n_test"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
