"""The memory table of docs/plan.md: every preset at its world size, planned vs simulated.

Each preset runs `seer-plan --config PRESET --simulate --json` in a fresh process (so its wall
time and peak RSS are its own) and the table lists the mesh, the analytic plan, the simulated
peak (FSDPMemTracker on fake tensors), their ratio and whether each fits an A100-40GB, an
H100-80GB and an H200-141GB (seer_pipeline.plan.cli.fits).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_plan_simulate.py [--presets a,b] [--out F.jsonl]
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_plan_simulate.py --replan F.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("cpu_tiny", "swav_rn50like", "seer_32gf", "seer_128gf", "seer_256gf", "seer_10b")
#: cpu_tiny's preset is one local rank; the table (and CI) simulate it at 8.
WORLD = {"cpu_tiny": 8}


def run_one(preset: str, extra: list[str] | None = None) -> dict[str, Any]:
    """One preset's simulation in a fresh process; the CLI's JSON plus the process's wall time."""
    cmd = [sys.executable, "-m", "seer_pipeline.plan.cli", "--config", preset, "--simulate", "--json"]
    if preset in WORLD:
        cmd += ["--gpus", str(WORLD[preset])]
    cmd += extra or []
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{preset}: seer-plan exited {out.returncode}:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = time.perf_counter() - t0
    return row


def replan(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row with its analytic columns recomputed by the current planner (the simulated
    figures do not depend on the planner, and a 10B simulation takes minutes)."""
    from seer_pipeline.config.train import load_train_config
    from seer_pipeline.plan.analytic import plan_config
    from seer_pipeline.plan.cli import fits

    p = plan_config(load_train_config(row["preset"], row.get("overrides", [])), row["world_size"],
                    row["local_world_size"])
    return {**row, "memory_per_gpu_gib": p["memory_per_gpu_gib"],
            "planned_gib": {k: v / 2**30 for k, v in p["memory_per_gpu_bytes"].items()},
            "planned_over_simulated": p["memory_per_gpu_gib"] / row["simulated_peak_gib"],
            "fits_planned": fits(p["memory_per_gpu_gib"]), "fits_simulated": fits(row["simulated_peak_gib"])}


def table(rows: list[dict[str, Any]]) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = ["| preset | GPUs | mesh | planned GiB | simulated GiB | planned/sim | A100-40GB | H100-80GB | H200-141GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp, fs = r["fits_planned"], r["fits_simulated"]
        fit = {c: yes(fp[c]) if fp[c] == fs[c] else f"plan {yes(fp[c])} / sim {yes(fs[c])}" for c in fp}
        name = r["preset"] + (f" ({' '.join(r['overrides'])})" if r.get("overrides") else "")
        lines.append(f"| {name} | {r['world_size']} | {r['mesh']} | {r['memory_per_gpu_gib']:.2f} | "
                     f"{r['simulated_peak_gib']:.2f} | {r['planned_over_simulated']:.3f} | {fit['a100_40gb']} | "
                     f"{fit['h100']} | {fit['h200']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", default=None, help="also append each row as a JSON line here")
    ap.add_argument("--replan", default=None, help="re-plan the rows stored in this JSON-lines file")
    args = ap.parse_args()
    rows = []
    if args.replan:
        rows = [replan(json.loads(line)) for line in open(args.replan) if line.strip()]
        for r in rows:
            print(f"{r['preset']}: planned {r['memory_per_gpu_gib']:.3f} GiB, simulated "
                  f"{r['simulated_peak_gib']:.3f} GiB (ratio {r['planned_over_simulated']:.3f})")
        print(table(rows))
        return 0
    for preset in args.presets.split(","):
        r = run_one(preset)
        rows.append(r)
        print(f"{preset}: planned {r['memory_per_gpu_gib']:.3f} GiB, simulated {r['simulated_peak_gib']:.3f} GiB "
              f"(ratio {r['planned_over_simulated']:.3f}); simulation {r['wall_s']:.1f} s in-process, "
              f"{r['process_wall_s']:.1f} s with start-up, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
