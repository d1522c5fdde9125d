"""`seer-shards {build,verify,stats,merge}`: the command line over data_prep.

Plain argparse on purpose: the command is timed end to end, and must not import torch
(webdataset and the seer_pipeline config stack are left out for the same reason).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

log = logging.getLogger(__name__)


def _part(s: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part wants I/N (e.g. 3/16), got {s!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--part I/N needs 0 <= I < N, got {s!r}")
    return i, n


def _size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().rstrip("b")
    mult = units.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if s[-1:] in units else s) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 1000000, 500M, 3G)") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seer-shards", description="Raw image dumps -> WebDataset shards.")
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build (or resume) a shard set")
    b.add_argument("inputs", nargs="+", help="directories, .tar/.tar.gz archives, .txt path lists, files")
    b.add_argument("--out", required=True, help="output directory, or s3://bucket/prefix (see docs/object_store.md)")
    b.add_argument("--staging", default=None, help="with an s3:// --out: local build folder (default: under $TMPDIR)")
    b.add_argument("--maxcount", type=int, default=10000, help="samples per shard (default 10000)")
    b.add_argument("--maxsize", type=_size, default=None, help="bytes per shard, e.g. 1G")
    b.add_argument("--seed", type=int, default=0, help="global shuffle seed")
    b.add_argument("--workers", type=int, default=1, help="decode/encode processes")
    b.add_argument("--resize-short-side", type=int, default=None, metavar="N")
    b.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    b.add_argument("--reencode", choices=["auto", "always"], default="auto",
                   help="auto: JPEGs needing no change are stored byte for byte")
    b.add_argument("--check", choices=["full", "header"], default="full",
                   help="for pass-through JPEGs: full decode, or header + SOI/EOI markers only")
    b.add_argument("--min-side", type=int, default=16, help="skip images whose short side is smaller")
    b.add_argument("--max-pixels", type=int, default=100_000_000, help="refuse larger images before decoding")
    b.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    b.add_argument("--exclude", action="append", default=[], metavar="FILE_OR_DIR",
                   help="sha256 list or folder of images (e.g. an eval set) to keep out; repeatable")
    b.add_argument("--part", type=_part, default=(0, 1), metavar="I/N", help="build part I of N")
    b.add_argument("--prefix", default="shard", help="shard file prefix")
    b.add_argument("--no-progress", action="store_true")

    v = sub.add_parser("verify", help="re-hash every shard and decode every sample")
    v.add_argument("dir", help="shard folder, s3://bucket/prefix or http(s)://host/path")
    v.add_argument("--no-decode", action="store_true", help="hashes and structure only")

    s = sub.add_parser("stats", help="counts, sizes, resolution histogram")
    s.add_argument("dir", help="shard folder, s3://bucket/prefix or http(s)://host/path")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")

    m = sub.add_parser("merge", help="combine the shard sets of --part runs into one")
    m.add_argument("parts", nargs="+", help="the part output directories")
    m.add_argument("--out", required=True)
    for p in (b, v, s, m):  # overrides AWS_ENDPOINT_URL / the AWS config (never logged with credentials)
        p.add_argument("--endpoint-url", default=None, help="S3 endpoint, e.g. http://127.0.0.1:8333")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.endpoint_url:
        from seer_pipeline.store.client import set_endpoint

        set_endpoint(args.endpoint_url)
    try:
        if args.cmd == "build":
            return _build(args)
        if args.cmd == "verify":
            from data_prep.verify import verify

            problems = verify(args.dir, decode=not args.no_decode)
            for p in problems:
                print(p)
            print(f"{len(problems)} problem(s) in {args.dir}" if problems else f"OK: {args.dir}")
            return 1 if problems else 0
        if args.cmd == "stats":
            from data_prep.verify import format_stats, stats

            st = stats(args.dir)
            print(json.dumps(st, indent=2) if args.json else format_stats(st))
            return 0
        if args.cmd == "merge":
            from data_prep.merge import merge

            if "://" in args.out:
                from seer_pipeline.store.build import merge_in_store as merge  # noqa: F811
            man = merge(args.parts, args.out)
            print(f"merged {len(args.parts)} parts: {man['written']} samples in {len(man['shards'])} shards")
            return 0
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"seer-shards {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # an object-store answer (botocore): one line, not a traceback
        if not type(e).__module__.startswith("botocore"):
            raise
        print(f"seer-shards {args.cmd}: object store error: {e}", file=sys.stderr)
        return 2
    return 2


def _build(args: argparse.Namespace) -> int:
    from data_prep.build import ShardOptions, build_shards

    opts = ShardOptions(
        maxcount=args.maxcount, maxsize=args.maxsize, seed=args.seed, workers=max(1, args.workers),
        resize_short_side=args.resize_short_side, quality=args.quality, reencode=args.reencode,
        check=args.check, min_side=args.min_side, max_pixels=args.max_pixels, dedup=not args.no_dedup,
        exclude=list(args.exclude), part=args.part, prefix=args.prefix)
    if "://" in args.out:
        from seer_pipeline.store.build import build_to_store

        m = build_to_store(args.inputs, args.out, args.staging, progress=not args.no_progress, opts=opts)
    else:
        m = build_shards(args.inputs, args.out, progress=not args.no_progress, opts=opts)
    reasons = ", ".join(f"{k} {v}" for k, v in m["reasons"].items()) or "none"
    print(f"{m['inputs_seen']} inputs: {m['written']} written in {len(m['shards'])} shards, "
          f"{m['skipped']} skipped ({reasons}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
