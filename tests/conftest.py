"""Shared fixtures. Under CI (CI=true) a skipped test fails the run unless it is GPU-only."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "data" / "photos"
_ci_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not dict(report.user_properties).get("gpu"):
        _ci_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and _ci_skips:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"CI: {len(_ci_skips)} non-GPU test(s) skipped, which CI forbids:", red=True)
            for n in _ci_skips:
                tr.write_line(f"  {n}", red=True)
        session.exitstatus = 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            # The marker, not `"gpu" in item.keywords`: keywords include folder names, and a
            # checkout in a folder called gpu would skip every test.
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)
                item.user_properties.append(("gpu", True))


@pytest.fixture(scope="session")
def photo_dir() -> Path:
    """A dozen real, permissively licensed photos (see tests/data/photos/ATTRIBUTION.tsv)."""
    return PHOTOS


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards built by `seer-shards` from the 12 test photos: 3 shards of 4 samples, no resize.

    The directory holds manifest.json, skipped.tsv and shard-000000.tar .. shard-000002.tar;
    samples have `jpg` and `json` members (see data_prep/build.py).
    """
    from data_prep.build import build_shards

    out = tmp_path_factory.mktemp("tiny_shards")
    manifest = build_shards([str(PHOTOS)], out, maxcount=4, seed=0, workers=1)
    assert manifest["written"] == 12 and len(manifest["shards"]) == 3, manifest
    return out


from s3_server import s3_bucket, s3_endpoint, s3_server  # noqa: E402,F401 - the SeaweedFS S3 fixtures (tests/s3_server.py)


@pytest.fixture(autouse=True)
def _drop_seer_log_handlers():
    """A test that runs a CLI in-process (`seer-train`'s main) leaves setup_logging's handlers on
    the root logger, bound to that test's captured stdout and tmp folder; a later test's log
    record would then hit a closed stream ("--- Logging error ---" on its stderr)."""
    yield
    import logging

    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_seer", False):
            root.removeHandler(h)
            h.close()
