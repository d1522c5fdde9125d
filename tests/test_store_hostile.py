"""Hostile object stores (issue 24): an object replaced between two ranged GETs, a Content-Range
total that grows on every answer, an endless manifest body, an endless listing.

Against the SeaweedFS server (tests/s3_server.py); the hostile answers come from the fault proxy
(tests/fault_proxy.py). Each must end, within a bounded time, in a clear error or a counted read
failure, never mixed bytes or an endless read.
"""
from __future__ import annotations

import random
import tarfile
from pathlib import Path

import pytest

from fault_proxy import FaultProxy, Faults
from seer_pipeline.shards import remote
from seer_pipeline.store import client, objects, reader
from test_hostile_shards import deadline
from test_store import upload_dir

FAST = reader.RetryPolicy(attempts=3, base_s=0.001, max_s=0.01)


def read_exactly(f: reader.RemoteFile, n: int) -> bytes:
    out = bytearray()
    while len(out) < n and (chunk := f.read(n - len(out))):
        out += chunk
    return bytes(out)


def test_object_replaced_between_gets_is_refused_not_mixed(s3_endpoint: str, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/blob"
    old, new = random.Random(0).randbytes(1_000_000), random.Random(1).randbytes(1_000_000)
    objects.put_bytes(url, old)
    f = reader.RemoteFile(url, window=200_000, policy=FAST)
    assert read_exactly(f, 150_000) == old[:150_000]
    objects.put_bytes(url, new)  # same key, same size: only the ETag tells them apart
    # The rest of the first window: already in flight from the old object, and whole.
    assert read_exactly(f, 50_000) == old[150_000:200_000]
    with pytest.raises(reader.ObjectChanged, match="replaced while being read"):
        read_exactly(f, 100_000)  # the second GET
    # A fresh reader pins the new object and reads it whole.
    assert reader.read_bytes(url) == new


def test_loader_counts_a_shard_replaced_mid_read(s3_endpoint: str, s3_bucket: str, tmp_path: Path,
                                                 photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import test_loader as tl
    from seer_pipeline.data.loader import build_loader
    from seer_pipeline.shards.synth import photo_variants, write_shards

    local = write_shards(tmp_path / "s", photo_variants(photo_dir, 24, max_side=32), 8)
    url = f"s3://{s3_bucket}/s"
    upload_dir(local, url)
    victim = f"{url}/shard-000001.tar"
    blob = (local / "shard-000001.tar").read_bytes()
    replaced = bytearray(blob)  # same size and tar headers; the back half's images have other bytes
    with tarfile.open(local / "shard-000001.tar") as tf:
        for m in tf.getmembers()[8:]:
            if m.name.endswith(".jpg"):
                for i in range(m.offset_data + m.size // 2, m.offset_data + m.size - 8, 7):
                    replaced[i] ^= 0x01
    monkeypatch.setattr(reader, "WINDOW_BYTES", 4096)  # many GETs per shard
    monkeypatch.setattr(reader, "DEFAULT_POLICY", FAST)
    opened: dict[str, int] = {}
    real_open = reader.RemoteFile._open

    def open_then_replace(self: reader.RemoteFile, start: int) -> None:  # the seam: each ranged GET
        n = opened[str(self.url)] = opened.get(str(self.url), 0) + 1
        if str(self.url) == victim and n == 2:
            objects.put_bytes(victim, bytes(replaced))  # between this reader's first and second GET
        real_open(self, start)

    monkeypatch.setattr(reader.RemoteFile, "_open", open_then_replace)
    ld = build_loader(tl.cfg(url, workers=0, batch_size=2, max_fail_fraction=0.9), 0, 1)
    with deadline(300):
        tl.take(ld, ld.batches_per_epoch)
    m = ld.metrics()
    assert m["failed_shard_names"] == [victim] and m["read_failures"] >= 1, m
    assert m["decode_failures"] == 0, m  # no sample of mixed bytes reached the decoder
    assert m["samples_ok"] + m["read_failures"] == 24, m


def test_remote_verify_refuses_a_member_declaring_1tib(s3_endpoint: str, s3_bucket: str, tmp_path: Path,
                                                      photo_dir: Path) -> None:
    from data_prep.verify import verify
    from seer_pipeline.shards import format as fmt
    from seer_pipeline.shards.synth import photo_variants, write_shards
    from test_hostile_shards import _good, huge_member_shard

    local = write_shards(tmp_path / "s", photo_variants(photo_dir, 8, max_side=32), 4)
    man = fmt.load_manifest(str(local))
    fmt.write_manifest(str(local), dict(man, inputs_seen=8, skipped=0))
    huge_member_shard(local / "shard-000001.tar", _good(photo_dir, 6)[4:6], "00000006", 1 << 40)
    url = f"s3://{s3_bucket}/s"
    upload_dir(local, url)
    with deadline(120):
        problems = verify(url, decode=False)
    assert any(p.startswith("shard-000001.tar: unreadable tar") and "00000006.jpg" in p and "cap" in p
               for p in problems), problems


def test_growing_content_range_total_ends_verify(s3_endpoint: str, s3_bucket: str, tiny_shards: Path) -> None:
    from data_prep.verify import verify

    url = f"s3://{s3_bucket}/tiny"
    upload_dir(tiny_shards, url)
    faults = Faults(grow_total=100_000, only="shard-")
    with FaultProxy(s3_endpoint, faults) as proxy:
        client.set_endpoint(proxy.endpoint)
        try:
            with deadline(120):
                problems = verify(url)
        finally:
            client.set_endpoint(None)
    unreadable = [p for p in problems if "unreadable tar" in p]
    assert unreadable and all("bytes" in p and "expected" in p for p in unreadable), problems
    assert faults.counts["grown"] <= 10 * len(unreadable), faults.counts  # a GET or so per shard, not forever


def test_endless_manifest_is_refused_at_the_cap(s3_endpoint: str, s3_bucket: str, tiny_shards: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{s3_bucket}/tiny"
    upload_dir(tiny_shards, url)
    monkeypatch.setattr(remote, "MAX_MANIFEST_BYTES", 4 << 20)  # the real cap (64 MiB) works alike, slower
    with FaultProxy(s3_endpoint, Faults(endless="manifest.json")) as proxy:
        client.set_endpoint(proxy.endpoint)
        try:
            with deadline(120), pytest.raises(ValueError, match="not a shard manifest.*cap"):
                remote.load_manifest_remote(url)
        finally:
            client.set_endpoint(None)
    assert reader.read_bytes(f"{url}/manifest.json", 1 << 20).startswith(b"{")  # a real one is read


def test_endless_listing_is_refused(s3_endpoint: str, s3_bucket: str, tiny_shards: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import data_prep.verify_remote as vr

    url = f"s3://{s3_bucket}/tiny"
    upload_dir(tiny_shards, url)
    monkeypatch.setattr(vr, "MAX_LISTED", 5000)  # the real cap (1e6) works alike, slower
    faults = Faults(endless_listing=True)
    with FaultProxy(s3_endpoint, faults) as proxy:
        client.set_endpoint(proxy.endpoint)
        client.reset_clients()
        try:
            with deadline(120), pytest.raises(ValueError, match="passes 5000 objects"):
                vr.verify_remote(url)
        finally:
            client.set_endpoint(None)
            client.reset_clients()
    assert faults.counts["pages"] == 6, faults.counts


def test_remote_inputs_keep_to_max_bytes(s3_endpoint: str, s3_bucket: str, photo_dir: Path, tmp_path: Path) -> None:
    """An object over --max-bytes is `too_large` (as a local file is), refused from its declared
    size after the first bounded read, never fetched whole; list entries likewise."""
    from data_prep.build import build_shards
    from seer_pipeline.shards import format as fmt

    photo = sorted(photo_dir.glob("*.jpg"))[0].read_bytes()
    objects.put_bytes(f"s3://{s3_bucket}/cap/a.jpg", photo)
    objects.put_bytes(f"s3://{s3_bucket}/cap/big.jpg", photo + b"\0" * (3 << 20))  # a valid JPEG, padded
    objects.put_bytes(f"s3://{s3_bucket}/caplist/list.txt", b"../cap/big.jpg\n../cap/a.jpg\n")
    before = reader.COUNTERS["bytes"]
    man = build_shards([f"s3://{s3_bucket}/cap/", f"s3://{s3_bucket}/caplist/list.txt"], tmp_path / "o",
                       dedup=False, max_bytes=2 << 20)
    assert man["written"] == 2 and man["reasons"] == {"too_large": 2}, man
    assert {s.rsplit("/", 1)[-1] for s, _ in fmt.read_skipped(str(tmp_path / "o" / "skipped.tsv"))} == {"big.jpg"}
    assert reader.COUNTERS["bytes"] - before < 2 * len(photo) + 2 * (2 << 20)  # at most a capped read each
