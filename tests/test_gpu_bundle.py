"""`make gpu-bundle` and benchmarks/gpu_run.sh (issue 20): the wheels a GPU machine without
network installs, and the refusals that stop the check in seconds when something is missing.
Downloading is left out here (it needs PyPI); docs/gpu.md records the full run."""
from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import gpu_env  # noqa: E402  (the repository root is no installed package)

sys.path.insert(0, str(REPO / "scripts"))
import gpu_bundle  # noqa: E402  (scripts/ is no package)


def test_pins_are_within_the_project_ranges_and_cover_the_bundled_modules() -> None:
    pinned = gpu_bundle.pins()
    reqs = [Requirement(line) for line in md.requires("seer_pipeline") or []]  # pyproject, as installed
    deps = {canonicalize_name(r.name): r for r in reqs if r.marker is None}
    assert {"pillow", "simplejpeg", "omegaconf", "numba", "torch"} <= set(deps)
    for name, version in pinned.items():
        if name in deps:
            assert deps[name].specifier.contains(version), (name, version, deps[name])
    # What gpu_env expects from the machine is what the bundle leaves out, and vice versa.
    assert {m for m, src in gpu_env.NEEDED.items() if src == "machine"} == gpu_bundle.MACHINE - {"torch"}
    assert {"pillow", "simplejpeg", "omegaconf", "pyyaml"} == set(pinned)
    assert not set(pinned) & gpu_bundle.MACHINE


def _wheel(folder: Path, name: str, version: str, tag: str, requires: tuple[str, ...] = ()) -> Path:
    path = folder / f"{name}-{version}-{tag}-{'none-any' if tag == 'py3' else f'{tag}-manylinux2014_x86_64'}.whl"
    with zipfile.ZipFile(path, "w") as z:
        meta = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


def test_problems_names_missing_stale_duplicate_and_unmet_wheels(tmp_path: Path) -> None:
    pinned = {"omegaconf": "2.4.0", "simplejpeg": "1.9.0", "pyyaml": "6.0.4"}
    _wheel(tmp_path, "omegaconf", "2.4.0", "py3", ("PyYAML>=5.1.0", 'sphinx; extra == "dev"'))
    for tag in ("cp311", "cp312"):
        _wheel(tmp_path, "simplejpeg", "1.9.0", tag, ("numpy>=1.19.3",))
        _wheel(tmp_path, "PyYAML", "6.0.4", tag)
    assert gpu_bundle.problems(tmp_path, ("3.11", "3.12"), pinned) == []  # numpy: the machine's
    assert gpu_bundle.problems(tmp_path, ("3.13",), pinned) == [
        "cp313: 0 wheels of simplejpeg (one needed)", "cp313: 0 wheels of pyyaml (one needed)"]
    _wheel(tmp_path, "simplejpeg", "1.8.0", "cp311")
    _wheel(tmp_path, "pyyaml", "6.0.4", "py3", ("tomli; python_version < '3.11'",))
    errs = gpu_bundle.problems(tmp_path, ("3.10", "3.11"), pinned)
    assert "simplejpeg-1.8.0-cp311-cp311-manylinux2014_x86_64.whl: not pinned in gpu_bundle.txt" in errs
    assert "cp311: 2 wheels of pyyaml (one needed)" in errs and "cp311: 2 wheels of simplejpeg (one needed)" in errs
    # tomli only below 3.11: reported once, for cp310.
    assert errs.count("pyyaml-6.0.4-py3-none-any.whl needs tomli, neither bundled nor on the machine") == 1


@pytest.mark.parametrize("case", ["no folder", "no wheels for this python"])
def test_gpu_run_refuses_a_bundle_it_cannot_use(tmp_path: Path, case: str) -> None:
    bundle = tmp_path / "bundle"
    if case != "no folder":
        bundle.mkdir()
        (bundle / "pillow-12.1.1-cp39-cp39-manylinux2014_x86_64.whl").write_bytes(b"")
    env = {**os.environ, "SEER_GPU_BUNDLE": str(bundle), "SEER_GPU_SITE": str(tmp_path / "site"),
           "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), "--smoke"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    tag = "cp%d%d" % sys.version_info[:2]
    want = "no " + str(bundle) + "/ folder" if case == "no folder" else f"has no wheels for {tag}"
    assert r.stderr.startswith("gpu_run: ") and want in r.stderr and "make gpu-bundle" in r.stderr
    assert not (tmp_path / "site").exists()


def test_preflight_refuses_a_torch_outside_the_tested_range(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.delenv("SEER_UNTESTED_TORCH", raising=False)
    assert gpu_env.preflight() is None  # this venv: the tested CPU torch and every module
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")  # the lent image's torch (2026-11)
    why = gpu_env.preflight()
    assert why is not None and why.startswith("gpu_check: torch 2.11.0+cu130 is outside the tested range >=2.13,<2.15")
    assert "SEER_UNTESTED_TORCH=1" in why and "\n" not in why
    monkeypatch.setenv("SEER_UNTESTED_TORCH", "1")
    assert gpu_env.preflight() is None


@pytest.mark.parametrize("module,where", [("numba", "the machine's Python must have it"),
                                          ("simplejpeg", "it comes from gpu-bundle/")])
def test_preflight_names_a_missing_module_and_where_it_comes_from(
        monkeypatch: pytest.MonkeyPatch, module: str, where: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when absent
    why = gpu_env.preflight()
    assert why is not None and why.startswith(f"gpu_check: cannot import {module} (") and where in why
    assert "docs/gpu.md" in why and "\n" not in why
