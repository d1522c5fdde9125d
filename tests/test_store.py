"""Object store: URLs, the retrying ranged reader under injected faults, uploads, remote
verify/stats/inputs/merge, all against a real S3 server (SeaweedFS on 127.0.0.1)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fault_proxy import FaultProxy, Faults
from seer_pipeline.store import client, objects, reader
from seer_pipeline.store.url import is_remote, parse

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def endpoint(s3_endpoint: str) -> str:
    return s3_endpoint


def upload_dir(local: Path, url: str) -> None:
    for p in sorted(local.iterdir()):
        if p.is_file():
            objects.put_bytes(f"{url}/{p.name}", p.read_bytes())


def test_url_parsing() -> None:
    u = parse("s3://bkt/a/b/")
    assert (u.scheme, u.host, u.key) == ("s3", "bkt", "a/b/") and str(u.join("m.json")) == "s3://bkt/a/b/m.json"
    assert str(parse("https://host:8080/x").join("y")) == "https://host:8080/x/y"
    assert is_remote("s3://b/k") and is_remote("HTTPS://h/p") and not is_remote("/data/s3://x")
    assert not is_remote(Path("s3:/x"))
    for bad, why in [("s3://", "bucket"), ("s3://key:secret@bkt/k", "credentials"), ("s3://b/k?x=1", "query"),
                     ("s3://b/../k", "'..'"), ("ftp://h/x", "not an s3")]:
        with pytest.raises(ValueError, match=why):
            parse(bad)


def test_ranged_reader_exactly_once_under_faults(endpoint: str, s3_bucket: str, monkeypatch) -> None:
    data = random.Random(0).randbytes(3_000_000)
    objects.put_bytes(f"s3://{s3_bucket}/blob", data)
    faults = Faults(drop_every=2, throttle_every=5, retry_after_s=0)
    with FaultProxy(endpoint, faults) as proxy:
        client.set_endpoint(proxy.endpoint)
        r0 = reader.COUNTERS["retries"]
        f = reader.RemoteFile(f"s3://{s3_bucket}/blob", window=200_000,
                              policy=reader.RetryPolicy(attempts=8, base_s=0.001, max_s=0.01))
        got, rng = bytearray(), random.Random(1)
        while True:  # odd read sizes and forward seeks, as tarfile does
            if rng.random() < 0.1 and len(got) < len(data) - 5000:
                skip = rng.randrange(1, 5000)
                f.seek(len(got) + skip)
                got += data[len(got):len(got) + skip]
            chunk = f.read(rng.randrange(1, 90_000))
            if not chunk:
                break
            got += chunk
        assert bytes(got) == data, "bytes lost or repeated across retries"
        f.seek(1_234_567)
        assert f.read(1000) == data[1_234_567:1_235_567]
    client.set_endpoint(None)
    c = faults.counts
    assert c["dropped"] >= 5 and c["throttled"] >= 2, c
    # Every 503 is retried; a cut stream is retried unless the reader had already moved past it.
    assert reader.COUNTERS["retries"] - r0 > c["throttled"]
    with pytest.raises(FileNotFoundError):
        reader.read_bytes(f"s3://{s3_bucket}/nope")


def test_reader_gives_up_after_bounded_attempts(endpoint: str, s3_bucket: str) -> None:
    data = random.Random(5).randbytes(10_000)
    objects.put_bytes(f"s3://{s3_bucket}/blob", data)
    with FaultProxy(endpoint, Faults(drop_every=1)) as proxy:  # every GET cut, but each one progresses
        client.set_endpoint(proxy.endpoint)
        assert reader.RemoteFile(f"s3://{s3_bucket}/blob", policy=reader.RetryPolicy(4, 0.001, 0.01)).read() == data
    with FaultProxy(endpoint, Faults(throttle_every=1)) as proxy:  # no progress: bounded
        client.set_endpoint(proxy.endpoint)
        t0 = time.monotonic()
        with pytest.raises(reader.RemoteReadError, match="after 4 attempts"):
            reader.RemoteFile(f"s3://{s3_bucket}/blob", policy=reader.RetryPolicy(4, 0.001, 0.01)).read()
        assert time.monotonic() - t0 < 10
    client.set_endpoint(None)


def test_idle_cut_and_read_timeout_are_resumed(endpoint: str, s3_bucket: str, monkeypatch) -> None:
    data = random.Random(2).randbytes(400_000)
    objects.put_bytes(f"s3://{s3_bucket}/blob", data)
    monkeypatch.setattr(client, "READ_TIMEOUT_S", 0.5)
    client.reset_clients()
    faults = Faults(stall_every=2, stall_s=3.0)  # the server goes silent mid-body
    with FaultProxy(endpoint, faults) as proxy:
        client.set_endpoint(proxy.endpoint)
        f = reader.RemoteFile(f"s3://{s3_bucket}/blob", window=100_000, policy=reader.RetryPolicy(6, 0.001, 0.01))
        assert f.readall() == data
    client.set_endpoint(None)
    assert faults.counts["stalled"] >= 2


def test_multipart_upload_and_abort(endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    data = random.Random(3).randbytes(11 << 20)
    p = tmp_path / "big"
    p.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    parts: list[int] = []
    real = objects._upload_part
    monkeypatch.setattr(objects, "_upload_part", lambda c, u, up, n, body: (parts.append(n), real(c, u, up, n, body))[1])
    objects.put_file(f"s3://{s3_bucket}/pre/big", str(p), sha, part_bytes=5 << 20)
    assert parts == [1, 2, 3]  # S3's minimum part is 5 MiB (SeaweedFS enforces it too)
    assert objects.head(f"s3://{s3_bucket}/pre/big") == {"size": len(data), "sha256": sha}
    assert reader.read_bytes(f"s3://{s3_bucket}/pre/big") == data
    # A killed upload: parts sent, never completed -> invisible, and aborted by the next run.
    c = client.s3_client()
    up = c.create_multipart_upload(Bucket=s3_bucket, Key="pre/half")["UploadId"]
    c.upload_part(Bucket=s3_bucket, Key="pre/half", UploadId=up, PartNumber=1, Body=b"x" * 1000)
    assert "half" not in objects.list_prefix(f"s3://{s3_bucket}/pre")
    assert [k for k, _ in objects.iter_incomplete(f"s3://{s3_bucket}/pre")] == ["pre/half"]
    assert objects.abort_incomplete(f"s3://{s3_bucket}/pre") == 1
    assert list(objects.iter_incomplete(f"s3://{s3_bucket}/pre")) == []


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.cli", "--log-level", "INFO", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def _man(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "config"}


@pytest.mark.slow
def test_build_verify_stats_in_s3(endpoint: str, s3_bucket: str, photo_dir: Path, tiny_shards: Path,
                                  tmp_path: Path) -> None:
    out = f"s3://{s3_bucket}/set"
    r = _cli("build", str(photo_dir), "--out", out, "--maxcount", "4", "--no-progress",
             "--staging", str(tmp_path / "stage"))
    assert r.returncode == 0, r.stderr
    assert "3 shard(s) uploaded, 0 already there" in r.stderr
    man = json.loads(reader.read_bytes(f"{out}/manifest.json"))
    assert _man(man) == _man(json.loads((tiny_shards / "manifest.json").read_text()))  # same shards as local
    for s in man["shards"]:
        assert objects.head(f"{out}/{s['name']}") == {"size": s["bytes"], "sha256": s["sha256"]}
    again = _cli("build", str(photo_dir), "--out", out, "--maxcount", "4", "--no-progress",
                 "--staging", str(tmp_path / "stage"))
    assert again.returncode == 0 and "0 shard(s) uploaded, 3 already there" in again.stderr, again.stderr
    other = _cli("build", str(photo_dir), "--out", out, "--maxcount", "5", "--no-progress",
                 "--staging", str(tmp_path / "stage2"))
    assert other.returncode == 2 and "other options (maxcount)" in other.stderr
    v = _cli("verify", out)
    assert v.returncode == 0 and v.stdout.strip().endswith(f"OK: {out}"), v.stdout + v.stderr
    st = _cli("stats", out, "--json")
    loc = _cli("stats", str(tiny_shards), "--json")
    assert st.returncode == 0 and json.loads(st.stdout) == json.loads(loc.stdout)
    # Damage is found: a flipped byte, a missing shard, a stray shard object.
    name = man["shards"][1]["name"]
    blob = bytearray(reader.read_bytes(f"{out}/{name}"))
    blob[3000] ^= 0xFF
    objects.put_bytes(f"{out}/{name}", bytes(blob))
    objects.delete(f"{out}/{man['shards'][2]['name']}")
    objects.put_bytes(f"{out}/shard-000009.tar", b"junk")
    bad = _cli("verify", out, "--endpoint-url", endpoint)
    assert bad.returncode == 1
    assert f"{name}: sha256 differs from the manifest" in bad.stdout
    assert f"{man['shards'][2]['name']}: missing" in bad.stdout
    assert "shard-000009.tar: shard object not in the manifest" in bad.stdout
    nope = _cli("verify", f"s3://{s3_bucket}/nothing-here")
    assert nope.returncode == 2 and "no manifest.json" in nope.stderr


@pytest.mark.slow
def test_remote_inputs_and_part_merge(endpoint: str, s3_bucket: str, photo_dir: Path, tmp_path: Path) -> None:
    upload_dir(photo_dir, f"s3://{s3_bucket}/raw")
    parts = []
    for i in range(2):
        parts.append(f"s3://{s3_bucket}/part{i}")
        r = _cli("build", f"s3://{s3_bucket}/raw/", "--out", parts[-1], "--part", f"{i}/2", "--maxcount", "3",
                 "--no-progress", "--staging", str(tmp_path / f"p{i}"))
        assert r.returncode == 0, r.stderr
    local = _cli("build", str(photo_dir), "--out", str(tmp_path / "local"), "--maxcount", "3", "--no-progress")
    assert local.returncode == 0
    m = _cli("merge", *parts, "--out", f"s3://{s3_bucket}/all")
    assert m.returncode == 0, m.stderr
    man = json.loads(reader.read_bytes(f"s3://{s3_bucket}/all/manifest.json"))
    ref = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert man["written"] == ref["written"] == 12 and man["inputs_seen"] == ref["inputs_seen"]
    assert man["reasons"] == ref["reasons"]
    assert _cli("verify", f"s3://{s3_bucket}/all").returncode == 0
    assert _cli("merge", *parts, "--out", f"s3://{s3_bucket}/all").returncode == 0  # rerun: idempotent
    # A tar archive and a list of keys (relative to the list) in s3: the same photos twice.
    import tarfile

    with tarfile.open(tmp_path / "photos.tar", "w") as tf:
        for p in sorted(photo_dir.iterdir()):
            tf.add(p, arcname=p.name)
    objects.put_bytes(f"s3://{s3_bucket}/in/photos.tar", (tmp_path / "photos.tar").read_bytes())
    names = "\n".join(f"../raw/{p.name}" for p in sorted(photo_dir.iterdir()))
    objects.put_bytes(f"s3://{s3_bucket}/in/list.txt", names.encode())
    r = _cli("build", f"s3://{s3_bucket}/in/photos.tar", f"s3://{s3_bucket}/in/list.txt", "--out",
             f"s3://{s3_bucket}/fromtar", "--no-progress", "--staging", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    man = json.loads(reader.read_bytes(f"s3://{s3_bucket}/fromtar/manifest.json"))
    assert man["written"] == 12 and man["duplicates"] == 12, man


def test_unreadable_shard_follows_the_bad_data_policy(endpoint: str, s3_bucket: str, tmp_path: Path,
                                                      photo_dir: Path, monkeypatch) -> None:
    import test_loader as tl
    from seer_pipeline.data.loader import build_loader
    from seer_pipeline.shards.synth import photo_variants, write_shards

    local = write_shards(tmp_path / "s", photo_variants(photo_dir, 40, max_side=32), 4)  # 10 shards
    url = f"s3://{s3_bucket}/s"
    upload_dir(local, url)
    monkeypatch.setattr(reader, "DEFAULT_POLICY", reader.RetryPolicy(3, 0.001, 0.01))
    objects.delete(f"{url}/shard-000002.tar")  # 404: not retried
    with FaultProxy(endpoint, Faults(throttle_every=1, only="shard-000005.tar")) as proxy:  # 503 forever
        ld = build_loader(tl.cfg(url, workers=0, batch_size=2, max_fail_fraction=0.3, s3_endpoint=proxy.endpoint), 0, 1)
        got = tl.take(ld, ld.batches_per_epoch)
        m = ld.metrics()
        assert m["read_failures"] == 8 and m["shards_failed"] == 2, m  # both shards' 4 samples, counted
        uids = [u for _, us, _ in got for u in us]
        assert not set(uids) & (set(range(8, 12)) | set(range(20, 24)))  # never a sample of those two
        assert len(set(uids)) == 32 and m["samples_repeated"] == len(uids) - 32  # the policy's refill
        strict = build_loader(tl.cfg(url, workers=0, batch_size=2, max_fail_fraction=0.05,
                                     s3_endpoint=proxy.endpoint), 0, 1)
        with pytest.raises(RuntimeError, match="exceed max_fail_fraction"):
            tl.take(strict, strict.batches_per_epoch)
    client.set_endpoint(None)


def test_http_shards_equal_local(endpoint: str, s3_server, s3_bucket: str, tiny_shards: Path) -> None:
    import test_loader as tl
    from seer_pipeline.data.loader import build_loader

    upload_dir(tiny_shards, f"s3://{s3_bucket}/tiny")
    http = f"{s3_server.filer}/buckets/{s3_bucket}/tiny"  # the filer: a plain HTTP server with Range
    a = tl.take(build_loader(tl.cfg(str(tiny_shards), workers=0, batch_size=2), 0, 1), 6)
    b = tl.take(build_loader(tl.cfg(http, workers=0, batch_size=2), 0, 1), 6)
    for (ea, ua, va), (eb, ub, vb) in zip(a, b):
        assert (ea, ua) == (eb, ub) and all(torch.equal(x, y) for x, y in zip(va, vb))
    from data_prep.verify import verify

    assert verify(http) == []


@pytest.mark.slow
def test_credentials_never_logged(endpoint: str, s3_bucket: str, photo_dir: Path, tmp_path: Path) -> None:
    r = _cli("--log-level", "DEBUG", "build", str(photo_dir), "--out", f"s3://{s3_bucket}/c", "--maxcount", "6",
             "--no-progress", "--staging", str(tmp_path / "st"))
    assert r.returncode == 0, r.stderr
    assert "uploading to" in r.stderr  # our own DEBUG/INFO lines are there
    text = r.stdout + r.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text


def test_http_server_without_range_support(tmp_path: Path) -> None:
    """Python's http.server ignores Range (answers 200 with the whole file): still exact bytes."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    data = random.Random(7).randbytes(300_000)
    (tmp_path / "blob").write_bytes(data)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/blob"
        f = reader.RemoteFile(url, window=50_000)
        f.seek(123_456)
        assert f.read(1000) == data[123_456:124_456]
        f.seek(0)
        assert f.readall() == data
        with pytest.raises(FileNotFoundError):
            reader.read_bytes(url + "-nope")
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("status", [500, 429])
def test_500_and_429_are_retried(endpoint: str, s3_bucket: str, status: int) -> None:
    data = random.Random(status).randbytes(500_000)
    objects.put_bytes(f"s3://{s3_bucket}/blob", data)
    faults = Faults(throttle_every=2, throttle_status=status)
    with FaultProxy(endpoint, faults) as proxy:
        client.set_endpoint(proxy.endpoint)
        f = reader.RemoteFile(f"s3://{s3_bucket}/blob", window=50_000, policy=reader.RetryPolicy(5, 0.001, 0.01))
        assert f.readall() == data and f.retries == faults.counts["throttled"] >= 5
    client.set_endpoint(None)


