"""`make gpu-bundle`: the wheels `benchmarks/gpu_run.sh` installs on a lent GPU machine (docs/gpu.md).

    python3 scripts/gpu_bundle.py [--out gpu-bundle] [--pythons 3.10,3.11,3.12,3.13]
    python3 scripts/gpu_bundle.py --check-only [--out gpu-bundle]

Downloads scripts/gpu_bundle.txt's pins from PyPI for every CPython version named (pure-Python
wheels once, compiled ones per version; manylinux2014 x86_64 only: the machine is x86-64 and has
no network), drops wheels of other versions, then checks the folder: every version installs from
it alone (`pip install --dry-run --no-index`), every wheel's requirements are in the bundle or
left to the machine (MACHINE), one wheel per pin and version, and the folder fits the carry limit.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare python3: pip vendors the same library
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent
PINS = REPO / "scripts" / "gpu_bundle.txt"
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORM = "manylinux2014_x86_64"
#: Left to the machine's Python: torch (a CUDA build is gigabytes) and what is too large to carry
#: for four Pythons (PyPI wheels, 2026-12: llvmlite 0.50.0 60 MB, numpy 2.4.6 17 MB, numba 0.68.1
#: 4 MB, each per version: 80 MB for one Python alone). The lent machine's image has all four.
MACHINE = frozenset({"torch", "numpy", "numba", "llvmlite"})
#: A `run` call carries at most 64 MiB, working tree included (~3 MiB today).
LIMIT_MIB = 56
#: --isolated: PyPI alone, whatever local indexes, find-links or constraints pip's config names.
PIP = (sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check")

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-[^-]+-[^-]+\.whl$")


def pins(path: Path = PINS) -> dict[str, str]:
    """Canonical name -> pinned version, from the pins file (`name==version` lines)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}: {line!r} is not pinned with ==")
        out[canonicalize_name(name)] = version.strip()
    return out


def wheel_info(path: Path) -> tuple[str, str, str]:
    """(canonical name, version, python tag) from a wheel's file name."""
    m = _WHEEL.match(path.name)
    if not m:
        raise ValueError(f"{path.name}: not a wheel file name")
    return canonicalize_name(m["name"]), m["version"], m["py"]


def serves(py_tag: str, version: str) -> bool:
    """Whether a wheel's python tag installs on CPython `version` ("3.12")."""
    cp = "cp" + version.replace(".", "")
    return any(t in (cp, "py3", f"py{cp[2:]}") for t in py_tag.split("."))


def requirements(whl: Path, version: str) -> set[str]:
    """Canonical names a wheel needs on CPython `version` (extras left out)."""
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    env = {"python_version": version, "python_full_version": version + ".0", "extra": ""}
    needs = set()
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                needs.add(canonicalize_name(req.name))
    return needs


def problems(folder: Path, pythons: tuple[str, ...], pinned: dict[str, str]) -> list[str]:
    """What keeps `folder` from installing on each Python: missing, extra or duplicate wheels
    and requirements neither in the bundle nor left to the machine."""
    wheels = sorted(folder.glob("*.whl"))
    found = [(w, *wheel_info(w)) for w in wheels]
    errs = [f"{w.name}: not pinned in {PINS.name}" for w, n, v, _ in found if pinned.get(n) != v]
    for version in pythons:
        for name in pinned:
            hits = [w for w, n, _, py in found if n == name and serves(py, version)]
            if len(hits) != 1:
                errs.append(f"cp{version.replace('.', '')}: {len(hits)} wheels of {name} (one needed)")
            for w in hits:
                missing = requirements(w, version) - set(pinned) - MACHINE
                errs += [f"{w.name} needs {m}, neither bundled nor on the machine" for m in sorted(missing)]
    return errs


def download(folder: Path, pythons: tuple[str, ...], pinned: dict[str, str]) -> None:
    for version in pythons:
        subprocess.run([*PIP, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
                        version, "--implementation", "cp", "--platform", PLATFORM, "--dest", str(folder),
                        *(f"{n}=={v}" for n, v in pinned.items())], check=True)
    for w in folder.glob("*.whl"):  # wheels of earlier pins: two versions of one name stop pip
        n, v, _ = wheel_info(w)
        if pinned.get(n) != v:
            w.unlink()


def dry_run(folder: Path, version: str) -> subprocess.CompletedProcess[str]:
    """pip's own answer: does CPython `version` install the pins from `folder` alone?"""
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run([*PIP, "install", "--dry-run", "--no-index", "--no-deps", "--only-binary=:all:",
                               "--find-links", str(folder),
                               "--python-version", version, "--implementation", "cp", "--platform", PLATFORM,
                               "--target", tmp, "-r", str(PINS)], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "gpu-bundle")
    ap.add_argument("--pythons", default=",".join(PYTHONS), help="CPython versions, comma-separated")
    ap.add_argument("--check-only", action="store_true", help="check an existing folder, download nothing")
    args = ap.parse_args(argv)
    pythons = tuple(v.strip() for v in args.pythons.split(",") if v.strip())
    pinned = pins()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.check_only:
        download(args.out, pythons, pinned)
    errs = problems(args.out, pythons, pinned)
    for version in pythons:
        r = dry_run(args.out, version)
        if r.returncode != 0:
            errs.append(f"cp{version.replace('.', '')}: pip install --dry-run --no-index failed: "
                        + (r.stderr.strip().splitlines() or ["?"])[-1])
        else:
            print(f"[gpu-bundle] cp{version.replace('.', '')}: " + r.stdout.strip().splitlines()[-1])
    size = sum(w.stat().st_size for w in args.out.glob("*.whl"))
    print(f"[gpu-bundle] {args.out}: {len(list(args.out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB "
          f"(limit {LIMIT_MIB} MiB); left to the machine: {', '.join(sorted(MACHINE))}")
    if size > LIMIT_MIB * 2**20:
        errs.append(f"{size / 2**20:.1f} MiB is over {LIMIT_MIB} MiB")
    for e in errs:
        print(f"[gpu-bundle] ERROR {e}", file=sys.stderr)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
