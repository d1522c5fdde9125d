"""Files one rank opens and stats when it resumes from a WORLD-rank checkpoint (issue #20).

Lays out the checkpoint with this tree's code (tests/test_checkpoint.py `_lay_out`: DCP's save
steps per rank in one process, rank 0's commit by the checkpointer), 2 kept checkpoints, then
resumes one rank in a subprocess with the code of each tree given and prints the counts.

Usage: python benchmarks/bench_ckpt_opens.py [--world 496] [--rank 7] [--old-tree DIR]
(DIR: e.g. `git archive 53d4e20 seer_pipeline | tar -x -C DIR`, the code before).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r'''
import inspect, os, sys, torch
from pathlib import Path
run, rank, world = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
from seer_pipeline.checkpoint import checkpointer as m
root, opens, stats = str(run), [], []
sys.addaudithook(lambda ev, a: ev == "open" and isinstance(a[0], (str, bytes, os.PathLike))
                 and os.fsdecode(a[0]).startswith(root) and opens.append(a[0]))
real_stat = os.stat
def stat(p, *a, **k):
    if os.fsdecode(p).startswith(root):
        stats.append(p)
    return real_stat(p, *a, **k)
if "cfg" in inspect.signature(m.Checkpointer.__init__).parameters:
    ck = m.Checkpointer(run, m.ckpt_config(every=1), rank=rank, world_size=world)
else:
    ck = m.Checkpointer(run, every=1, rank=rank, world_size=world)
os.stat = stat
got = ck.load_latest(lambda: {"train": {"w": torch.zeros(3), "n": 0}})
print(got[0], len(opens), len(stats))
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=496)
    ap.add_argument("--rank", type=int, default=7)
    ap.add_argument("--old-tree", default="", help="a tree holding seer_pipeline/ to compare")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tests.test_checkpoint import _lay_out

    run = Path(tempfile.mkdtemp()) / "run"
    _lay_out(run, args.world, step=2)
    _lay_out(run, args.world, step=3)
    out = {"world": args.world, "rank": args.rank}
    trees = [("after", str(REPO))] + ([("before", args.old_tree)] if args.old_tree else [])
    for label, tree in trees:
        res = subprocess.run([sys.executable, "-c", _CHILD, str(run), str(args.rank), str(args.world)],
                             env=dict(os.environ, PYTHONPATH=tree), cwd=tempfile.gettempdir(),
                             capture_output=True, text=True, check=True)
        step, opens, stats = map(int, res.stdout.split()[-3:])
        out[label] = {"step": step, "opens": opens, "stats": stats}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
