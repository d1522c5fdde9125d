"""Near-duplicate detection (data_prep.near) against imagededup's hashes, and at 10^7 scale.

    python benchmarks/bench_near_dup.py [--photos DIR ...] [--imagededup-python PATH]
                                        [--scale 10000000] [--build-repeats 3]

Seeds: the test photos (tests/data/photos, from Debian packages: ATTRIBUTION.tsv), plus
../shared/photos or any --photos folder when given. Each seed gets the issue's transforms
(resize 0.25-2x, JPEG quality 30-95, PNG/WebP round trips, border crops, greyscale); recall is
the share of (seed, copy) pairs found. Distractors: the seeds and the four quadrant tiles of
each (different content, same camera and scene: harder than unrelated photos); a
false-positive pair is two distinct pictures matched (a tile and its own parent are neither).

imagededup (PHash, DHash, WHash, AHash at its default max_distance_threshold=10) runs in its
own virtualenv (--imagededup-python), because its package pulls torch; its CNN module is
stubbed out there, the hashing code is imagededup's own. Throughput is one process (per core).

Build cost: CPU time of `seer-shards build --resize-short-side 256` with --dedup exact and
--dedup near on the same inputs (median of --build-repeats, interleaved).
Merge: --merge-scale N times only merge's near pass (near.dedup over N synthetic signatures, a
tenth of them planted copies) at each --merge-workers, each in a fresh process: wall, CPU of the
process tree, peak RSS, and a digest of the drop map (identical at every worker count).
Scale: --scale synthetic whole-image hashes (uniform random) indexed by data_prep.near's index
in a child process, queried with --scale-queries planted copies 0-3 bits away: index time,
per-query time, peak RSS, planted copies found; a full grouping (PARTS queries per image) is
projected from the per-query time.
The last line of output is JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from data_prep import near  # noqa: E402

EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def transforms() -> dict[str, Callable[[Image.Image, Path], Path]]:
    t: dict[str, Callable[[Image.Image, Path], Path]] = {}
    for s in (0.25, 0.5, 1.5, 2.0):
        t[f"resize {s}x"] = lambda im, p, s=s: _save(
            im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.BICUBIC), p.with_suffix(".jpg"), quality=90)
    for q in (30, 50, 75, 95):
        t[f"jpeg q{q}"] = lambda im, p, q=q: _save(im, p.with_suffix(".jpg"), quality=q)
    t["png"] = lambda im, p: _save(im, p.with_suffix(".png"))
    t["webp q80"] = lambda im, p: _save(im, p.with_suffix(".webp"), quality=80)
    for c in (0.02, 0.03, 0.05):  # c cut from every border, then from the top and left only
        t[f"crop {c:.0%} each border"] = lambda im, p, c=c: _save(im.crop(
            (round(im.width * c), round(im.height * c), im.width - round(im.width * c), im.height - round(im.height * c))),
            p.with_suffix(".jpg"), quality=90)
        t[f"crop {c:.0%} top+left"] = lambda im, p, c=c: _save(im.crop(
            (round(im.width * c), round(im.height * c), im.width, im.height)), p.with_suffix(".jpg"), quality=90)
    t["greyscale"] = lambda im, p: _save(im.convert("L"), p.with_suffix(".jpg"), quality=90)
    return t


def make_set(seeds: list[Path], d: Path) -> tuple[list[Path], list[tuple[int, int, str]], list[Path], set]:
    """Files, positive (seed, copy, transform) index pairs, distractor files, pairs to ignore."""
    files: list[Path] = []
    pos: list[tuple[int, int, str]] = []
    for k, s in enumerate(seeds):
        im = Image.open(s).convert("RGB")
        si = len(files)
        files.append(_save(im, d / f"s{k:04d}_orig.png"))
        for n, (name, fn) in enumerate(transforms().items()):
            files.append(fn(im, d / f"s{k:04d}_t{n:02d}"))
            pos.append((si, len(files) - 1, name))
    distract: list[Path] = []
    parent: dict[int, int] = {}
    for k, s in enumerate(seeds):
        im = Image.open(s).convert("RGB")
        parent[len(distract)] = -1
        pk = len(distract)
        distract.append(files[k * (1 + len(transforms()))])
        w, h = im.size
        for q, box in enumerate([(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]):
            parent[len(distract)] = pk
            distract.append(_save(im.crop(box), d / f"d{k:04d}_q{q}.jpg", quality=90))
    ignore = {(min(a, b), max(a, b)) for a, b in parent.items() if b >= 0}
    return files, pos, distract, ignore


_IDD = r"""
import json, sys, time, types
for name, attr in {"imagededup.methods.cnn": "CNN", "imagededup.utils.models": "CustomModel",
                   "imagededup.utils.plotter": "plot_duplicates", "imagededup.utils.data_generator": "img_dataloader"}.items():
    m = types.ModuleType(name); setattr(m, attr, None); sys.modules[name] = m  # torch-only parts
