"""Cost of the checkpoint content hashes (docs/run-folder.md).

`dcp.save` of MB megabytes with DCP's plain FileSystemWriter and with our HashingFileSystemWriter
(best of `--reps`), then the load-time verification. Usage: bench_ckpt_hash.py [MB] [--reps N]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from seer_pipeline.checkpoint import integrity
from seer_pipeline.checkpoint.safe_dcp import HashingFileSystemWriter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mb", type=int, nargs="?", default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # DCP's "no process group" notice
    state = {"w": torch.randn(args.mb * (1 << 20) // 4)}
    runs: dict[str, list[float]] = {"plain": [], "hashing": [], "verify": []}
    for _ in range(args.reps):
        for name, writer in (("plain", FileSystemWriter), ("hashing", HashingFileSystemWriter)):
            d = tempfile.mkdtemp(dir=args.dir)
            t = time.perf_counter()
            dcp.save(state, storage_writer=writer(d), no_dist=True)
            runs[name].append(time.perf_counter() - t)
            if name == "hashing":
                hashes = {f.name: integrity.hash_file(f) for f in Path(d).iterdir() if f.is_file()}
                t = time.perf_counter()
                integrity.verify_hashes(d, {integrity.HASH: hashes})
                runs["verify"].append(time.perf_counter() - t)
            shutil.rmtree(d)
    gb = args.mb / 1024
    for k, v in runs.items():
        print(f"{k:8s} best {min(v):.2f} s ({min(v) / gb:.2f} s/GB), runs {[round(x, 2) for x in v]}")
    print(f"hashing adds {(min(runs['hashing']) - min(runs['plain'])) / gb:.2f} s/GB to a save; "
          f"verifying costs {min(runs['verify']) / gb:.2f} s/GB on load")


if __name__ == "__main__":
    main()
