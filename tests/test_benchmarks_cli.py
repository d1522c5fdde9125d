"""The benchmark scripts still import after the package moves, and the loader benchmark's
candidate spec resolves. Neither is exercised by a benchmark run without external inputs: the
restructure left `bench_loader.py --reference FILE` pointing at `seer_pipeline.data:multicrop_factory`,
which no longer existed, and only a run against an external harness would have shown it."""
from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Scripts put the repository (and tests/) on sys.path themselves; keep that local to the test.
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = runpy.run_path(str(script), run_name="benchmark_import_check")
    if 'if __name__ == "__main__"' in script.read_text():
        assert callable(namespace.get("main")), f"{script.name} has no main()"
    else:  # a module the scripts share (gpu_report, gpu_env): some script must use it
        users = [p.name for p in SCRIPTS if p != script and script.stem in p.read_text()]
        assert users, f"{script.name} is neither a script (no __main__ guard) nor used by one"


def test_loader_benchmark_candidate_resolves(photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    ns = runpy.run_path(str(REPO / "benchmarks" / "bench_loader.py"), run_name="benchmark_import_check")
    module, attr = ns["CANDIDATE"].split(":")
    factory = getattr(importlib.import_module(module), attr)
    # The external harness's contract: factory(sizes, counts, min_scales, max_scales) returns a
    # callable from encoded bytes to the list of crop tensors.
    transform = factory([224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14])
    photo = next(p for p in sorted(photo_dir.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg"))
    crops = transform(photo.read_bytes())
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_loader_benchmark_default_photos_fill_its_batches(photo_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`make bench`'s default (the 12 test photos) must not stop at "12 samples cannot fill one
    batch of 16" (issue 26): the photos are repeated up to the images asked for."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    ns = runpy.run_path(str(REPO / "benchmarks" / "bench_loader.py"), run_name="benchmark_import_check")
    rate = ns["loader_throughput"](photo_dir, 0, 12, 16, tmp_path)
    assert rate > 0


def test_make_bench_runs_every_benchmark_even_after_a_failure() -> None:
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("needs make")
    out = subprocess.run(["make", "-n", "-B", "bench"], cwd=REPO, capture_output=True, text=True,
                         timeout=60).stdout
    for name in ("bench_shards", "bench_loader", "bench_codecs", "bench_trainer"):
        assert f'{name} failed"; rc=1' in out, name
