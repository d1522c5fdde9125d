"""Object-store writes and listings (s3:// only; http(s):// is read-only).

Every object appears whole or not at all: a single PUT is atomic in S3, and a multipart upload is
invisible under its key until CompleteMultipartUpload. A build killed mid-upload leaves at most an
incomplete multipart upload, which `abort_incomplete` removes on the next run.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Dict, Iterator, Optional

from seer_pipeline.store.client import s3_client
from seer_pipeline.store.url import Url, parse

log = logging.getLogger(__name__)
PART_BYTES = int(os.environ.get("SEER_S3_PART_BYTES", str(64 << 20)))  # S3 minimum is 5 MiB (AWS docs)
SHA_META = "sha256"  # x-amz-meta-sha256: how a rerun knows an object is the shard it means


def _s3(url: str | Url) -> Url:
    u = parse(url) if isinstance(url, str) else url
    if u.scheme != "s3":
        raise ValueError(f"{u}: writing needs an s3:// URL (http(s) is read-only)")
    return u


def head(url: str | Url) -> Optional[Dict]:
    """{'size', 'sha256'} of an object, or None if there is none."""
    from botocore.exceptions import ClientError  # lazy: boto3/urllib3 load on the first remote access, not at import

    u = _s3(url)
    try:
        r = s3_client().head_object(Bucket=u.host, Key=u.key)
    except ClientError as e:
        if int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) == 404:
            return None
        raise
    return {"size": int(r["ContentLength"]), "sha256": r.get("Metadata", {}).get(SHA_META)}


def list_prefix(url: str | Url, max_keys: Optional[int] = None) -> Dict[str, int]:
    """Every object under a prefix (as a folder: 'a/b' lists 'a/b/*'): relative name -> size.

    ValueError past `max_keys` objects: a listing that never ends (a server that always answers
    IsTruncated with a fresh token) would otherwise be read forever."""
    u = _s3(url)
    prefix = u.key.rstrip("/") + "/" if u.key else ""
    out: Dict[str, int] = {}
    seen = 0  # entries answered, repeats included: a server may repeat keys under fresh tokens
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=u.host, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = int(o["Size"])
        seen += max(1, len(page.get("Contents", [])))  # an empty page counts: it can repeat too
        if max_keys is not None and seen > max_keys:
            raise ValueError(f"listing {u} passes {max_keys} objects: not a shard set's folder, "
                             f"or a listing that never ends")
    return out


def put_bytes(url: str | Url, data: bytes) -> None:
    u = _s3(url)
    s3_client().put_object(Bucket=u.host, Key=u.key, Body=data,
                           Metadata={SHA_META: hashlib.sha256(data).hexdigest()})


def put_file(url: str | Url, path: str, sha256: str, part_bytes: int = 0) -> None:
    """Upload a local file whole; multipart above `part_bytes` (default SEER_S3_PART_BYTES).

    On any error the multipart upload is aborted, so no storage is left behind; a kill -9 leaves it
    for `abort_incomplete`.
    """
    u = _s3(url)
    c = s3_client()
    part_bytes = part_bytes or PART_BYTES
    size = os.path.getsize(path)
    meta = {SHA_META: sha256}
    if size <= part_bytes:
        with open(path, "rb") as f:
            c.put_object(Bucket=u.host, Key=u.key, Body=f.read(), Metadata=meta)
        return
    up = c.create_multipart_upload(Bucket=u.host, Key=u.key, Metadata=meta)["UploadId"]
    try:
        parts = []
        with open(path, "rb") as f:
            for n in range(1, -(-size // part_bytes) + 1):
                parts.append({"PartNumber": n, "ETag": _upload_part(c, u, up, n, f.read(part_bytes))})
        c.complete_multipart_upload(Bucket=u.host, Key=u.key, UploadId=up, MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            c.abort_multipart_upload(Bucket=u.host, Key=u.key, UploadId=up)
        except Exception as e:  # noqa: BLE001 - the original error matters more
            log.warning("%s: could not abort multipart upload %s: %s", u, up, e)
        raise


def _upload_part(c: object, u: Url, upload_id: str, n: int, body: bytes) -> str:
    """Send part n of a multipart upload; its ETag. One call per part: the seam the tests' kills
    mid-upload patch (tests/faultinject/fault_shards_upload.py)."""
    return c.upload_part(Bucket=u.host, Key=u.key, UploadId=upload_id, PartNumber=n, Body=body)["ETag"]  # type: ignore[attr-defined]


def iter_incomplete(url: str | Url) -> Iterator[tuple[str, str]]:
    """(key, upload id) of multipart uploads started under a prefix and never completed."""
    u = _s3(url)
    prefix = u.key.rstrip("/") + "/" if u.key else ""
    for page in s3_client().get_paginator("list_multipart_uploads").paginate(Bucket=u.host, Prefix=prefix):
        for m in page.get("Uploads", []) or []:
            yield m["Key"], m["UploadId"]


def abort_incomplete(url: str | Url) -> int:
    """Abort every incomplete multipart upload under a prefix (a killed run's); returns how many."""
    u = _s3(url)
    n = 0
    for key, up in list(iter_incomplete(u)):
        s3_client().abort_multipart_upload(Bucket=u.host, Key=key, UploadId=up)
        n += 1
    if n:
        log.info("%s: aborted %d incomplete multipart upload(s) of an interrupted run", u, n)
    return n


def delete(url: str | Url) -> None:
    u = _s3(url)
    s3_client().delete_object(Bucket=u.host, Key=u.key)
