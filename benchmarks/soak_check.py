#!/usr/bin/env python3
"""The chaos soak's comparisons between the faulted run and the uninterrupted reference.

- losses: metrics.jsonl holds steps 1..N exactly once (a resume drops the lines past its
  checkpoint, so each step's line is its last execution) and every loss equals the reference's;
- final state: every model and optimizer tensor of the final checkpoints, bitwise (torch.equal);
- samples: RUN/samples/rank{r}.jsonl (train.record_samples) taken at each step's last execution:
  each complete epoch consumed every sample of the manifest exactly once, a partial last epoch
  none twice, and each rank's ids per step equal the reference's;
- the run folder: no `.partial` folder, RUN/.lock not held.
Wall time lost per fault comes from the same sample logs (their `time` field).

    python benchmarks/soak_check.py CHAOS_RUN REFERENCE_RUN    # one JSON line
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import torch  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402

from seer_pipeline.checkpoint import safe_dcp  # noqa: E402
from seer_pipeline.checkpoint.integrity import read_latest  # noqa: E402
from seer_pipeline.core import runlock  # noqa: E402
from seer_pipeline.train.metrics import read_metrics  # noqa: E402


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """Objects of a JSON-lines file; a torn line (a kill -9 mid-write) is skipped."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def compare_losses(run: Path, ref: Path) -> Dict[str, Any]:
    rows, want = read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    ref_loss = {r["step"]: r["loss"] for r in want}
    once = steps == list(range(1, len(want) + 1)) and len(want) > 0
    diff = [r["step"] for r in rows if ref_loss.get(r["step"]) != r["loss"]]
    return {"steps": len(steps), "steps_once": once, "loss_equal": once and not diff,
            "first_loss_diff": diff[0] if diff else None}


def _tensors(step_dir: Path) -> Dict[str, torch.Tensor]:
    """Every model.* and optim.* tensor of a checkpoint, read through the safe DCP reader."""
    md = safe_dcp.SafeFileSystemReader(step_dir).read_metadata()
    want = {k: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and k.split(".", 1)[0] in ("model", "optim")}
    safe_dcp.load(want, step_dir, no_dist=True)
    return want


def compare_state(run: Path, ref: Path) -> Dict[str, Any]:
    a_name, b_name = read_latest(run / "checkpoints"), read_latest(ref / "checkpoints")
    if not a_name or a_name != b_name:
        return {"state_equal": False, "why": f"latest {a_name!r} vs reference {b_name!r}"}
    a, b = _tensors(run / "checkpoints" / a_name), _tensors(ref / "checkpoints" / b_name)
    bad = sorted(k for k in set(a) | set(b) if k not in a or k not in b or a[k].dtype != b[k].dtype
                 or not torch.equal(a[k], b[k]))
    return {"state_equal": not bad and bool(a), "checkpoint": a_name, "tensors": len(a),
            "tensors_differ": bad[:5]}


def final_samples(run: Path) -> Dict[int, Dict[int, Dict[str, Any]]]:
    """rank -> step -> the last execution's record."""
    out: Dict[int, Dict[int, Dict[str, Any]]] = {}
    for p in sorted((run / "samples").glob("rank*.jsonl")):
        rank = int(p.stem[4:])
        out[rank] = {}
        for rec in read_jsonl(p):
            out[rank][rec["step"]] = rec
    return out


def check_samples(run: Path, ref: Path, n_samples: int, steps: int) -> Dict[str, Any]:
    got, want = final_samples(run), final_samples(ref)
    problems: List[str] = []
    if not got or any(sorted(got[r]) != list(range(1, steps + 1)) for r in got):
        problems.append("a rank's sample log misses steps")
    epochs: Dict[int, List[int]] = defaultdict(list)
    for r in got:
        for s, rec in got[r].items():
            epochs[rec["epoch"]].extend(rec["uids"])
            if want.get(r, {}).get(s, {}).get("uids") != rec["uids"]:
                problems.append(f"rank {r} step {s}: ids differ from the reference")
    complete = 0
    for e, uids in sorted(epochs.items()):
        if len(uids) != len(set(uids)):
            problems.append(f"epoch {e}: a sample consumed twice")
        if len(uids) == n_samples:
            complete += 1
            if sorted(uids) != list(range(n_samples)):
                problems.append(f"epoch {e}: not every sample of the manifest")
        elif e != max(epochs):
            problems.append(f"epoch {e}: {len(uids)} of {n_samples} samples")
    return {"samples_once": not problems, "epochs_complete": complete, "problems": problems[:5]}