@pytest.mark.slow
def test_seaweedfs_idle_cut_is_resumed(tmp_path: Path, s3_server, monkeypatch) -> None:
    """SeaweedFS's gateway cuts a GET whose reader pauses past -s3.idleTimeout (1 s here); the
    reader continues from the exact byte. Its own server: the session one keeps the default."""
    from s3_server import start_server

    srv = start_server(tmp_path / "idle", idle_timeout_s=1)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", srv.endpoint)
        client.reset_clients()
        srv.make_bucket("idle")
        data = random.Random(11).randbytes(20 << 20)  # more than the socket buffers hold
        objects.put_bytes("s3://idle/blob", data)
        f = reader.RemoteFile("s3://idle/blob")
        got = f.read(1000)
        time.sleep(3)  # a loader worker busy decoding, its stream idle
        got += f.read(5 << 20)
        time.sleep(3)
        got += f.readall()
        assert got == data and f.retries >= 1, f.retries
    finally:
        srv.stop()
        client.reset_clients()


def test_resampled_mode_over_an_s3_pattern(endpoint: str, s3_bucket: str, tiny_shards: Path) -> None:
    import test_loader as tl
    from seer_pipeline.data.loader import build_loader

    upload_dir(tiny_shards, f"s3://{s3_bucket}/tiny")
    pattern = f"s3://{s3_bucket}/tiny/shard-{{000000..000002}}.tar"
    ld = build_loader(tl.cfg(pattern, workers=0, batch_size=2, shuffle_buffer=2, epoch_samples=8), 0, 1)
    assert not ld.exact and len(ld.shards) == 3 and ld.batches_per_epoch == 4
    got = tl.take(ld, 5)
    assert [e for e, _, _ in got] == [0, 0, 0, 0, 1] and ld.metrics()["read_failures"] == 0


@pytest.mark.slow
def test_s3_build_removes_its_staging_copy(endpoint: str, s3_bucket: str, photo_dir: Path, tmp_path: Path) -> None:
    # issue #26: the local staging copy of the whole set was left in the temp folder.
    (tmp_path / "tmp").mkdir()
    r = _cli("build", str(photo_dir), "--out", f"s3://{s3_bucket}/staged", "--maxcount", "4", "--no-progress",
             env={"SEER_SHARDS_STAGING": str(tmp_path / "tmp")})
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "tmp" / "seer-shards-staging") in r.stderr  # where it is, while it runs
    assert list((tmp_path / "tmp").iterdir()) == []
    given = tmp_path / "given"
    given.mkdir()
    (given / "mine.txt").write_text("not the build's")
    r = _cli("build", str(photo_dir), "--out", f"s3://{s3_bucket}/staged2", "--maxcount", "4", "--no-progress",
             "--staging", str(given))
    assert r.returncode == 0, r.stderr
    assert [p.name for p in given.iterdir()] == ["mine.txt"]  # only the build's own files went