from imagededup.methods import AHash, DHash, PHash, WHash
files = json.load(sys.stdin)
out = {}
for cls in (PHash, DHash, WHash, AHash):
    h = cls(verbose=False); t = time.process_time()
    codes = [h.encode_image(image_file=f) for f in files]
    out[cls.__name__] = {"codes": codes, "cpu_s": time.process_time() - t}
print(json.dumps(out))
"""


def ours(files: list[Path]) -> tuple[list[Optional[str]], float]:
    t = time.process_time()
    sigs = [near.signature_of_bytes(f.read_bytes()) for f in files]
    return sigs, time.process_time() - t


def match_ours(sigs: list[str], pairs: list[tuple[int, int]]) -> list[bool]:
    found = {(i, j) for i, j, _ in near.pairs(sigs)}
    return [(min(a, b), max(a, b)) in found for a, b in pairs]


def match_ours_scale(sigs: list[str], pairs: list[tuple[int, int]]) -> list[bool]:
    flat, brute = near.FLAT_MAX, near.BRUTE_MAX
    near.FLAT_MAX = near.BRUTE_MAX = 0
    try:
        return match_ours(sigs, pairs)
    finally:
        near.FLAT_MAX, near.BRUTE_MAX = flat, brute


def match_hash(codes: list[str], pairs: list[tuple[int, int]], thr: int = 10) -> list[bool]:
    return [bin(int(codes[a], 16) ^ int(codes[b], 16)).count("1") <= thr for a, b in pairs]


def build_set(seeds: list[Path], d: Path, n: int, long_side: int = 0) -> Path:
    """n distinct pictures for the build timing: random 40-80% crops of the seeds, JPEG q90;
    with `long_side`, each crop upscaled to it (photo-sized inputs: the build's own work grows
    with the input, the signature's does not)."""
    import random

    rnd = random.Random(0)
    d.mkdir()
    ims = [Image.open(s).convert("RGB") for s in seeds]
    for k in range(n):
        im = ims[k % len(ims)]
        fw, fh = rnd.uniform(0.4, 0.8), rnd.uniform(0.4, 0.8)
        x, y = rnd.uniform(0, 1 - fw), rnd.uniform(0, 1 - fh)
        box = (round(x * im.width), round(y * im.height), round((x + fw) * im.width), round((y + fh) * im.height))
        c = im.crop(box)
        if long_side:
            f = long_side / max(c.size)
            c = c.resize((round(c.width * f), round(c.height * f)), Image.BICUBIC)
        c.save(d / f"b{k:06d}.jpg", quality=90)
    return d


def build_cpu(inputs: Path, out: Path, dedup: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "data_prep.cli", "--log-level", "WARNING", "build", str(inputs),
                    "--out", str(out), "--resize-short-side", "256", "--dedup", dedup, "--no-progress"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


_SCALE = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[2])
from data_prep import near
n, nq = int(sys.argv[1]), int(sys.argv[3]); rng = np.random.default_rng(0)
full = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)  # whole-image hashes, uniform
q = full[:nq].copy()  # queries: planted copies 0-3 bits away from indexed codes
flips = rng.integers(0, 4, size=nq)
for b in range(3):
    sel = np.nonzero(flips > b)[0]
    bit = rng.integers(0, 64, size=len(sel))
    q[sel, bit // 8] ^= (1 << (bit % 8)).astype(np.uint8)
t = time.time(); idx = near._index(full); t_add = time.time() - t
rss_add = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t = time.time(); r, j, d = near._search(idx, q, near.THRESHOLD); t_q = time.time() - t
hit = int(np.sum(r == j))  # query i is a copy of code i
print(json.dumps({"n": n, "index": type(idx).__name__, "add_s": t_add, "queries": nq, "query_s": t_q,
                  "query_ms_each": 1e3 * t_q / nq, "planted_found": hit, "other_hits": int(len(r)) - hit,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss_after_add_gib": rss_add,
                  "projected_group_s": t_add + t_q / nq * n * near.PARTS}))
"""


_MERGE = r"""
import hashlib, json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[2])
from data_prep import near
n, workers = int(sys.argv[1]), int(sys.argv[3]); rng = np.random.default_rng(0)
sig = rng.integers(0, 256, size=(n, near.PARTS * 8), dtype=np.uint8)  # uniform random signatures
k = n // 10  # the last tenth: copies of the first tenth, 0-3 bits flipped in each hash
sig[n - k:] = sig[:k]
for b in range(3):
    sel = np.nonzero(rng.integers(0, 4, size=k) > b)[0]
    bit = rng.integers(0, near.PARTS * 64, size=len(sel))
    sig[n - k + sel, bit // 8] ^= (1 << (bit % 8)).astype(np.uint8)
sigs = [r.tobytes().hex() for r in sig]
px = [1] * n; src = [f"{i:09d}" for i in range(n)]
t, c = time.time(), time.process_time()
drop = near.dedup(sigs, px, src, workers)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"n": n, "workers": workers, "wall_s": time.time() - t,
                  "cpu_s": time.process_time() - c + ru.ru_utime + ru.ru_stime, "dropped": len(drop),
                  "planted": k, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "worker_peak_rss_gib": ru.ru_maxrss / 2**20,
                  "drop_sha1": hashlib.sha1(json.dumps(sorted(drop.items())).encode()).hexdigest()}))