def folder_checks(run: Path) -> Dict[str, Any]:
    return {"partial_left": len(list((run / "checkpoints").glob("*.partial"))),
            "lock_held": runlock.is_locked(run)}


def executions(run: Path, rank: int = 0) -> List[Tuple[float, int]]:
    """(time, step) of every step rank `rank` executed, in order (repeats included)."""
    return [(rec["time"], rec["step"]) for rec in read_jsonl(run / "samples" / f"rank{rank}.jsonl")]


def time_lost(execs: List[Tuple[float, int]], t0: float, t1: float,
              t_rec: Optional[float]) -> Dict[str, Any]:
    """What a fault injected at t0 (its injector returned at t1) cost.

    With a restart (t_rec: when SLURM showed the requeue or the soak resubmitted): from t0 until
    the run executed the step after the last one it reached before t_rec, less one median step;
    split into the restart (t0 to the new execution's first step) and the steps it redid from
    its checkpoint. Without (the job kept running): the steps executed between t0 and t1 + 5 s,
    each counted for what it took over the median step time.
    """
    if len(execs) < 2:
        return {"lost_s": None}
    dts = [b[0] - a[0] for a, b in zip(execs, execs[1:]) if b[1] == a[1] + 1]
    med = statistics.median(dts) if dts else 0.0
    if t_rec is None:
        slow = [b[0] - a[0] - med for a, b in zip(execs, execs[1:])
                if t0 <= b[0] <= t1 + 5 and b[1] == a[1] + 1]
        return {"lost_s": round(sum(max(0.0, x) for x in slow), 2), "restart_s": 0.0, "redone_steps": 0}
    reached = max([s for t, s in execs if t <= t_rec], default=0)
    after = [(t, s) for t, s in execs if t > t_rec]
    if not after:
        return {"lost_s": None}
    back = next((t for t, s in after if s == reached + 1), None)
    return {"lost_s": None if back is None else round(back - t0 - med, 2),
            "restart_s": round(after[0][0] - t0, 2), "redone_steps": max(0, reached - after[0][1] + 1)}


def lost_by_kind(run: Path, faults: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per fault kind: count, mean restart seconds and redone steps, mean and total time lost."""
    execs = executions(run)
    rows: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for f in faults:
        rows[f["kind"]].append(time_lost(execs, f["t0"], f["t1"], f.get("t_recovered")))
    table = []
    for kind, costs in sorted(rows.items()):
        lost = [c["lost_s"] for c in costs if c.get("lost_s") is not None]
        table.append({"kind": kind, "n": len(costs),
                      "restart_s": round(sum(c.get("restart_s", 0) for c in costs) / len(costs), 1),
                      "redone_steps": round(sum(c.get("redone_steps", 0) for c in costs) / len(costs), 1),
                      "lost_s_mean": round(sum(lost) / len(lost), 1) if lost else None,
                      "lost_s_total": round(sum(lost), 1)})
    return table


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--samples", type=int, required=True, help="samples in the shard manifest")
    a = ap.parse_args(argv)
    losses = compare_losses(a.run, a.reference)
    out = {**losses, **compare_state(a.run, a.reference),
           **check_samples(a.run, a.reference, a.samples, losses["steps"]), **folder_checks(a.run)}
    print(json.dumps(out))
    return 0 if out["loss_equal"] and out["state_equal"] and out["samples_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
