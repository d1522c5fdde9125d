"""GPU check of the real product: `seer-train` itself on one GPU, one command, one JSON file.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py [--out DIR]     # one CUDA GPU, ~8 min
    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py --smoke          # CPU, gloo, cpu_tiny
    bash benchmarks/gpu_run.sh --out DIR    # a GPU machine without this project's dependencies

`benchmarks/gpu_env.py` refuses first, in seconds, a Python it cannot run in (no torch, an
untested one, a module missing) and records the environment (section 0).

Every run is `seer_pipeline.train.cli.main` (the `seer-train` entry) in a fresh process with
`dist.backend=nccl` at world size 1, bf16, activation checkpointing and SyncBN (on CUDA, from the
seer_32gf preset). The process wrapper only observes: it times `Trainer.train` and each
`Checkpointer.save` call and reads `torch.cuda.max_memory_allocated` at exit.

1. Resume: 20 steps uninterrupted vs SIGUSR2 after step 10 + the same command again, with
   torch.compile off and on (`train.deterministic=true`, trunk regnety_1.6gf so that compiling
   three times stays short): per-step losses equal, or their max difference.
2. Throughput: img/s per GPU and model-FLOPs utilisation of regnety_32gf and regnety_128gf at
   SEER crops (2x224+4x96) and 16 images/GPU; peak CUDA memory next to `seer-plan`'s analytic
   figure and its fake-tensor simulation for the same setting (run on CPU meanwhile).
3. Async checkpointing's stall: loop time with periodic async saves minus loop time without
   saves, as a share of the same difference with synchronous saves.

Writes DIR/gpu_check.json, DIR/gpu_check.md (the table for docs/gpu.md) and DIR/train.log (every
process's output) after every section, nothing else: run folders, probes and shards go to a
temporary work folder (`work_dir` in the JSON). Core sections first (1.6GF resume without
compile, 32GF throughput, save stall); 128GF and the compiled resume only while `--budget-s`
lasts; no process outlives `--limit-s`. `--smoke` runs the same code on CPU (cpu_tiny, gloo,
6 steps, compile off) so CI keeps it from rotting.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.gpu_report import passed, render, save  # noqa: E402  (the repository root is no package)

PHOTOS = REPO / "tests" / "data" / "photos"
RESUME_TRUNK = "regnety_1.6gf"
PREEMPTED = 75  # seer_pipeline.train.signals.PREEMPTED (not imported: keeps --help torch-free)


def _probe(out_json: str, argv: list[str]) -> int:
    """Run `seer-train` in this process, recording loop and save times and peak CUDA memory."""
    import torch

    from seer_pipeline.checkpoint.checkpointer import Checkpointer
    from seer_pipeline.train import cli
    from seer_pipeline.train.trainer import Trainer

    rec: dict[str, Any] = {"saves": []}
    save, train = Checkpointer.save, Trainer.train

    def timed_save(self: Checkpointer, step: int, *args: Any, **kwargs: Any) -> float:
        # The checkpointer owns the save decision (after_step); every save goes through here.
        t0 = time.perf_counter()
        out = save(self, step, *args, **kwargs)
        blocking = kwargs.get("blocking", args[2] if len(args) > 2 else True)
        rec["saves"].append({"step": step, "blocking": bool(blocking), "call_s": time.perf_counter() - t0})
        return out

    def timed_train(self: Trainer) -> int:
        t0 = time.perf_counter()
        try:
            return train(self)
        finally:
            rec["train_s"] = time.perf_counter() - t0

    Checkpointer.save, Trainer.train = timed_save, timed_train  # type: ignore[method-assign]
    rc = cli.main(argv)
    if torch.cuda.is_available():
        rec["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        rec["device_name"] = torch.cuda.get_device_name()
    rec["rc"] = rc
    Path(out_json).write_text(json.dumps(rec))
    return rc


class Check:
    """Builds the commands; `smoke` swaps the GPU settings for cpu_tiny on gloo."""

    def __init__(self, out: Path, smoke: bool, shards: Path, work: Path | None = None,
                 deadline: float | None = None) -> None:
        # `out` gets the results only (at most 8 files); run folders, probes and shards go to `work`.
        self.out, self.smoke, self.shards = out, smoke, shards
        self.work = work or out
        # time.monotonic() by which every process must be gone: a lent machine's command limit.
        self.deadline = deadline
        self.preset = "cpu_tiny" if smoke else "seer_32gf"
        self.backend = "gloo" if smoke else "nccl"

    def base(self, run: Path, steps: int, *extra: str) -> list[str]:
        args = ["--config", self.preset, f"run.dir={run}", f"data.shards={self.shards}",
                f"train.steps={steps}", f"dist.backend={self.backend}", "dist.nproc=1",
                "train.tensorboard=false", "train.log_every=1", "ckpt.keep_latest=2"]
        if self.smoke:
            args += ["data.batch_size=4", "data.workers=1", "train.precision=bf16", "parallel.ac=stage"]
        else:  # seer_32gf: bf16, AC by stage, hybrid FSDP (1x1 mesh here), SyncBN per node
            args += ["data.batch_size=16", "data.workers=8", "data.crops=seer2021", "train.threads=4"]
        return args + list(extra)

    def train(self, name: str, args: list[str], interrupt_after: int = 0,
              timeout: float = 600) -> tuple[int, dict[str, Any], list[dict[str, Any]], Path]:
        """One probed `seer-train` process; SIGUSR2 once `interrupt_after` steps are logged."""
        run = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run.dir=")))
        probe = self.work / f"{name}.probe.json"
        cmd = [sys.executable, __file__, "--probe", str(probe), "--", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        deadline = time.monotonic() + timeout
        if self.deadline is not None:
            deadline = min(deadline, self.deadline)
            timeout = max(0.0, deadline - time.monotonic())
        with open(self.out / "train.log", "a") as log:  # one log for every process, in order
            log.write(f"\n===== {name}: {' '.join(cmd[4:])}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            sent = False
            while proc.poll() is None and time.monotonic() < deadline:
                if interrupt_after and not sent and len(_rows(run)) >= interrupt_after:
                    proc.send_signal(signal.SIGUSR2)
                    sent = True
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{name}: seer-train did not finish in {timeout:.0f} s (see {log.name})")
        rec = json.loads(probe.read_text()) if probe.exists() else {}
        return proc.returncode, rec, _rows(run), run


def _rows(run: Path) -> list[dict[str, Any]]:
    f = run / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def resume_check(c: Check, compile_: bool, steps: int, at: int) -> dict[str, Any]:
    """Uninterrupted vs interrupted-and-resumed: per-step losses compared."""
    tag = f"compile_{'on' if compile_ else 'off'}"
    extra = [f"parallel.compile={str(compile_).lower()}", "train.deterministic=true", "ckpt.every=0"]
    if not c.smoke:  # a small trunk: compiling 32GF's blocks three times would not fit 8 minutes
        extra.append(f"model.trunk={RESUME_TRUNK}")
    rc_ref, _, ref, _ = c.train(f"resume_{tag}_ref", c.base(c.work / f"resume_{tag}_ref", steps, *extra))
    run = c.work / f"resume_{tag}_int"
    rc_int, rec_int, first, _ = c.train(f"resume_{tag}_int", c.base(run, steps, *extra), interrupt_after=at)
    rc_res, _, rows, _ = c.train(f"resume_{tag}_resumed", c.base(run, steps, *extra))
    ref_loss = [r["loss"] for r in ref]
    loss = [r["loss"] for r in rows]
    ok = [r["step"] for r in rows] == list(range(1, steps + 1)) and len(ref_loss) == steps
    diff = max((abs(a - b) for a, b in zip(loss, ref_loss)), default=float("nan")) if ok else None
    return {"compile": compile_, "exit_codes": [rc_ref, rc_int, rc_res], "interrupted_at": len(first),
            "preempted": rc_int == PREEMPTED, "steps_once_each": ok, "losses_equal": ok and loss == ref_loss,
            "max_abs_loss_diff": diff, "preemption_save_s": [s["call_s"] for s in rec_int.get("saves", [])]}


def _plan_cmd(c: Check, trunk: str, batch: int) -> list[str]:
    overrides = [f"model.trunk={trunk}", f"data.batch_size={batch}"]
    # The run's own settings (on CPU the run autocasts where the simulation uses bf16 weights).
    overrides += ["train.precision=bf16", "parallel.ac=stage"] if c.smoke else ["data.crops=seer2021"]
    return [sys.executable, "-m", "seer_pipeline.plan.cli", "--config", c.preset, *overrides,
            "--gpus", "1", "--simulate", "--json"]


def throughput(c: Check, trunk: str, steps: int, warmup: int, sim: subprocess.Popen | None,
               peak_flops: float | None) -> dict[str, Any]:
    """img/s, MFU and peak memory of one model; the plan and simulation of the same setting."""
    batch = 4 if c.smoke else 16
    name = f"speed_{trunk}"
    args = c.base(c.work / name, steps, f"model.trunk={trunk}", f"data.batch_size={batch}", "ckpt.every=0",
                  "ckpt.save_final=false", "train.deterministic=false")
    rc, rec, rows, _ = c.train(name, args)
    timed = rows[warmup:] or rows
    out: dict[str, Any] = {"trunk": trunk, "batch_per_gpu": batch, "exit_code": rc, "steps": len(rows),
                           "train_s": rec.get("train_s")}
    if timed:
        out["img_s_per_gpu"] = statistics.median(r["img_s"] for r in timed)
        out["step_s_median"] = statistics.median(r["step_s"] for r in timed)
        out["data_wait_share"] = statistics.median(r["data_wait"] for r in timed)
    out["cuda_max_allocated_gib"] = rec.get("cuda_max_allocated_gib")
    out["cuda_max_reserved_gib"] = rec.get("cuda_max_reserved_gib")
    if sim is not None:
        wait = 900.0 if c.deadline is None else max(1.0, c.deadline - time.monotonic())
        try:
            so, se = sim.communicate(timeout=wait)
        except subprocess.TimeoutExpired:  # the training figures stand without it
            sim.kill()
            so, se = sim.communicate()
            se = f"seer-plan --simulate did not finish in {wait:.0f} s\n" + se
        if sim.returncode == 0:
            s = json.loads(so.strip().splitlines()[-1])
            out["planned_gib"], out["simulated_gib"] = s["memory_per_gpu_gib"], s["simulated_peak_gib"]
            out["flops_per_image"] = s["plan"]["flops_per_image"]
        else:
            out["plan_error"] = se[-2000:]
    if peak_flops and out.get("img_s_per_gpu") and out.get("flops_per_image"):
        out["mfu"] = out["img_s_per_gpu"] * out["flops_per_image"] / peak_flops
    return out


def ckpt_stall(c: Check, trunk: str, steps: int, every: int, no_save_loop_s: float | None) -> dict[str, Any]:
    """Loop time without saves (the throughput run of the same trunk and steps, which saves
    nothing), with synchronous and with async periodic saves."""
    if no_save_loop_s is None:
        return {"error": "the throughput run without saves has no loop time"}
    loop: dict[str, float] = {"none": no_save_loop_s}
    calls: dict[str, list[float]] = {"none": []}
    for mode, extra in (("sync", [f"ckpt.every={every}", "ckpt.async=false"]),
                        ("async", [f"ckpt.every={every}", "ckpt.async=true"])):
        name = f"stall_{mode}"
        rc, rec, _, _ = c.train(name, c.base(c.work / name, steps, f"model.trunk={trunk}",
                                             "ckpt.save_final=false", "train.deterministic=false", *extra))
        if rc != 0 or "train_s" not in rec:
            return {"error": f"{name} exited {rc}"}
        loop[mode], calls[mode] = rec["train_s"], [s["call_s"] for s in rec["saves"]]
    sync_cost, stall = loop["sync"] - loop["none"], loop["async"] - loop["none"]
    return {"trunk": trunk, "steps": steps, "every": every, "loop_s": loop, "save_call_s": calls,
            "sync_save_cost_s": sync_cost, "async_stall_s": stall,
            "async_stall_share": stall / sync_cost if sync_cost > 0 else None}


#: Rough seconds each optional section needs on an H100 (guesses until measured: 30 steps of
#: 128GF plus start-up; three 1.6GF runs with compile), compared with the budget left.
EXTRA_S = {"128gf": 150, "compile": 240}
BUDGET_S = 540  # one lent-machine command may run 600 s; benchmarks/gpu_run.sh's install comes first
LIMIT_S = 570  # every process is gone by then, so the command ends with its JSON inside 600 s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU: cpu_tiny on gloo, fewer steps, compile off")
    ap.add_argument("--out", default=None, help="output folder (default: a new temporary one)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="optional sections (128GF, compile) start only while this many seconds last")
    ap.add_argument("--limit-s", type=float, default=None,
                    help=f"every process is stopped by then (default {LIMIT_S} on a GPU, none with --smoke)")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.probe:
        return _probe(args.probe, [a for a in rest if a != "--"])
    t0 = time.monotonic()  # before torch's import: --limit-s counts the whole command
    from benchmarks.gpu_env import environment, preflight  # after --probe: children need neither

    why = preflight()
    if why:
        print(why, file=sys.stderr)
        return 2
    import torch

    from seer_pipeline.plan.gpus import GPUS, gpu_key
    from seer_pipeline.shards.synth import photo_variants, write_shards

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    limit = args.limit_s if args.limit_s is not None else (None if args.smoke else LIMIT_S)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    shards = write_shards(work / "shards", photo_variants(PHOTOS, 64 if args.smoke else 512,
                                                          max_side=64 if args.smoke else 320), 32)
    c = Check(out, args.smoke, shards, work, deadline=t0 + limit if limit else None)
    device = "cpu" if args.smoke else torch.cuda.get_device_name()
    key = None if args.smoke else gpu_key(device)
    peak = GPUS[key]["bf16"] if key else None
    trunks = ["cpu_tiny"] if args.smoke else ["regnety_32gf", "regnety_128gf"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # The simulations are CPU work: they run while the GPU trains.
    sims = {t: subprocess.Popen(_plan_cmd(c, t, 4 if args.smoke else 16), cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for t in trunks}
    steps, at = (6, 3) if args.smoke else (20, 10)
    res: dict[str, Any] = {"device": device, "gpu_key": key, "smoke": args.smoke, "torch": torch.__version__,
                           "work_dir": str(work), "limit_s": limit, "budget_s": args.budget_s,
                           "sections_done": [], "skipped": [], "errors": {}, "wall_s": 0.0}

    def section(name: str, fn: Any, label: str = "") -> None:
        """Run one section; with a `label` (an optional one) its result joins the list `name`."""
        try:
            value = fn()
        except Exception as e:  # a section cut short (time limit, crash): the others still run
            res["errors"][label or name] = f"{type(e).__name__}: {e}"
        else:
            if label:
                res[name].append(value)
            else:
                res[name] = value
            res["sections_done"].append(label or name)
        res["wall_s"] = time.monotonic() - t0
        save(out, res)  # after every section: a command cut short keeps what it measured

    # Core sections first (issue 20: within 8 minutes on one GPU), then the optional ones while
    # the time budget lasts.
    section("environment", environment)
    section("resume", lambda: [resume_check(c, False, steps, at)])
    section("throughput", lambda: [throughput(c, trunks[0], 6 if args.smoke else 30,
                                              2 if args.smoke else 10, sims[trunks[0]], peak)])
    section("ckpt_stall", lambda: ckpt_stall(c, trunks[0], 6 if args.smoke else 30, 2 if args.smoke else 10,
                                             res["throughput"][0].get("train_s")))
    extras = [] if args.smoke else [("throughput", trunks[1], EXTRA_S["128gf"]),
                                    ("resume", "compile", EXTRA_S["compile"])]
    for kind, what, need in extras:
        left = args.budget_s - (time.monotonic() - t0)
        if left < need:
            res["skipped"].append(f"{kind} {what}: {left:.0f} s left of --budget-s, needs ~{need} s")
            save(out, res)
            continue
        if kind not in res:  # its core section failed: nothing to add to
            res["skipped"].append(f"{kind} {what}: the core {kind} section failed")
        elif kind == "throughput":
            section(kind, lambda: throughput(c, what, 30, 10, sims[what], peak), f"{kind} {what}")
        else:
            section(kind, lambda: resume_check(c, True, steps, at), f"{kind} {what}")
    for p in sims.values():
        if p.poll() is None:
            p.kill()
    print(render(res))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if passed(res) else 1


if __name__ == "__main__":
    sys.exit(main())
