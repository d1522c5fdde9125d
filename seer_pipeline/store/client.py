"""S3 and HTTP clients, built from the standard AWS places, one per process.

Credentials and the endpoint come from where every AWS tool looks: the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, AWS_ENDPOINT_URL —
botocore >= 1.31 reads the last itself), ~/.aws/config and ~/.aws/credentials. `--endpoint-url`
/ `data.s3_endpoint` override the endpoint only. Nothing here logs or returns a credential.

boto3 (not s3fs): s3fs runs botocore under aiobotocore's event loop and pins botocore versions;
the loader's workers want a plain blocking stream whose every byte offset we control.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, Optional, Tuple

_lock = threading.Lock()
_clients: Dict[Tuple[int, str, bool], Any] = {}
_endpoint_override: Optional[str] = None
# One session per process tree: a forked loader worker inherits its parsed service models, so its
# own client costs ~10 ms instead of the ~0.3 s of a cold one. Clients (sockets) stay per pid.
_session: Any = None

# Socket timeouts: a stalled GET (a gateway that stops sending, e.g. SeaweedFS -s3.idleTimeout)
# surfaces as a ReadTimeoutError that the reader retries from the exact byte.
CONNECT_TIMEOUT_S = float(os.environ.get("SEER_S3_CONNECT_TIMEOUT_S", "10"))
READ_TIMEOUT_S = float(os.environ.get("SEER_S3_READ_TIMEOUT_S", "60"))


def set_endpoint(endpoint: Optional[str]) -> None:
    """Override the S3 endpoint for this process (`--endpoint-url`, `data.s3_endpoint`); None/"" = default."""
    global _endpoint_override
    _endpoint_override = endpoint or None


def endpoint() -> Optional[str]:
    """The endpoint in use: the override, else AWS_ENDPOINT_URL(_S3), else AWS itself (None)."""
    return (_endpoint_override or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def s3_client(endpoint_url: Optional[str] = None, streaming: bool = False) -> Any:
    """A boto3 S3 client for this process (clients are not fork-safe: cached per pid).

    streaming=True: no botocore retries, so the reader sees every error and resumes from the byte
    where a body broke (botocore would retry only the request, not a body cut mid-way);
    otherwise botocore's "standard" mode retries throttling and 5xx on API calls (PUT, HEAD, LIST).
    """
    url = endpoint_url or endpoint() or ""
    key = (os.getpid(), url, streaming)
    with _lock:
        c = _clients.get(key)
        if c is None:
            import boto3  # lazy: boto3/urllib3 load on the first remote access, not at import
            from botocore.config import Config  # lazy: boto3/urllib3 load on the first remote access, not at import

            # botocore's DEBUG log prints request headers (the access key id, the signature):
            # keep the AWS libraries at WARNING whatever level the application logs at.
            for name in ("botocore", "boto3", "s3transfer", "urllib3"):
                logging.getLogger(name).setLevel(logging.WARNING)

            retries = {"total_max_attempts": 1} if streaming else {"mode": "standard", "max_attempts": 8}
            cfg = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, retries=retries,
                         max_pool_connections=32, s3={"addressing_style": "path"} if url else None,
                         # SeaweedFS and other non-AWS stores reject the newer default checksums.
                         request_checksum_calculation="when_required",
                         response_checksum_validation="when_required")
            global _session
            if _session is None:
                _session = boto3.session.Session()
            c = _session.client("s3", endpoint_url=url or None, config=cfg)
            _clients[key] = c
        return c


_http_pool: Dict[int, Any] = {}


def http_pool() -> Any:
    """A urllib3 PoolManager (urllib3 comes with botocore) for http(s):// shards, per process."""
    pid = os.getpid()
    with _lock:
        p = _http_pool.get(pid)
        if p is None:
            import urllib3  # lazy: boto3/urllib3 load on the first remote access, not at import

            p = urllib3.PoolManager(maxsize=16, retries=False,
                                    timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S))
            _http_pool[pid] = p
        return p


def reset_clients() -> None:
    """Forget cached clients (after changing the endpoint or the timeouts above)."""
    with _lock:
        _clients.clear()
        _http_pool.clear()
