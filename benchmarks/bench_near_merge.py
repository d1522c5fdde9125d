"""Memory of `seer-shards merge`'s near-duplicate pass (data_prep/near_build.merge_plan).

    python benchmarks/bench_near_merge.py [--samples 200000] [--parts 4] [--repo DIR ...]
    python benchmarks/bench_near_merge.py --groups 10000000 [--repo DIR ...]
    python benchmarks/bench_near_merge.py --part-stage 1000000 [--repo DIR ...]

Plan: writes --parts synthetic part shard sets (10,000 samples a shard, a json with `source`,
`phash`, `orig_width`/`orig_height` and a 64-byte payload: the stored signature is read, no image
is decoded), a tenth of all signatures planted copies 0-3 bits away of signatures in other
parts, then runs the real merge_plan of each --repo checkout (default: this one; give the
repository of an older commit to compare) in a fresh process. Reports the RSS held when the
search starts (what merge_plan keeps per sample: bytes/sample), the peak, wall time, drops and
a digest of the rewritten shards (equal across checkouts).
Groups: only the union-find after the search (near.groups) over --groups images, a hundredth
of them pairs of copies. Part stage: a part's own `--dedup near` grouping (near_build.apply) on
a synthetic build index of --part-stage rows, a tenth exact copies of others: bytes per image
held when the search starts, peak, and a digest of the reasons it records (equal across
checkouts). The last line of output is JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PER_SHARD = 10_000

_PLAN = r"""
import hashlib, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from data_prep import near, near_build
from seer_pipeline.shards import format as fmt

def rss_gib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20

held = {}
search = near.dedup
def timed_dedup(*a, **k):  # the search itself is the same code in every checkout
    held["at_search_gib"] = rss_gib()
    return search(*a, **k)
near.dedup = timed_dedup
parts = json.loads(sys.argv[2])
mans = [(p, fmt.load_manifest(p)) for p in parts]
base = rss_gib()
t = time.time()
plan = near_build.merge_plan(mans, sys.argv[3])
digest = hashlib.sha256(json.dumps(sorted((k.rsplit("/", 1)[1], v["sha256"]) for k, v in plan["replace"].items())).encode())
print(json.dumps({"repo": sys.argv[1], "wall_s": time.time() - t, "base_gib": base, **held,
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "dropped": plan["dropped"], "rewritten": len(plan["replace"]),
                  "digest": digest.hexdigest()[:16]}))
"""

_GROUPS = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from data_prep import near
n = int(sys.argv[2])
edges = [(i, i + 1, 1) for i in range(0, n // 50 * 2, 2)]  # n/100 pairs: a 1% copy rate
t = time.time()
found = near.groups(n, edges)
print(json.dumps({"repo": sys.argv[1], "n": n, "groups": len(found), "wall_s": time.time() - t,
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

_PART = r"""
import hashlib, json, resource, sys, time, types
sys.path.insert(0, sys.argv[1])
from data_prep import near, near_build
from data_prep.index import Index

def rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

idx = Index(sys.argv[2])
n = idx.db.execute("SELECT count(*) FROM items").fetchone()[0]
held = {}
search = near.dedup
def timed_dedup(*a, **k):
    held["at_search"] = rss_bytes()
    return search(*a, **k)
near.dedup = timed_dedup
base = rss_bytes()
t = time.time()
near_build.apply(idx, types.SimpleNamespace(dedup="near", exclude_near=[]))
wall = time.time() - t
rows = idx.db.execute("SELECT items.ordinal, items.reason, near.dup_of FROM items LEFT JOIN near "
                      "USING (ordinal) ORDER BY items.ordinal").fetchall()
print(json.dumps({"repo": sys.argv[1], "wall_s": wall, "held_bytes_per_sample": round((held["at_search"] - base) / n),
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "marked": sum(r[1] is not None for r in rows),
                  "digest": hashlib.sha256(repr([tuple(r) for r in rows]).encode()).hexdigest()[:16]}))
