"""SIGKILL an s3 `seer-shards build` in the middle of shard I's upload: value "I".

Shard I's upload is made multipart (three parts) and the process dies right after its first
part is sent, leaving an incomplete multipart upload for the rerun to abort.
Seams: seer_pipeline.store.objects.put_file (one call per object) and
seer_pipeline.store.objects._upload_part (one call per part of a multipart upload).
"""
from __future__ import annotations

import os
import signal


def arm(value: str) -> None:
    from seer_pipeline.store import objects
    from seer_pipeline.shards.format import shard_name

    target = "/" + shard_name("shard", int(value))
    real_put, real_part = objects.put_file, objects._upload_part
    armed = [False]

    def put_file(url, path, sha256, part_bytes=0):
        if str(url).endswith(target):
            armed[0] = True
            part_bytes = max(1, os.path.getsize(path) // 3)
        return real_put(url, path, sha256, part_bytes=part_bytes)

    def upload_part(*a, **k):
        r = real_part(*a, **k)
        if armed[0]:
            os.kill(os.getpid(), signal.SIGKILL)
        return r

    objects.put_file, objects._upload_part = put_file, upload_part
