"""What one `--part I/N` costs against the whole build, on a dump that arrives as tar archives.

    python benchmarks/bench_shards_parts.py [--n 1000000] [--tars 100] [--parts 16] [--workers 2]

Writes --n tiny distinct JPEGs (16x16 pixels, a few hundred bytes; copy k carries a COM segment
"k" after SOI, so no two are byte-identical and dedup finds nothing) into --tars archives in a
temp folder, then times `seer-shards build DUMP` whole and with `--part 0/N` (--workers each,
pass-through, default --check full), alternating whole and part runs --repeats times and keeping
the medians, with the 1-minute load average beside each run. Wall time and CPU time (user + sys
of the build and its workers) are both reported: on a shared, loaded box the wall clock follows
the other tenants, the CPU time follows the work. Target (issue #22): part 0/16 at most
0.1 of the whole build; the part assignment before that change cost 0.24 (27 s of 112 s, 2
workers, this machine). The last line of output is JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _jpegs(kinds: int = 16) -> list[bytes]:
    from PIL import Image

    out = []
    for k in range(kinds):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (k * 15 % 256, 90, 255 - k * 9 % 256)).save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def write_dump(dest: Path, n: int, tars: int) -> int:
    """n distinct JPEGs in `tars` archives; returns the dump's size in bytes."""
    base = _jpegs()
    per = -(-n // tars)
    k = 0
    for t in range(tars):
        with tarfile.open(dest / f"{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(min(per, n - k)):
                tag = str(k).encode()
                b = base[k % len(base)]
                data = b[:2] + b"\xff\xfe" + (len(tag) + 2).to_bytes(2, "big") + tag + b[2:]
                ti = tarfile.TarInfo(f"{k // 1000:05d}/{k:08d}.jpg")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                k += 1
    return sum(p.stat().st_size for p in dest.iterdir())


def timed_build(dump: Path, out: Path, workers: int, part: str | None) -> tuple[float, float]:
    """(wall s, CPU s of the build and its workers)."""
    cmd = [sys.executable, "-m", "data_prep.cli", "--log-level", "WARNING", "build", str(dump),
           "--out", str(out), "--workers", str(workers), "--no-progress"]
    if part:
        cmd += ["--part", part]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t, c = time.perf_counter(), _child_cpu()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    dt, dc = time.perf_counter() - t, _child_cpu() - c
    shutil.rmtree(out)
    return dt, dc


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--tars", type=int, default=100)
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tmp", default=None, help="where the dump and outputs go (default $TMPDIR)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-parts-", dir=a.tmp))
    try:
        dump = root / "dump"
        dump.mkdir()
        t = time.perf_counter()
        size = write_dump(dump, a.n, a.tars)
        print(f"dump: {a.n} JPEGs in {a.tars} tars, {size / 1e6:.0f} MB, written in {time.perf_counter() - t:.0f} s")
        whole, part, whole_cpu, part_cpu = [], [], [], []
        for r in range(a.repeats):
            for name, p, acc, cpu in (("whole", None, whole, whole_cpu),
                                      (f"part 0/{a.parts}", f"0/{a.parts}", part, part_cpu)):
                load = os.getloadavg()[0]
                wall, c = timed_build(dump, root / "out", a.workers, p)
                acc.append(wall)
                cpu.append(c)
                print(f"repeat {r}: {name}: {wall:.1f} s wall, {c:.1f} s CPU (load {load:.1f})", flush=True)
        res = {"n": a.n, "tars": a.tars, "parts": a.parts, "workers": a.workers,
               "whole_s": statistics.median(whole), "part0_s": statistics.median(part),
               "whole_cpu_s": statistics.median(whole_cpu), "part0_cpu_s": statistics.median(part_cpu)}
        res["ratio"] = res["part0_s"] / res["whole_s"]
        res["cpu_ratio"] = res["part0_cpu_s"] / res["whole_cpu_s"]
        print(f"part 0/{a.parts} / whole = {res['part0_s']:.1f} / {res['whole_s']:.1f} s wall = {res['ratio']:.3f}, "
              f"{res['part0_cpu_s']:.1f} / {res['whole_cpu_s']:.1f} s CPU = {res['cpu_ratio']:.3f} "
              f"(target <= 0.1; ideal {1 / a.parts:.3f}; part 0 holds {len(range(0, a.tars, a.parts))} of {a.tars} archives)")
        print(json.dumps(res))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
