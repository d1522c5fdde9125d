"""`seer-shards {build,verify,stats,merge,contamination}`: the command line over data_prep.

Plain argparse on purpose: the command is timed end to end, and must not import torch
(webdataset and the seer_pipeline config stack are left out for the same reason).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sqlite3
import sys
from typing import Optional, Sequence

from seer_pipeline.core.exit_codes import INTERRUPTED, USAGE

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
    b.add_argument("--max-bytes", type=_size, default=256 << 20,
                   help="skip inputs larger than this (from stat / the tar header, before reading); "
                        "default and maximum 256M, the shard readers' member cap")
    b.add_argument("--no-dedup", action="store_true", help="keep exact duplicates (same as --dedup none)")
    b.add_argument("--dedup", choices=["exact", "near", "none"], default="exact",
                   help="exact: drop byte-identical copies (default); near: also drop resized, recompressed, "
                        "converted or slightly cropped copies (skipped.tsv names the kept one)")
    # One path per flag, like --exclude: with nargs="+", `build IN0 --exclude-near E IN1` took the
    # input IN1 for an evaluation set and silently left it out of the build.
    b.add_argument("--exclude-near", action="append", default=[], metavar="PATH",
                   help="evaluation images (folder, archive, list or shard set): drop near-copies of them; repeatable")
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
    m.add_argument("--force", action="store_true", help="replace a shard set already in --out")
    m.add_argument("--workers", type=int, default=1, help="processes for the cross-part dedup (hash buckets)")
    c = sub.add_parser("contamination", help="which evaluation images have near-copies in a shard set")
    c.add_argument("dir", help="local shard folder")
    c.add_argument("evals", nargs="+", help="evaluation images: folders, archives, path lists, shard sets")
    c.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    for p in (b, v, s, m):  # overrides AWS_ENDPOINT_URL / the AWS config (never logged with credentials)
        p.add_argument("--endpoint-url", default=None, help="S3 endpoint, e.g. http://127.0.0.1:8333")
    return ap


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # A file-size limit (ulimit -f) must fail the write (EFBIG) rather than kill the process
    # with SIGXFSZ: then it is reported like a full disk. Workers inherit the setting.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "endpoint_url", None):  # local-only commands (contamination) have no such option
        from seer_pipeline.store.client import set_endpoint  # lazy: boto3 loads only when a remote store is named

        set_endpoint(args.endpoint_url)
    if args.cmd in ("verify", "stats") and "://" not in args.dir and not os.path.isdir(args.dir):
        print(f"seer-shards {args.cmd}: error: no such folder: {args.dir}", file=sys.stderr)
        return USAGE
    try:
        if args.cmd == "build":
            return _build(args)
        if args.cmd == "verify":
            # each subcommand imports only its own module: `seer-shards stats` starts without the build machinery
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
        if args.cmd == "contamination":  # exits 1 when a copy is found, like verify on a problem
            from data_prep.contamination import run

            return run(args.dir, args.evals, args.json)
        if args.cmd == "merge":
            from data_prep.merge import merge

            if "://" in args.out:
                from data_prep.store_build import merge_in_store

                man = merge_in_store(args.parts, args.out)
            else:
                man = merge(args.parts, args.out, force=args.force, workers=max(1, args.workers))
            print(f"merged {len(args.parts)} parts: {man['written']} samples in {len(man['shards'])} shards")
            return 0
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"seer-shards {args.cmd}: error: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        # Finished shards are complete files; the same command finishes the job exactly.
        hint = "; rerun the same command to finish" if args.cmd in ("build", "merge") else ""
        print(f"seer-shards {args.cmd}: interrupted (Ctrl-C){hint}", file=sys.stderr)
        return INTERRUPTED
    except (OSError, sqlite3.OperationalError) as e:
        if not _disk_full(e):
            raise
        print(f"seer-shards {args.cmd}: error: out of disk space or over the file size limit ({e}); "
              "nothing done so far is lost: free space and rerun the same command to resume", file=sys.stderr)
        return 1
    except Exception as e:  # an object-store answer (botocore): one line, not a traceback
        if not type(e).__module__.startswith("botocore"):
            raise
        print(f"seer-shards {args.cmd}: object store error: {e}", file=sys.stderr)
        return USAGE
    return USAGE


def _disk_full(e: BaseException) -> bool:
    """ENOSPC/EFBIG/EDQUOT, also when SQLite or a worker process reports it in its own words."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return True
    return isinstance(e, sqlite3.OperationalError) and ("full" in str(e) or "too large" in str(e))


def _build(args: argparse.Namespace) -> int:
    # only `build` pays for importing the builder, its workers and codecs
    from data_prep.build import ShardOptions, build_shards

    opts = ShardOptions(
        maxcount=args.maxcount, maxsize=args.maxsize, seed=args.seed, workers=max(1, args.workers),
        resize_short_side=args.resize_short_side, quality=args.quality, reencode=args.reencode,
        check=args.check, min_side=args.min_side, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
        dedup=False if args.no_dedup or args.dedup == "none" else ("near" if args.dedup == "near" else True),
        exclude=list(args.exclude), exclude_near=list(args.exclude_near), part=args.part, prefix=args.prefix)
    if "://" in args.out:
        from data_prep.store_build import build_to_store

        m = build_to_store(args.inputs, args.out, args.staging, progress=not args.no_progress, opts=opts)
    else:
        m = build_shards(args.inputs, args.out, progress=not args.no_progress, opts=opts)
    reasons = ", ".join(f"{k} {v}" for k, v in m["reasons"].items()) or "none"
    print(f"{m['inputs_seen']} inputs: {m['written']} written in {len(m['shards'])} shards, "
          f"{m['skipped']} skipped ({reasons}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
