"""`make demo` (`python -m seer_pipeline.demo`): the whole pipeline, end to end, on CPU.

1. Fashion-MNIST train images -> a raw dump of PNG files (labels withheld): OUT/raw
2. `seer-shards build` -> OUT/shards (manifest, progress bar)
3. `seer-train --config cpu_tiny dist.nproc=2`, preempted once by SIGUSR2 part way, then the
   same command again, which resumes from the preemption checkpoint: OUT/run (SwAV); the same
   with `--config cpu_tiny_dino` (DINO, same data, steps, batch and schedule): OUT/run_dino
4. `seer-eval` linear (L-BFGS quick probe and VISSL's SGD BN+linear head), 1% / 10% low-shot
   and k-NN: the SwAV trunk, the DINO teacher trunk, the random-init trunk, raw pixels, and the
   same trunk trained with labels for a fixed number of steps (the upper bound)
5. `seer-plot` -> OUT/loss.png (SwAV), OUT/loss_dino.png; OUT/report.md and OUT/report.json

Both trainings run a fixed number of steps, never a wall-clock budget, so the accuracies do not
depend on how fast or how loaded the machine is (only the time does). Every length and size is a
flag or a SEER_DEMO_* variable, so a smoke test runs the same code on a subset in a few minutes.
Reruns reuse finished steps (dump, shards, a completed run).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from seer_pipeline.config.train import load_train_config
from seer_pipeline.eval import fmnist
from seer_pipeline.core.exit_codes import PREEMPTED, USAGE
from seer_pipeline.core.io_utils import atomic_write_json
from seer_pipeline.train.metrics import read_metrics
from seer_pipeline.core.logging_utils import setup_logging

log = logging.getLogger(__name__)

# Demo recipe on top of the cpu_tiny preset (measured trials: docs/demo.md).
RECIPE = [
    "data.batch_size=64", "data.workers=1", "optim.warmup_steps=30",
    # LARS at base_lr 6.8 (peak 3.4 at global batch 128; SEER's 0.3 per 256 is for 1B images
    # over many epochs). Measured, 700 steps, linear / k-NN on a 20k/5k subset: 0.6 -> 76.8 /
    # 73.1, 2.4 -> 81.6 / 77.3, 4.8 -> 83.6 / 79.0, 6.8 -> 84.9 / 79.6, 9.6 -> 84.7 / 78.2,
    # 19.2 -> 81.8 / 75.2 (docs/demo.md).
    "optim.base_lr=6.8",
    # epsilon 0.025 (preset 0.05): sharper Sinkhorn codes, +1.8 linear points at 700 steps.
    # 300 prototypes (1000: -0.8 linear at lr 9.6); a 1920 queue cost 15 points (docs/demo.md).
    "model.n_prototypes=300", "swav.epsilon=0.025", "swav.freeze_prototypes_iters=30",
    "train.log_every=10",
    # Throughput decides this result (more epochs in the budget). Measured on a quiet 2-core
    # machine, 2 ranks, 60 steps: 384 img/s as is, 458 with channels_last, 501 with one FSDP
    # unit per 8 blocks too (a 0.26M-parameter trunk does not need per-block sharding).
    "model.channels_last=true", "parallel.blocks_per_unit=8",
    "train.tensorboard=false", "ckpt.every=200",
]
# The DINO row: the same recipe less its SwAV-only keys, on cpu_tiny_dino, plus the teacher
# settings below. Chosen on a validation split of *train* images (benchmarks/demo_trial.py, never
# the test set; 200-step trials in docs/demo.md): DINO's ImageNet values (momentum 0.996, teacher
# temperature 0.04 -> 0.07, last layer frozen for an epoch) give a uniform teacher in a 3-epoch
# run (73.5 linear, random trunk 66.0), because an EMA over ~250 steps of a student moving at
# LARS peak 3.4 averages very different weights.
SWAV_ONLY = ("swav.", "model.n_prototypes=")
DINO_ONLY = [
    # 200 steps, val linear: momentum 0.996 73.5, 0.99 78.0, 0.98 79.2, 0.95 79.8 (T 0.025)
    "dino.teacher_momentum=0.95",
    # T 0.04 77.1, 0.025 78.0 (momentum 0.99); 0.025 79.2, 0.015 80.2 (momentum 0.98). 400 steps
    # at 0.95 / 0.015: 81.6, SwAV row 81.3.
    "dino.teacher_temperature=0.015",
    "dino.warmup_teacher_temperature=0.015",
    "dino.freeze_last_layer_iters=30",       # as the SwAV row's prototypes (30 warm-up steps)
]
DINO_RECIPE = [o for o in RECIPE if not o.startswith(SWAV_ONLY)] + DINO_ONLY


@dataclass(frozen=True)
class Objective:
    """One pretraining row of the demo: its preset, recipe, run folder and frozen-head key."""
    name: str
    preset: str
    recipe: tuple[str, ...]
    run: str
    freeze_key: str  # the head layer frozen for the first steps (no preemption before it thaws)


SWAV = Objective("swav", "cpu_tiny", tuple(RECIPE), "run", "swav.freeze_prototypes_iters")
DINO = Objective("dino", "cpu_tiny_dino", tuple(DINO_RECIPE), "run_dino", "dino.freeze_last_layer_iters")
OBJECTIVES = (SWAV, DINO)


@dataclass
class Settings:
    out: str = "runs/demo"
    fmnist_dir: str | None = None
    # 1,600 steps x 128 images = 3.4 epochs: ~7 min at the 470-500 img/s a quiet 2-core machine
    # measured (docs/demo.md), which keeps the whole demo near 12 minutes there. The time-boxed
    # demo this replaces ran 1,547-1,672 steps quiet but 1,088 on a loaded machine (84.9 linear).
    train_steps: int = 1600
    # 2,500 steps x 128 = 5.3 epochs, ~2.5 min at the ~2,000 img/s of one supervised process.
    sup_steps: int = 2500
    subset: int | None = None  # train images exported (None: all 60k)
    test_subset: int | None = None
    preempt_at: float = 0.35  # fraction of the planned steps at which SIGUSR2 is sent
    bn_images: int = 4096
    eval_threads: int = 2
    overrides: list[str] = field(default_factory=list)


def _env(name: str, default: Any, cast: Any) -> Any:
    v = os.environ.get(name)
    return cast(v) if v not in (None, "") else default


def parse_settings(argv: Sequence[str] | None) -> Settings:
    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m seer_pipeline.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=_env("SEER_DEMO_OUT", d.out, str))
    ap.add_argument("--fmnist-dir", default=_env("SEER_FMNIST_DIR", None, str))
    ap.add_argument("--train-steps", type=int, default=_env("SEER_DEMO_TRAIN_STEPS", d.train_steps, int))
    ap.add_argument("--sup-steps", type=int, default=_env("SEER_DEMO_SUP_STEPS", d.sup_steps, int))
    ap.add_argument("--subset", type=int, default=_env("SEER_DEMO_SUBSET", None, int))
    ap.add_argument("--test-subset", type=int, default=_env("SEER_DEMO_TEST_SUBSET", None, int))
    ap.add_argument("--preempt-at", type=float, default=d.preempt_at)
    ap.add_argument("--bn-images", type=int, default=_env("SEER_DEMO_BN_IMAGES", d.bn_images, int))
    ap.add_argument("--fresh", action="store_true", help="delete OUT first")
    ap.add_argument("overrides", nargs="*", help="extra seer-train key=value overrides")
    a = ap.parse_args(argv)
    if not 0 < a.preempt_at < 1:
        ap.error("--preempt-at must be in (0, 1)")
    if a.train_steps < 20 or a.sup_steps < 1:
        ap.error("--train-steps must be >= 20 and --sup-steps >= 1")
    if a.fresh and Path(a.out).exists():
        shutil.rmtree(a.out)
    return Settings(a.out, a.fmnist_dir, a.train_steps, a.sup_steps, a.subset, a.test_subset,
                    a.preempt_at, a.bn_images, d.eval_threads, list(a.overrides))


def _cmd(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def _run(cmd: list[str], what: str, capture: bool = False) -> str:
    log.info("$ %s", " ".join(cmd[2:] if cmd[0] == sys.executable else cmd))
    res = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if res.returncode != 0:
        raise SystemExit(f"demo: {what} failed (exit {res.returncode})")
    return res.stdout or ""


def _metrics(run: Path) -> list[dict[str, Any]]:
    return read_metrics(run / "metrics.jsonl")


def export_and_shard(s: Settings, out: Path) -> dict[str, Any]:
    root = fmnist.check_dir(s.fmnist_dir)  # FashionMNISTMissing names the package and files
    t0 = time.monotonic()
    n = fmnist.export_pngs(out / "raw", root, limit=s.subset)
    t1 = time.monotonic()
    manifest = out / "shards" / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("inputs_seen") == n:
        log.info("reusing shards in %s", manifest.parent)
    else:
        shutil.rmtree(out / "shards", ignore_errors=True)
        # 28x28 images: the builder's default --min-side (16) would keep them, 8 says why.
        _run(_cmd("data_prep.cli") + ["build", str(out / "raw"), "--out", str(out / "shards"),
                                      "--min-side", "8", "--workers", "2"], "seer-shards build")
    m = json.loads(manifest.read_text())
    return {"images": n, "shard_images": m.get("written"), "shards": len(m.get("shards", [])),
            "export_s": round(t1 - t0, 1), "shards_s": round(time.monotonic() - t1, 1)}


def _override(s: Settings, key: str, default: str, obj: Objective = SWAV) -> str:
    """The value a key gets on `obj`'s seer-train command line (the last one wins), else its
    preset's (`default` if the preset has none)."""
    vals = [o.split("=", 1)[1] for o in [*obj.recipe, *s.overrides] if o.startswith(key + "=")]
    if vals:
        return vals[-1]
    return str(OmegaConf.select(load_train_config(obj.preset), key, default=default))


