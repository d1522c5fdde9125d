#!/usr/bin/env python3
"""Object-store benchmark: shards in S3 (a local SeaweedFS) against the same shards on local disk.

1. Loader samples/s over one epoch (`build_loader`, --workers DataLoader workers, swav crops) on
   the same shards: local folder, s3:// direct, s3:// through the fault proxy with no faults, and
   with every --fail-every-th GET cut mid-body (1% by default). Every s3 run must deliver the same
   sample ids in the same order as the local run (zero lost, zero repeated): checked, reported.
2. `seer-shards build` throughput (images/s, wall clock, CLI start included) to a local folder and
   to s3://.
Runs are interleaved (local, s3, ...) and the median of --runs is reported. The last line is JSON.
Targets (issue 15): s3 within 10% of local with 2 workers; 1% failing GETs within 20% of clean.
    .venv/bin/python benchmarks/bench_object_store.py [--photos ../shared/photos]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from fault_proxy import FaultProxy, Faults  # noqa: E402
from s3_server import start_server  # noqa: E402
from seer_pipeline.config.data import DataConfig  # noqa: E402
from seer_pipeline.data.loader import build_loader  # noqa: E402
from seer_pipeline.shards.synth import photo_variants, write_shards  # noqa: E402
from seer_pipeline.store import client, objects, reader  # noqa: E402


def epoch(spec: str, workers: int, batch: int, endpoint: str = "") -> tuple[float, list[int]]:
    """(samples/s after the first batch, every sample id in delivery order) for one epoch."""
    cfg = DataConfig(shards=spec, batch_size=batch, workers=workers, crops="swav", shuffle_buffer=64,
                     s3_endpoint=endpoint)
    ld = build_loader(cfg, 0, 1)
    it = iter(ld)
    next(it)  # worker start-up and the first batch are not timed
    uids = list(ld.last_uids)
    t0 = time.perf_counter()
    for _ in range(ld.batches_per_epoch - 1):
        next(it)
        uids += ld.last_uids
    dt = time.perf_counter() - t0
    it.close()
    return (ld.batches_per_epoch - 1) * batch / dt, uids


def build(inputs: Path, out: str, stage: Path, workers: int) -> tuple[float, float]:
    """(wall seconds, of which connecting to the store: boto3 import, client, LIST + abort)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "data_prep.cli", "--log-level", "INFO", "build", str(inputs),
                        "--out", out, "--staging", str(stage), "--workers", str(workers), "--maxcount", "64",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    m = re.search(r"connect ([0-9.]+)s", r.stderr)
    return time.perf_counter() - t0, float(m.group(1)) if m else 0.0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=str(REPO / "tests" / "data" / "photos"))
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--max-side", type=int, default=320)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--window", type=int, default=128 << 10, help="bytes per GET (more GETs -> more faults)")
    ap.add_argument("--fail-every", type=int, default=100, help="cut every Nth GET mid-body (100 = 1%%)")
    a = ap.parse_args(argv)
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    reader.WINDOW_BYTES = a.window  # inherited by the forked loader workers
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        srv = start_server(tmp / "weed")
        try:
            os.environ["AWS_ENDPOINT_URL"] = srv.endpoint
            client.reset_clients()
            srv.make_bucket("bench")
            blobs = photo_variants(a.photos, a.samples, max_side=a.max_side)
            local = write_shards(tmp / "shards", blobs, a.per_shard)
            for p in sorted(local.iterdir()):
                objects.put_bytes(f"s3://bench/shards/{p.name}", p.read_bytes())
            nbytes = sum(p.stat().st_size for p in local.glob("*.tar"))
            res: dict = {k: [] for k in ("local", "s3", "s3_proxy", "s3_faults")}
            ref_uids = None
            mismatch = {k: 0 for k in res}
            faults = Faults(drop_every=a.fail_every)
            with FaultProxy(srv.endpoint) as clean, FaultProxy(srv.endpoint, faults) as bad:
                for _ in range(a.runs):
                    for name, spec, ep in (("local", str(local), ""), ("s3", "s3://bench/shards", ""),
                                           ("s3_proxy", "s3://bench/shards", clean.endpoint),
                                           ("s3_faults", "s3://bench/shards", bad.endpoint)):
                        sps, uids = epoch(spec, a.workers, a.batch, ep)
                        res[name].append(sps)
                        ref_uids = ref_uids if ref_uids is not None else uids
                        mismatch[name] += int(uids != ref_uids)
            gets_clean = clean.faults.counts["gets"] / a.runs
            gets_faulty = faults.counts["gets"] / a.runs
            dump = tmp / "dump"
            dump.mkdir()
            for i, b in enumerate(blobs):
                (dump / f"img{i:05d}.jpg").write_bytes(b)
            bt = {"local": [], "s3": []}
            for r in range(a.runs):
                bt["local"].append(build(dump, str(tmp / f"built{r}"), tmp / f"stage_l{r}", a.workers))
                bt["s3"].append(build(dump, f"s3://bench/built{r}", tmp / f"stage_s{r}", a.workers))
        finally:
            srv.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    out = {
        "samples": a.samples, "shard_bytes": nbytes, "workers": a.workers, "window_bytes": a.window,
        "loader_samples_per_s": {k: round(v, 1) for k, v in med.items()},
        "loader_runs": {k: [round(x, 1) for x in v] for k, v in res.items()},
        "s3_vs_local": round(med["s3"] / med["local"], 3),
        "faults_vs_clean_proxy": round(med["s3_faults"] / med["s3_proxy"], 3),
        "faults_vs_clean_direct": round(med["s3_faults"] / med["s3"], 3),
        "gets_per_epoch": gets_clean, "gets_per_epoch_faulty": gets_faulty,
        "gets_cut": faults.counts["dropped"], "runs_with_other_samples": mismatch,
        "build_images_per_s": {k: round(a.samples / statistics.median(w for w, _ in v), 1) for k, v in bt.items()},
        "build_s3_vs_local": round(statistics.median(w for w, _ in bt["local"]) /
                                   statistics.median(w for w, _ in bt["s3"]), 3),
        # The fixed cost of reaching the store, paid once per build whatever its size:
        "build_s3_connect_s": round(statistics.median(c for _, c in bt["s3"]), 2),
        "build_s3_vs_local_after_connect": round(statistics.median(w for w, _ in bt["local"]) /
                                                 statistics.median(w - c for w, c in bt["s3"]), 3),
        "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