"""


def write_part_index(path: Path, n: int, seed: int = 0) -> None:
    """A build index after its scan: n images with stored signatures, the last tenth copies."""
    sys.path.insert(0, str(REPO))
    from data_prep import near, near_build
    from data_prep.index import Index

    rng = np.random.default_rng(seed)
    sig = rng.integers(0, 256, size=(n, near.PARTS * 8), dtype=np.uint8)
    sig[n - n // 10:] = sig[:n // 10]
    idx = Index(str(path))
    idx.db.execute(near_build.TABLE)
    for s in range(0, n, 100_000):
        rows = range(s, min(n, s + 100_000))
        idx.db.executemany("INSERT INTO items (ordinal, source, orig_width, orig_height) VALUES (?, ?, ?, ?)",
                           [(i, f"/mnt/dump/cam{i % 97:02d}/img_{i:010d}.jpg", 640, 480) for i in rows])
        idx.db.executemany("INSERT INTO near (ordinal, sig) VALUES (?, ?)", [(i, sig[i].tobytes().hex()) for i in rows])
    idx.commit()
    idx.close()


def write_parts(root: Path, samples: int, parts: int, seed: int = 0) -> list[str]:
    """Synthetic `--dedup near` parts: what merge_plan reads, nothing it does not."""
    sys.path.insert(0, str(REPO))
    from data_prep import near
    from seer_pipeline.shards import format as fmt

    rng = np.random.default_rng(seed)
    width = near.PARTS * 8
    sig = rng.integers(0, 256, size=(samples, width), dtype=np.uint8)
    k = samples // 10  # the last tenth copies the first tenth (other parts: parts are contiguous)
    sig[samples - k:] = sig[:k]
    for b in range(3):
        sel = np.nonzero(rng.integers(0, 4, size=k) > b)[0]
        bit = rng.integers(0, width * 8, size=len(sel))
        sig[samples - k + sel, bit // 8] ^= (1 << (bit % 8)).astype(np.uint8)
    out, per_part = [], -(-samples // parts)
    for p in range(parts):
        d = root / f"part{p}"
        d.mkdir(parents=True)
        lo, hi = p * per_part, min(samples, (p + 1) * per_part)
        shards = []
        for s0 in range(lo, hi, PER_SHARD):
            rows = range(s0, min(hi, s0 + PER_SHARD))
            name = f"shard-{len(shards):06d}.tar"
            count, nbytes, sha = fmt.write_shard(str(d / name), (
                (f"{i:010d}", bytes(64), json.dumps({
                    "source": f"/dump/cam{i % 97:02d}/img_{i:010d}.jpg", "phash": sig[i].tobytes().hex(),
                    "orig_width": 640 + i % 7, "orig_height": 480}).encode()) for i in rows))
            shards.append({"name": name, "count": count, "bytes": nbytes, "sha256": sha})
        (d / "manifest.json").write_text(json.dumps({"shards": shards}))
        out.append(str(d))
    return out


def run(script: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    return json.loads(p.stdout.splitlines()[-1]) if p.returncode == 0 else {"args": args, "error": p.stderr[-800:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--groups", type=int, default=0, help="only time near.groups over this many images")
    ap.add_argument("--part-stage", type=int, default=0, help="only a part's grouping stage over this many images")
    ap.add_argument("--repo", action="append", default=[], help="checkouts to compare (default: this one)")
    a = ap.parse_args()
    repos = a.repo or [str(REPO)]
    if a.groups:
        res = [run(_GROUPS, r, str(a.groups)) for r in repos]
        for r in res:
            print("groups:", r, flush=True)
        print(json.dumps({"groups": res}))
        return
    if a.part_stage:
        with tempfile.TemporaryDirectory() as td:
            write_part_index(Path(td) / "base.db", a.part_stage)
            res = []
            for i, r in enumerate(repos):
                shutil.copy(Path(td) / "base.db", Path(td) / f"index{i}.db")  # apply writes its marks
                res.append(run(_PART, r, str(Path(td) / f"index{i}.db")))
                print("part stage:", res[-1], flush=True)
        print(json.dumps({"part_stage": a.part_stage, "runs": res}))
        return
    with tempfile.TemporaryDirectory() as td:
        parts = write_parts(Path(td), a.samples, a.parts)
        res = []
        for i, r in enumerate(repos):
            state = Path(td) / f"state{i}"
            state.mkdir()
            res.append(run(_PLAN, r, json.dumps(parts), str(state)))
            got = res[-1]
            if "at_search_gib" in got:
                got["held_bytes_per_sample"] = round((got["at_search_gib"] - got["base_gib"]) * 2**30 / a.samples)
            print("plan:", got, flush=True)
    print(json.dumps({"samples": a.samples, "parts": a.parts, "plan": res}))


if __name__ == "__main__":
    main()