def _train_cmd(s: Settings, run: Path, shards: Path, extra: list[str], obj: Objective = SWAV) -> list[str]:
    return _cmd("seer_pipeline.train.cli") + [
        "--config", obj.preset, "dist.nproc=2", f"run.dir={run}", f"data.shards={shards}",
        *obj.recipe, *s.overrides, *extra]


def pretrain(s: Settings, out: Path, obj: Objective = SWAV) -> dict[str, Any]:
    run, shards = out / obj.run, out / "shards"
    info_path = out / ("pretrain.json" if obj is SWAV else f"pretrain_{obj.name}.json")
    if info_path.exists() and (run / "checkpoints").is_dir():
        info = json.loads(info_path.read_text())
        if info.get("done"):
            log.info("reusing the finished pretraining run in %s", run)
            return info
    shutil.rmtree(run, ignore_errors=True)
    t_start = time.monotonic()
    steps = s.train_steps
    # Preempt only once the prototypes are unfrozen: a checkpoint taken while they are frozen
    # has no momentum for them and the trainer cannot resume it (reported to the trainer owner).
    freeze = int(_override(s, obj.freeze_key, "0", obj))
    steps = max(steps, freeze + 10)
    preempt_step = min(steps - 3, max(freeze + 2, int(steps * s.preempt_at)))
    cmd = _train_cmd(s, run, shards, [f"train.steps={steps}", f"optim.total_steps={steps}"], obj)
    info: dict[str, Any] = {"steps": steps, "preempt_sent_at_step": None}

    # Leg 1: SIGUSR2 once the run is `preempt_at` of the way; it must save and exit PREEMPTED.
    log.info("$ %s   (SIGUSR2 at step %d)", " ".join(cmd[2:]), preempt_step)
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        done = max((r.get("step", 0) for r in _metrics(run)), default=0)
        if done >= preempt_step and info["preempt_sent_at_step"] is None:
            log.info("demo: sending SIGUSR2 (preemption) at step %d", done)
            proc.send_signal(signal.SIGUSR2)
            info["preempt_sent_at_step"] = done
        time.sleep(0.5)
    if proc.returncode != PREEMPTED:
        raise SystemExit(f"demo: expected the preempted trainer to exit {PREEMPTED}, got {proc.returncode}")
    info["resumed_from_step"] = max((r.get("step", 0) for r in _metrics(run)), default=0)

    # Leg 2: the same command resumes and runs to the last step, however long that takes.
    _run(cmd, "resumed training")
    rows = [r for r in _metrics(run) if "img_s" in r]
    final = max((r.get("step", 0) for r in rows), default=0)
    n_img = json.loads((shards / "manifest.json").read_text()).get("written", 1)
    cfg_batch = 2 * int(_override(s, "data.batch_size", "16", obj))
    info.update(
        done=True, final_step=final, global_batch=cfg_batch,
        epochs=round(final * cfg_batch / max(1, n_img), 2),
        minutes=round((time.monotonic() - t_start) / 60, 2),
        median_img_s=round(sorted(r["img_s"] for r in rows)[len(rows) // 2], 1) if rows else None,
        first_loss=next((r["loss"] for r in rows if "loss" in r), None),
        final_loss=next((r["loss"] for r in reversed(rows) if "loss" in r), None),
    )
    atomic_write_json(info_path, info)
    return info


def evaluate(s: Settings, out: Path) -> dict[str, Any]:
    data = "fashion-mnist" + (f":{s.fmnist_dir}" if s.fmnist_dir else "")
    common = ["--data", data, "--bn-images", str(s.bn_images), "--threads", str(s.eval_threads),
              "--protocol", "both", "--low-shot", "1,10"]
    if s.subset:
        common += ["--limit-train", str(s.subset)]
    if s.test_subset:
        common += ["--limit-test", str(s.test_subset)]
    results: dict[str, Any] = {}

    def ev(name: str, mode: str, ckpt: str) -> None:
        text = _run(_cmd("seer_pipeline.eval.cli") + [mode, "--checkpoint", ckpt, *common,
                                                       "--out", str(out / "eval" / f"{name}.json")],
                    f"seer-eval {name}", capture=True)
        results[name] = r = json.loads(text.strip().splitlines()[-1])
        log.info("%s: linear %s, SGD linear %s, k-NN %s (%.0f s)", name,
                 r.get("linear", {}).get("accuracy", "-"), r.get("linear_sgd", {}).get("accuracy", "-"),
                 r.get("knn", {}).get("accuracy", "-"), r["seconds"])

    for obj in OBJECTIVES:
        ev(obj.name, "all", str(out / obj.run))  # a DINO run: its teacher, as DINO evaluates
    ev("random", "all", "random:cpu_tiny")
    ev("raw_pixels", "linear", "raw")
    sup = out / "supervised"
    if not (sup / "trunk.pt").exists():
        cmd = _cmd("seer_pipeline.eval.supervised") + [
            "--trunk", "cpu_tiny", "--steps", str(s.sup_steps), "--out", str(sup),
            "--threads", str(s.eval_threads), "--data", data]
        _run(cmd + (["--limit-train", str(s.subset)] if s.subset else []), "supervised training")
    ev("supervised", "all", str(sup / "trunk.pt"))
    return results


def _targets(lin: dict[str, float]) -> dict[str, bool]:
    """The bars every pretrained row must clear (the SwAV row also has the stretch target)."""
    t: dict[str, bool] = {}
    for name in (o.name for o in OBJECTIVES):
        t[f"{name}_ge_random_plus_10"] = lin[name] >= lin["random"] + 10
        t[f"{name}_ge_raw_pixels"] = lin[name] >= lin["raw_pixels"]
    t["stretch_swav_ge_raw_plus_3"] = lin["swav"] >= lin["raw_pixels"] + 3
    return t


def write_report(out: Path, prep: dict, pre: dict[str, dict], ev: dict, timings: dict, s: Settings) -> Path:
    names = ("raw_pixels", "random", *(o.name for o in OBJECTIVES), "supervised")
    trained = [k for k in names if k != "raw_pixels"]
    lin = {k: ev[k]["linear"]["accuracy"] for k in names}
    knn = {k: ev[k]["knn"]["accuracy"] for k in trained if k != "supervised"}
    sgd = {k: {"top1": ev[k]["linear_sgd"]["accuracy"], "top5": ev[k]["linear_sgd"]["top5"]} for k in names}
    low = {k: {p: v.get("accuracy") for p, v in ev[k].get("low_shot", {}).items()} for k in names}
    gap = lin["supervised"] - lin["random"]
    closed = {o.name: round((lin[o.name] - lin["random"]) / gap, 3) if gap > 0 else None for o in OBJECTIVES}
    report = {
        "linear": lin, "linear_sgd": sgd, "low_shot": low, "knn": knn,
        "knn_supervised": ev["supervised"]["knn"]["accuracy"],
        "gap_closed": closed["swav"], "gap_closed_dino": closed["dino"],
        "targets": _targets(lin),
        "data": prep, "pretraining": pre["swav"], "pretraining_dino": pre["dino"],
        "timings_s": timings, "settings": asdict(s),
        "recipe": RECIPE + s.overrides, "recipe_dino": DINO_RECIPE + s.overrides,
        "n_test": ev["swav"]["n_test"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    atomic_write_json(out / "report.json", report)
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, (int, float)) else "-"

    rows = "\n".join(
        f"| {k} | {cell(lin[k])} | {cell(sgd[k]['top1'])} / {cell(sgd[k]['top5'])} | "
        f"{cell(low[k].get('1%'))} | {cell(low[k].get('10%'))} | {cell(knn.get(k))} |" for k in names)

    def trained_line(o: Objective) -> str:
        p = pre[o.name]
        return (f"{o.name} ({o.preset}): {p['final_step']} steps at global batch {p['global_batch']} "
                f"({p['epochs']} epochs), {p['minutes']} min, median {p['median_img_s']} images/s; loss "
                f"{p['first_loss']:.3f} -> {p['final_loss']:.3f}. Preempted by SIGUSR2 at step "
                f"{p['preempt_sent_at_step']}, resumed from step {p['resumed_from_step']}.")

    tg = report["targets"]
    md = f"""# SEER pipeline demo: SwAV and DINO on Fashion-MNIST (CPU)

Test accuracy (%) on {report['n_test']} Fashion-MNIST test images, frozen global-average-pooled
features. Linear: the quick L-BFGS probe on standardised features (weight decay chosen on held-out
train). SGD linear: VISSL's BatchNorm + linear head, SGD, 28 epochs, step decay, on precomputed
features (the precomputed-feature variant), top-1 / top-5. 1% / 10%: the L-BFGS probe trained on
class-balanced 1% and 10% subsets of train (the same images for every trunk). k-NN: k=20, T=0.07.
The DINO row is the teacher's trunk (as DINO evaluates).

| trunk | linear | SGD linear top-1 / top-5 | 1% | 10% | k-NN |
|---|---|---|---|---|---|
{rows}

SwAV closes **{(closed['swav'] or 0) * 100:.0f}%** of the random -> supervised gap, DINO
**{(closed['dino'] or 0) * 100:.0f}%** (supervised: the same `cpu_tiny` trunk trained with labels for
{s.sup_steps} steps).

Pretraining:
- {trained_line(SWAV)}
- {trained_line(DINO)}

Targets: SwAV >= random + 10: {tg['swav_ge_random_plus_10']}; SwAV >= raw pixels: {tg['swav_ge_raw_pixels']};
stretch (raw + 3): {tg['stretch_swav_ge_raw_plus_3']}. DINO >= random + 10: {tg['dino_ge_random_plus_10']};
DINO >= raw pixels: {tg['dino_ge_raw_pixels']}.

Timings (s): {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}. Load average at the end:
{report['load_average']}.

![loss](loss.png)
"""
    (out / "report.md").write_text(md)
    return out / "report.md"


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_settings(argv)
    setup_logging(0)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.monotonic()
    try:
        prep = export_and_shard(s, out)
    except fmnist.FashionMNISTMissing as e:
        print(f"demo: {e}", file=sys.stderr)
        return USAGE
    timings["data"] = time.monotonic() - t
    pre = {}
    for obj in OBJECTIVES:
        t = time.monotonic()
        pre[obj.name] = pretrain(s, out, obj)
        timings["pretrain" if obj is SWAV else f"pretrain_{obj.name}"] = time.monotonic() - t
    t = time.monotonic()
    ev = evaluate(s, out)
    timings["eval"] = time.monotonic() - t
    for obj in OBJECTIVES:
        png = "loss.png" if obj is SWAV else f"loss_{obj.name}.png"
        _run(_cmd("seer_pipeline.train.plot") + [str(out / obj.run), "--out", str(out / png)], "seer-plot")
    path = write_report(out, prep, pre, ev, timings, s)
    print((out / "report.md").read_text())
    print(f"demo: report in {path} and {out / 'report.json'}; loss curve {out / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