"""


def merge_scale(n: int, workers: list[int]) -> list[dict]:
    """merge's near pass (near.dedup) on n synthetic signatures at each worker count, each in a
    fresh process; the drop maps must be identical (drop_sha1)."""
    out = []
    for w in workers:
        p = subprocess.run([sys.executable, "-c", _MERGE, str(n), str(REPO), str(w)], capture_output=True, text=True)
        out.append(json.loads(p.stdout.splitlines()[-1]) if p.returncode == 0 else {"n": n, "workers": w,
                                                                                     "error": p.stderr[-500:]})
        print("merge scale:", out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", action="append", default=[])
    ap.add_argument("--imagededup-python", default=None)
    ap.add_argument("--scale", type=int, default=0, help="synthetic signatures to group (0: skip)")
    ap.add_argument("--scale-queries", type=int, default=100000, help="sampled queries at --scale (timed, projected)")
    ap.add_argument("--build-repeats", type=int, default=3)
    ap.add_argument("--build-n", type=int, default=1000, help="inputs of the build timing")
    ap.add_argument("--build-long-side", type=int, default=0, help="upscale the build inputs to this long side (0: as cropped)")
    ap.add_argument("--merge-scale", type=int, default=0,
                    help="only time merge's near pass on this many synthetic signatures (0: the full benchmark)")
    ap.add_argument("--merge-workers", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    if a.merge_scale:
        print(json.dumps({"merge_scale": merge_scale(a.merge_scale, a.merge_workers)}))
        return
    dirs = [REPO / "tests" / "data" / "photos", *map(Path, a.photos)]
    if (REPO.parent / "shared" / "photos").is_dir():
        dirs.append(REPO.parent / "shared" / "photos")
    seeds = sorted({p for d in dirs for p in d.rglob("*") if p.suffix.lower() in EXTS})
    res: dict = {"seeds": len(seeds), "threshold_ours": near.THRESHOLD, "threshold_imagededup": 10}
    with tempfile.TemporaryDirectory() as td:
        d = Path(td) / "set"
        d.mkdir()
        files, pos, distract, ignore = make_set(seeds, d)
        neg = [(a, b) for a, b in itertools.combinations(range(len(distract)), 2) if (a, b) not in ignore]
        res.update(images=len(files), distractors=len(distract), distractor_pairs=len(neg))
        methods: dict[str, tuple[Callable, list, float]] = {}
        sigs, cpu = ours(files)
        dsigs, _ = ours(distract)
        methods["ours (pHash x6)"] = (match_ours, [sigs, dsigs], cpu)
        # the same signatures through the index used above near.FLAT_MAX images (two 32-bit halves)
        methods["ours, scale index"] = (match_ours_scale, [sigs, dsigs], cpu)
        if a.imagededup_python:
            allf = [str(f) for f in files] + [str(f) for f in distract]
            p = subprocess.run([a.imagededup_python, "-c", _IDD], input=json.dumps(allf), text=True,
                               capture_output=True, check=True)
            for name, r in json.loads(p.stdout.splitlines()[-1]).items():
                c = r["codes"]
                methods[f"imagededup {name}"] = (match_hash, [c[:len(files)], c[len(files):]], r["cpu_s"] * len(files) / len(allf))
        table = {}
        names = list(transforms())
        for m, (fn, (fs, ds), cpu_s) in methods.items():
            hits = fn(fs, [(i, j) for i, j, _ in pos])
            rec = {t: statistics.mean(h for h, (_, _, tn) in zip(hits, pos) if tn == t) for t in names}
            fp = sum(fn(ds, neg))
            table[m] = {"recall": rec, "false_positive_pairs": fp, "images_per_s_per_core": len(files) / cpu_s}
        res["methods"] = table
        print(f"{len(seeds)} seeds x {len(names)} transforms = {len(pos)} copies; {len(distract)} distractors "
              f"({len(neg)} pairs)")
        print("| transform | " + " | ".join(table) + " |")
        print("|---|" + "---|" * len(table))
        for t in names:
            print(f"| {t} | " + " | ".join(f"{table[m]['recall'][t]:.2f}" for m in table) + " |")
        print("| false-positive pairs | " + " | ".join(str(table[m]["false_positive_pairs"]) for m in table) + " |")
        print("| images/s per core | " + " | ".join(f"{table[m]['images_per_s_per_core']:.0f}" for m in table) + " |")
        bd = build_set(seeds, Path(td) / "build", a.build_n, a.build_long_side)
        cpu_b: dict[str, list[float]] = {"exact": [], "near": []}
        for r in range(a.build_repeats):
            for mode in (("exact", "near") if r % 2 == 0 else ("near", "exact")):
                cpu_b[mode].append(build_cpu(bd, Path(td) / f"o-{mode}-{r}", mode))
        ex, ne = statistics.median(cpu_b["exact"]), statistics.median(cpu_b["near"])
        dropped = json.loads((Path(td) / "o-near-0" / "manifest.json").read_text())["reasons"].get("near_duplicate", 0)
        res["build_cpu_s"] = {"exact": ex, "near": ne, "near_over_exact": ne / ex, "inputs": a.build_n,
                              "near_dropped": dropped, "runs": cpu_b}
        print(f"build --resize-short-side 256 on {a.build_n} inputs: CPU {ex:.2f} s exact, {ne:.2f} s near "
              f"(+{100 * (ne / ex - 1):.0f}%; near dropped {dropped})")
    if a.scale:
        p = subprocess.run([sys.executable, "-c", _SCALE, str(a.scale), str(REPO), str(a.scale_queries)],
                           capture_output=True, text=True)
        if p.returncode:
            res["scale"] = {"n": a.scale, "error": p.stderr[-500:]}
        else:
            res["scale"] = json.loads(p.stdout.splitlines()[-1])
        print("scale:", res["scale"])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
