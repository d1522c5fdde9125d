"""Shards in an object store (s3://, http(s)://): URLs, clients, a retrying ranged reader,
uploads for `seer-shards build --out s3://...`, and remote verify/stats. Light to import:
boto3 is loaded on first use, so `seer-shards` on local paths never pays for it."""
from seer_pipeline.store.url import Url, is_remote, parse

__all__ = ["Url", "is_remote", "parse"]
