"""The resume guarantees with shards in S3, next to the same checks on a local folder:
`seer-shards build` killed with SIGKILL (also mid multipart upload) then rerun; the loader's exact
resume (same and other world size); `seer-train` preempted and resumed bitwise."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import test_loader as tl
from tests import faultinject
from tests.s3_server import wait_for_killed_clients
import test_shards_resume as tsr
import test_trainer as ttr
from seer_pipeline.data.loader import build_loader
from seer_pipeline.shards.synth import photo_variants, write_shards
from seer_pipeline.store import objects, reader
from seer_pipeline.store.url import parse

dump = tsr.dump  # the ~130-input dump fixture of the local resume tests
reference_run = ttr.reference_run  # an uninterrupted seer-train run on the local tiny shards


def _fault_env(where: str) -> dict[str, str]:
    """The kills come from the one test-only fault mechanism (tests/faultinject): shards_kill
    (scan:N, write:I) or shards_upload (I) patch named seams at start-up."""
    stage, _, n = where.partition(":")
    return faultinject.env(f"shards_upload:{n}" if stage == "upload" else f"shards_kill:{where}")


def _build_cmd(dump: Path, out: str, stage: Path) -> list[str]:
    cmd = tsr._cmd(dump, Path("/unused"))
    i = cmd.index("--out")
    return cmd[:i] + ["--out", out, "--staging", str(stage)] + cmd[i + 2:]


def _objects_state(url: str) -> dict[str, tuple]:
    """Shard objects -> (size, ETag, LastModified): an upload again would change the last two."""
    from seer_pipeline.store.client import s3_client

    u = parse(url)
    out = {}
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=u.host, Prefix=u.key + "/"):
        for o in page.get("Contents", []):
            name = o["Key"].rsplit("/", 1)[-1]
            if name.startswith("shard-"):
                out[name] = (o["Size"], o["ETag"], o["LastModified"])
    return out


def _complete(out: str, by_name: dict) -> set[str]:
    """The shard objects a killed build left that a rerun may keep: the right size and sha256.

    A PUT cut by the kill is not atomic on every server: SeaweedFS lists the object at once with
    the bytes received so far (CI saw a 0-byte shard object); AWS S3 never shows one. Such an
    object must not be trusted: the rerun uploads it again and the final manifest must still equal
    the reference. An object of the right size with the wrong content is a real failure.
    """
    complete = set()
    for name, size in objects.list_prefix(out).items():
        if not name.startswith("shard-"):
            continue  # manifest.json and skipped.tsv: the callers check those
        assert name in by_name, f"{name}: not a shard of the reference set"
        if size == by_name[name]["bytes"]:
            assert objects.head(f"{out}/{name}")["sha256"] == by_name[name]["sha256"], name
            complete.add(name)
    return complete


@pytest.mark.slow
@pytest.mark.parametrize("where", ["scan:40", "write:3", "upload:3"])
def test_s3_build_killed_at_the_worst_moment_then_resumed(dump: Path, tmp_path: Path, s3_endpoint: str,
                                                          s3_bucket: str, where: str) -> None:
    ref = tsr._run(dump, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    want = tsr._result(tmp_path / "ref")
    out = f"s3://{s3_bucket}/set"
    cmd = _build_cmd(dump, out, tmp_path / "stage")
    crashed = subprocess.run(cmd, cwd=tsr.REPO, capture_output=True, text=True, timeout=300,
                             env=_fault_env(where))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    wait_for_killed_clients(s3_endpoint)  # uploads of other threads may still land
    names = objects.list_prefix(out)
    assert "manifest.json" not in names
    by_name = {s["name"]: s for s in want["shards"]}
    complete = _complete(out, by_name)
    incomplete = list(objects.iter_incomplete(out))
    if where.startswith("upload"):
        assert "shard-000003.tar" not in names and [k.rsplit("/", 1)[-1] for k, _ in incomplete] == ["shard-000003.tar"]
    before = {n: st for n, st in _objects_state(out).items() if n in complete}
    done = subprocess.run(cmd, cwd=tsr.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    man = json.loads(reader.read_bytes(f"{out}/manifest.json"))
    man.pop("config")
    assert man == want  # the shards of an uninterrupted local run, byte for byte (sha256)
    after = _objects_state(out)
    assert set(after) == set(by_name)
    assert all(after[n] == st for n, st in before.items()), "a completed shard was uploaded again"
    assert list(objects.iter_incomplete(out)) == []


@pytest.mark.slow
def test_s3_build_killed_at_random_moments_then_resumed(dump: Path, tmp_path: Path, s3_endpoint: str,
                                                        s3_bucket: str) -> None:
    t0 = time.monotonic()
    ref = tsr._run(dump, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    t_ref = time.monotonic() - t0
    want = tsr._result(tmp_path / "ref")
    out = f"s3://{s3_bucket}/set"
    cmd = _build_cmd(dump, out, tmp_path / "stage")
    rng = random.Random(int(os.environ.get("SEER_TEST_SEED", "0")) or None)
    kept: dict[str, tuple] = {}
    for round_ in range(3):
        proc = subprocess.Popen(cmd, cwd=tsr.REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.5) * t_ref)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        wait_for_killed_clients(s3_endpoint)
        complete = _complete(out, {s["name"]: s for s in want["shards"]})
        for name, st in _objects_state(out).items():
            if name in complete:
                assert kept.setdefault(name, st) == st, f"{name} was uploaded again"
    done = subprocess.run(cmd, cwd=tsr.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    man = json.loads(reader.read_bytes(f"{out}/manifest.json"))
    man.pop("config")
    assert man == want
    after = _objects_state(out)
    moved = {n: (st, after.get(n)) for n, st in kept.items() if after.get(n) != st}
    assert not moved, f"completed shards uploaded again by the last run: {moved}"


# ---- loader -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_shards(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> str:
    out = tmp_path_factory.mktemp("store_loader_shards")
    return str(write_shards(out, photo_variants(photo_dir, tl.N_SAMPLES, max_side=48), tl.PER_SHARD))


@pytest.fixture(params=["local", "s3"])
def shards(request: pytest.FixtureRequest, local_shards: str) -> str:
    if request.param == "local":
        return local_shards
    request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    for p in sorted(Path(local_shards).iterdir()):
        objects.put_bytes(f"s3://{bucket}/shards/{p.name}", p.read_bytes())
    return f"s3://{bucket}/shards"


def test_loader_resume_same_world(shards: str) -> None:
    tl.test_resume_same_world_identical_batches(shards, 3)


def test_loader_resume_other_world(shards: str) -> None:
    tl.test_resume_other_world_exact_complement(shards, 2, 1)


def test_s3_batches_equal_local_batches(local_shards: str, s3_endpoint: str, s3_bucket: str) -> None:
    for p in sorted(Path(local_shards).iterdir()):
        objects.put_bytes(f"s3://{s3_bucket}/shards/{p.name}", p.read_bytes())
    a = tl.take(build_loader(tl.cfg(local_shards), 1, 2), 9)
    b = tl.take(build_loader(tl.cfg(f"s3://{s3_bucket}/shards"), 1, 2), 9)
    for (ea, ua, va), (eb, ub, vb) in zip(a, b):
        assert (ea, ua) == (eb, ub) and all(torch.equal(x, y) for x, y in zip(va, vb))


# ---- seer-train ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_seer_train_on_s3_preempted_resumes_bitwise(reference_run: Path, tiny_shards: Path, tmp_path: Path,
                                                    s3_endpoint: str, s3_bucket: str) -> None:
    for p in sorted(tiny_shards.iterdir()):
        if p.is_file():
            objects.put_bytes(f"s3://{s3_bucket}/tiny/{p.name}", p.read_bytes())
    url = f"s3://{s3_bucket}/tiny"
    run = tmp_path / "run"
    env = ttr._env()
    proc = subprocess.Popen(ttr._cmd(run, url), cwd=ttr.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(ttr._rows(run)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == ttr.PREEMPTED, out[-3000:]
    k = len(ttr._rows(run))
    assert 5 <= k < ttr.STEPS, out[-2000:]
    res = subprocess.run(ttr._cmd(run, url), cwd=ttr.REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows, ref = ttr._rows(run), ttr._rows(reference_run)
    assert [r["step"] for r in rows] == list(range(1, ttr.STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]  # == the local-shard run, bitwise
    for f in run.rglob("*"):  # the test credentials never reach the run's files
        if f.is_file() and f.stat().st_size < 5 << 20:
            assert b"seer-test-secret" not in f.read_bytes(), f
