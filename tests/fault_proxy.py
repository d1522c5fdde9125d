"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the S3 test server.

Requests are forwarded unchanged (the Host header too, so SigV4 signatures still match); GET
answers with a body can be cut mid-body (headers promise the full length, half is sent, the socket
is shut), replaced by `503 SlowDown` + Retry-After, stalled mid-body, or delayed. Faults are
deterministic: every Nth GET, counted, so a test knows how many it caused.
"""
from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Tuple
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Faults:
    drop_every: int = 0  # every Nth body GET: send half the body, then cut the connection
    throttle_every: int = 0  # every Nth GET: 503 SlowDown with Retry-After (no upstream call)
    throttle_status: int = 503  # or 500 / 429, as SeaweedFS answers under many concurrent requests
    retry_after_s: int = 0
    stall_every: int = 0  # every Nth body GET: send half, then go silent for stall_s (idle cut)
    stall_s: float = 0.0
    delay_s: float = 0.0  # before every answer
    only: str = ""  # faults only for request paths containing this ("" = all)
    # Hostile servers (issue 24), answered by the proxy itself:
    grow_total: int = 0  # every ranged answer declares a Content-Range total this much larger than
    #                      the last; ranges past the real end are answered with zeros
    endless: str = ""  # GETs of paths containing this: 206 with total "*", spaces forever
    endless_listing: bool = False  # ListObjectsV2 answers: always truncated, a fresh token each time
    counts: Dict[str, int] = field(default_factory=lambda: {"gets": 0, "dropped": 0, "throttled": 0,
                                                            "stalled": 0, "requests": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, method: str, path: str) -> Tuple[str, int]:
        with self.lock:
            self.counts["requests"] += 1
            if method != "GET" or self.only not in path:
                return "pass", 0
            self.counts["gets"] += 1
            n = self.counts["gets"]
        if self.throttle_every and n % self.throttle_every == 0:
            return "throttle", n
        if self.drop_every and n % self.drop_every == 0:
            return "drop", n
        if self.stall_every and n % self.stall_every == 0:
            return "stall", n
        return "pass", n

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1


class FaultProxy:
    """`with FaultProxy("http://127.0.0.1:PORT", Faults(...)) as p: p.endpoint ...`"""

    def __init__(self, upstream: str, faults: Optional[Faults] = None) -> None:
        u = urlsplit(upstream)
        assert u.hostname in ("127.0.0.1", "localhost"), "the proxy forwards to loopback only"
        self.upstream = (u.hostname, u.port or 80)
        self.faults = faults or Faults()
        self.real_sizes: Dict[str, int] = {}  # grow_total: each path's true size, from the upstream
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action, _ = proxy.faults.decide(self.command, self.path)
                if proxy.faults.delay_s:
                    time.sleep(proxy.faults.delay_s)
                if self.command == "GET" and proxy.faults.endless and proxy.faults.endless in self.path:
                    return self._endless()
                if self.command == "GET" and proxy.faults.endless_listing and "list-type=2" in self.path:
                    return self._listing()
                if action == "throttle":
                    proxy.faults.count("throttled")
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(proxy.faults.throttle_status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Retry-After", str(proxy.faults.retry_after_s))
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    hdrs = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body or None, headers=hdrs)
                    r = conn.getresponse()
                    data = r.read()
                    status, rh = r.status, [(k, v) for k, v in r.getheaders() if k.lower() not in _HOP
                                            and k.lower() != "content-length"]
                finally:
                    conn.close()
                if (proxy.faults.grow_total and self.command == "GET" and self.headers.get("Range")
                        and proxy.faults.only in self.path):
                    status, rh, data = self._grown(status, rh, data)
                self.send_response(status)
                for k, v in rh:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                cut = action in ("drop", "stall") and status in (200, 206) and len(data) > 1
                if not cut:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if action == "stall":
                    proxy.faults.count("stalled")
                    time.sleep(proxy.faults.stall_s)
                else:
                    proxy.faults.count("dropped")
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _grown(self, status: int, rh: list, data: bytes) -> Tuple[int, list, bytes]:
                """The answer with a Content-Range total larger on every call (zeros past the end)."""
                with proxy.faults.lock:
                    proxy.faults.counts["grown"] = k = proxy.faults.counts.get("grown", 0) + 1
                m = re.match(r"bytes=(\d+)-(\d*)", self.headers["Range"])
                cr = next((v for n, v in rh if n.lower() == "content-range"), "")
                real = int(cr.rsplit("/", 1)[1]) if "/" in cr and cr.rsplit("/", 1)[1].isdigit() else None
                if real is not None:
                    proxy.real_sizes[self.path.split("?")[0]] = real
                real = proxy.real_sizes.get(self.path.split("?")[0]) if real is None else real
                if m is None or real is None or status not in (206, 416):
                    return status, rh, data
                total = real + k * proxy.faults.grow_total
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else total - 1, total - 1)
                if start >= real:
                    data = b"\0" * max(0, end - start + 1)
                rh = [(n, v) for n, v in rh if n.lower() not in ("content-range", "etag", "last-modified")]
                return 206, rh + [("Content-Range", f"bytes {start}-{start + len(data) - 1}/{total}")], data

            def _endless(self) -> None:
                start = int(re.match(r"bytes=(\d+)", self.headers.get("Range", "bytes=0")).group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{start + (1 << 40)}/*")
                self.send_header("Content-Length", str(1 << 40))
                self.end_headers()
                self.close_connection = True
                try:
                    while True:
                        self.wfile.write(b" " * (1 << 16))
                except OSError:  # the reader hung up: what a bounded reader does
                    pass

            def _listing(self) -> None:
                with proxy.faults.lock:
                    proxy.faults.counts["pages"] = n = proxy.faults.counts.get("pages", 0) + 1
                keys = "".join(f"<Contents><Key>x/junk-{n}-{i}</Key><Size>1</Size></Contents>" for i in range(1000))
                body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><Prefix></Prefix>'
                        f"<KeyCount>1000</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>"
                        f"{keys}<NextContinuationToken>t{n}</NextContinuationToken></ListBucketResult>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
