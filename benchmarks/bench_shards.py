"""Throughput of `seer-shards build` against a plain baseline, img2dataset and `tar cf`.

    python benchmarks/bench_shards.py PHOTO_DIR [--repeats 3]

Everything runs in this process tree on the same files and settings (--resize-short-side 256).
Runs are interleaved (each repeat runs every contender once) and the median is kept, so
background load hits all contenders alike. The last line of output is JSON.

Targets (issue 2): seer-shards >= 1.5x baseline at --workers 1, >= 2.5x at --workers 2,
>= 2x img2dataset at 2 processes; pass-through (JPEG in, no resize, --check header,
--workers 2) >= 80% of `tar cf` over the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
SHORT = 256
EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def images(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in EXTS)


CPU: dict[str, list[float]] = {}  # CPU seconds per run: a load-robust view on a shared machine


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def seer_shards(inputs: list[str], out: Path, *args: str) -> float:
    """Wall time of the whole command, interpreter start included (that is what users wait for)."""
    t, c = time.perf_counter(), _child_cpu()
    subprocess.run([sys.executable, "-m", "data_prep.cli", "--log-level", "WARNING", "build", *inputs,
                    "--out", str(out), "--no-progress", *args], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    CPU.setdefault(out.name, []).append(_child_cpu() - c)
    return time.perf_counter() - t


_BASELINE = r"""
import sys, time, io, glob
from PIL import Image
import webdataset as wds
files, out, short = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
t, c = time.perf_counter(), time.process_time()
with wds.ShardWriter(out + "/base-%06d.tar", maxcount=10000, verbose=0) as sink:
    for i, f in enumerate(files):
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = short / min(w, h)
        if s < 1:
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        sink.write({"__key__": "%09d" % i, "jpg": buf.getvalue()})
print(time.process_time() - c, time.perf_counter() - t)
"""


def baseline(files: list[str], out: Path) -> float:
    """One process, the obvious loop; import time (webdataset pulls torch) is not counted."""
    r = subprocess.run([sys.executable, "-c", _BASELINE, *files, str(out), str(SHORT)], check=True,
                       capture_output=True, text=True, cwd=REPO)
    cpu, wall = map(float, r.stdout.strip().splitlines()[-1].split())
    CPU.setdefault(out.name, []).append(cpu)
    return wall


def img2dataset_run(listfile: Path, out: Path) -> Optional[float]:
    try:
        import img2dataset  # noqa: F401
    except ImportError:
        return None
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "img2dataset", "--url_list", str(listfile), "--output_folder", str(out),
                    "--output_format", "webdataset", "--resize_mode", "keep_ratio", "--image_size", str(SHORT),
                    "--processes_count", "2", "--thread_count", "4", "--disable_all_reencoding", "False"],
                   check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - t


def tar_cf(listfile: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["tar", "cf", str(out / "all.tar"), "-P", "-T", str(listfile)], check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("photo_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    files = images(args.photo_dir)
    jpegs = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg")]
    if not files:
        sys.exit(f"no images under {args.photo_dir}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    for f in files:  # warm the page cache: every contender reads from memory
        f.read_bytes()
    all_list, jpg_list, url_list = tmp / "all.txt", tmp / "jpg.txt", tmp / "urls.txt"
    all_list.write_text("".join(f"{f}\n" for f in files))
    jpg_list.write_text("".join(f"{f}\n" for f in jpegs))
    url_list.write_text("".join(f"file://{f.resolve()}\n" for f in files))
    runs: dict[str, Callable[[Path], Optional[float]]] = {
        "baseline": lambda o: baseline([str(f) for f in files], o),
        "seer_w1": lambda o: seer_shards([str(all_list)], o, "--resize-short-side", str(SHORT), "--workers", "1"),
        "seer_w2": lambda o: seer_shards([str(all_list)], o, "--resize-short-side", str(SHORT), "--workers", "2"),
        "img2dataset": lambda o: img2dataset_run(url_list, o),
        "tar_cf": lambda o: tar_cf(jpg_list, o),
        "pass_header_w2": lambda o: seer_shards([str(jpg_list)], o, "--check", "header", "--workers", "2"),
        "pass_full_w2": lambda o: seer_shards([str(jpg_list)], o, "--workers", "2"),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    counts: dict[str, int] = {}
    try:
        for _ in range(args.repeats):
            for name, fn in runs.items():
                out = tmp / name
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                t = fn(out)
                if t is None:
                    continue
                times[name].append(t)
                man = out / "manifest.json"
                if man.exists():
                    counts[name] = json.loads(man.read_text())["written"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_all, n_jpg = len(files), len(jpegs)
    ips: dict[str, Optional[float]] = {}
    for name, ts in times.items():
        n = n_jpg if name in ("tar_cf", "pass_header_w2", "pass_full_w2") else n_all
        ips[name] = round(n / statistics.median(ts), 1) if ts else None
        print(f"{name:16s} {('%.1f img/s' % ips[name]) if ts else 'not installed':>16s}"
              f"  {'median of %d' % len(ts) if ts else ''}")

    def ratio(a: str, b: str) -> Optional[float]:
        return round(ips[a] / ips[b], 2) if ips.get(a) and ips.get(b) else None

    # Images per CPU-second: what the same code would do per core on a quiet machine.
    cpu_ips = {k: round((n_jpg if k.startswith("pass") else n_all) / statistics.median(v), 1)
               for k, v in CPU.items() if v}
    print("images per CPU-second:", cpu_ips)

    result = {
        "images": n_all, "jpegs": n_jpg, "written": counts, "images_per_s": ips, "cpus": os.cpu_count(),
        "ratio_w1_vs_baseline": ratio("seer_w1", "baseline"),
        "ratio_w2_vs_baseline": ratio("seer_w2", "baseline"),
        "ratio_w2_vs_img2dataset": ratio("seer_w2", "img2dataset"),
        "img2dataset": "ran" if ips.get("img2dataset") else "not installed",
        "passthrough_header_vs_tar": ratio("pass_header_w2", "tar_cf"),
        "passthrough_full_vs_tar": ratio("pass_full_w2", "tar_cf"),
        "images_per_cpu_s": cpu_ips,
        "cpu_ratio_w1_vs_baseline": round(cpu_ips["seer_w1"] / cpu_ips["baseline"], 2),
        "cpu_ratio_w2_vs_baseline": round(cpu_ips["seer_w2"] / cpu_ips["baseline"], 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
