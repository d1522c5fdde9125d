"""What benchmarks/gpu_check.py leaves behind: its JSON and Markdown, rewritten after every
section so that a command cut short (a lent machine's 10-minute limit) keeps what it measured."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def render(res: dict[str, Any]) -> str:
    """The tables of docs/gpu.md from gpu_check's results, complete or not."""
    lines = [f"# gpu_check on {res['device']} ({'smoke, CPU' if res['smoke'] else 'GPU'}), "
             f"{res['wall_s']:.0f} s", ""]
    e = res.get("environment")
    if e:
        lines += [f"torch {e['torch']} (CUDA {e['torch_cuda']}), Python {e['python']}, "
                  + ", ".join(f"{k} {v['version']}" for k, v in e["modules"].items()), ""]
    lines += ["| resume check | exit codes | interrupted at | losses equal | max diff |",
              "|---|---|---|---|---|"]
    for r in res.get("resume", []):
        lines.append(f"| compile {'on' if r['compile'] else 'off'} | {r['exit_codes']} | {r['interrupted_at']} | "
                     f"{r['losses_equal']} | {r['max_abs_loss_diff']} |")
    lines += ["", "| trunk | img/s/GPU | MFU | data wait | peak alloc GiB | planned GiB | simulated GiB |",
              "|---|---|---|---|---|---|---|"]
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for t in res.get("throughput", []):
        lines.append(f"| {t['trunk']} | {f(t.get('img_s_per_gpu'), 1)} | {f(t.get('mfu'), 3)} | "
                     f"{f(t.get('data_wait_share'))} | {f(t.get('cuda_max_allocated_gib'))} | "
                     f"{f(t.get('planned_gib'))} | {f(t.get('simulated_gib'))} |")
    s = res.get("ckpt_stall", {"error": "not run"})
    if "error" not in s:
        lines += ["", f"Async checkpoint stall ({s['trunk']}, a save every {s['every']} of {s['steps']} steps): "
                  f"{s['async_stall_s']:.2f} s vs {s['sync_save_cost_s']:.2f} s for synchronous saves "
                  f"(share {f(s['async_stall_share'])})."]
    if res.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(res["skipped"]) + "."]
    for name, err in res.get("errors", {}).items():
        lines += ["", f"Section {name} failed: {err}"]
    return "\n".join(lines) + "\n"


def save(out: Path, res: dict[str, Any]) -> None:
    """DIR/gpu_check.json and DIR/gpu_check.md, each replaced whole: called after every section."""
    for name, text in (("gpu_check.json", json.dumps(res, indent=1)), ("gpu_check.md", render(res))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def passed(res: dict[str, Any]) -> bool:
    """Exit code 0: no section failed, every run trained, was preempted and resumed as expected."""
    resume, speed = res.get("resume", []), res.get("throughput", [])
    return (not res["errors"] and bool(resume) and bool(speed)
            and all(r["steps_once_each"] and r["preempted"] for r in resume)
            and all(t["exit_code"] == 0 for t in speed))
