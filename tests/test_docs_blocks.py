"""Every ```bash block of README.md and docs/*.md runs as written, on tiny data, on CPU.

The blocks run in document order (README first, then docs/*.md by name) in one temporary folder,
so a block reads what an earlier one wrote: the README is one walk-through (shards -> train ->
consolidate -> eval -> export -> warm start). Before running, each block goes through SUBS, the
whole substitution map (sizes and paths only, never a command or a flag's meaning):

- `/data/` -> the fixture folder (a folder, a .tar.gz and a list of small JPEGs, an imagefolder
  `pets/` of 3 classes), so "/data/dump1" in the docs is a real input here;
- `train.steps=300` -> 4, `--workers 16` -> 1 (two shared CPU cores);
- every `seer-eval` command gets EVAL_CAP (subsets of Fashion-MNIST, two SGD epochs).

A block that cannot run here carries `<!-- docs-test: skip (reason) -->` on the line before its
fence; EXPECTED_SKIPS counts them per file, so a new skipped block is a visible change to this
file, not a silent one. Blocks fenced as plain ``` (output samples, diagrams) are not commands.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP_RE = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<why>.+)\)\s*-->\s*$")

EXPECTED_SKIPS = {
    "README.md": 4,            # make install/demo/test, S3, seer-submit on GPUs, make targets
    "docs/benchmarks.md": 1,   # the chaos soak: an hour on the local SLURM, as root
    "docs/object_store.md": 2,  # an S3 store
    "docs/slurm.md": 4,        # a SLURM cluster
    "docs/weights.md": 1,      # an options synopsis
}
EVAL_CAP = ("--limit-train 200 --limit-test 90 --bn-images 64 --sgd-epochs 2 --max-iter 5 "
            "--low-shot 10 --workers 1 --no-progress")
SUBS: list[tuple[str, str]] = [  # (regex, replacement); {data} is the fixture folder
    (r"/data/", "{data}/"),
    (r"\btrain\.steps=300\b", "train.steps=4"),
    (r"--workers 16\b", "--workers 1"),
    (r"^(\s*seer-eval [^#\n]*?)(\s*(#.*)?)$", r"\1 " + EVAL_CAP + r"\2"),
]


@dataclass
class Block:
    path: Path
    line: int
    text: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def extract(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            m = SKIP_RE.match(prev.strip())
            blocks.append(Block(path, start + 1, "\n".join(lines[start + 1:j]) + "\n",
                                m.group("why") if m else None))
            i = j
        i += 1
    return blocks


def substitute(text: str, data: Path) -> tuple[str, set[int]]:
    used = set()
    for n, (pat, rep) in enumerate(SUBS):
        new = re.sub(pat, rep.replace("{data}", str(data)), text, flags=re.M)
        if new != text:
            used.add(n)
        text = new
    return text, used


def all_blocks() -> list[Block]:
    return [b for p in DOC_FILES for b in extract(p)]


def test_skips_are_counted_and_reasoned():
    got: dict[str, int] = {}
    for b in all_blocks():
        if b.skip is not None:
            assert len(b.skip) > 5, f"{b.where}: a skip needs its reason"
            key = str(b.path.relative_to(REPO))
            got[key] = got.get(key, 0) + 1
    assert got == EXPECTED_SKIPS, "skipped doc blocks changed: update EXPECTED_SKIPS on purpose"


def test_every_substitution_is_used():
    """A rule no block needs any more is a stale rule: the map stays short and true."""
    used: set[int] = set()
    for b in all_blocks():
        if b.skip is None:
            used |= substitute(b.text, Path("/x"))[1]
    assert used == set(range(len(SUBS))), [SUBS[i][0] for i in set(range(len(SUBS))) - used]


def test_substitution_keeps_comments_and_commands():
    line = "seer-eval all --weights runs/tiny --data fashion-mnist   # a run folder\n"
    out, _ = substitute(line, Path("/d"))
    assert out.startswith("seer-eval all --weights runs/tiny --data fashion-mnist " + EVAL_CAP)
    assert out.rstrip().endswith("# a run folder")
    assert substitute("--out /data/shards", Path("/d"))[0] == "--out /d/shards"


def _jpeg(path: Path, rng: random.Random, colour: tuple[int, int, int] | None = None) -> None:
    from PIL import Image

    c = colour or (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    im = Image.new("RGB", (40, 40), c)
    for _ in range(40):  # some texture, so no two images are byte-identical duplicates
        im.putpixel((rng.randrange(40), rng.randrange(40)), (rng.randrange(256),) * 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90)


def make_data(data: Path) -> None:
    """The inputs the docs name under /data/: dump1/ (folder), dump2.tar.gz, list.txt, pets/."""
    rng = random.Random(0)
    for i in range(48):
        _jpeg(data / "dump1" / f"a{i:03d}.jpg", rng)
    staging = data.parent / "tar_staging"
    for i in range(24):
        _jpeg(staging / f"b{i:03d}.jpg", rng)
    with tarfile.open(data / "dump2.tar.gz", "w:gz") as t:
        for p in sorted(staging.iterdir()):
            t.add(p, arcname=p.name)
    shutil.rmtree(staging)
    listed = data.parent / "listed"
    for i in range(24):
        _jpeg(listed / f"c{i:03d}.jpg", rng)
    (data / "list.txt").write_text("".join(f"{p}\n" for p in sorted(listed.iterdir())))
    for k, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        for i in range(12):
            _jpeg(data / "pets" / f"class{k}" / f"{i:02d}.jpg", rng, colour)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~11 min at load 12 on the 2-core box, >15 min at load 20
def test_doc_blocks_run_in_order(tmp_path):
    from seer_pipeline.eval.fmnist import DEFAULT_DIR

    if not DEFAULT_DIR.is_dir():
        pytest.skip(f"{DEFAULT_DIR} missing (Debian dataset-fashion-mnist; make install adds it)")
    data = tmp_path / "data"
    make_data(data)
    work = tmp_path / "work"
    work.mkdir()
    venv_bin = Path(sys.executable).parent  # what `source .venv/bin/activate` puts first
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO),
               CUDA_VISIBLE_DEVICES="")
    ran = 0
    for b in all_blocks():
        if b.skip is not None:
            continue
        script, _ = substitute(b.text, data)
        print(f"[docs-test] {b.where}", flush=True)  # a timeout then names the block
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                           capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, (f"{b.where} failed (rc {r.returncode}):\n{script}\n--- stdout\n"
                                   f"{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
        ran += 1
    assert ran >= 5
    # The walk-through's products, each read by a later block, are all there.
    for rel in ("runs/tiny/training.png", "runs/tiny/trunk.pt", "runs/tiny/trunk_timm.pth",
                "runs/tiny/trunk_tv.pth", "runs/warm/checkpoints/latest"):
        assert (work / rel).exists(), rel
    assert (data / "shards" / "manifest.json").exists()


def _make_n(target: str) -> str:
    """The commands `make TARGET` would run from a fresh clone (-B: as if nothing were built)."""
    r = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_prints_activate_and_demo_skips_interop_venv():
    install = _make_n("install")
    assert "source .venv/bin/activate" in install
    demo = _make_n("demo")
    assert "install_interop" not in demo and ".venv-interop" not in demo
    assert "SEER_SKIP_INTEROP=1 bash scripts/install.sh" in demo
    assert "install_interop.sh" in _make_n("test")  # the interop tests still get their venv
