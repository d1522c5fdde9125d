"""`seer-shards merge`: the rerun path trusts nothing in --out (issue #24), and the merged set
holds every distinct image once across parts (issue #22, "Exact dedup across the whole set")."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from data_prep.build import build_shards
from data_prep.merge import _move, merge
from data_prep.verify import verify
from seer_pipeline.shards import format as fmt


def _parts(photo_dir: Path, tmp_path: Path, n: int = 2, inputs: list[str] | None = None) -> list[Path]:
    parts = [tmp_path / f"p{i}" for i in range(n)]
    for i, p in enumerate(parts):
        build_shards(inputs or [str(photo_dir)], p, maxcount=3, part=(i, n))
    return parts


def test_a_planted_merge_plan_moves_nothing(photo_dir: Path, tmp_path: Path) -> None:
    parts = _parts(photo_dir, tmp_path)
    args = [str(p) for p in parts]
    out = tmp_path / "m"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".seer-shards").mkdir(parents=True)
    planted = {"parts": [os.path.abspath(p) for p in args],
               "moves": [[str(victim), str(tmp_path / "moved.txt")]],
               "manifest": {"format": "seer-shards/1", "shards": []}, "skipped": []}
    (out / ".seer-shards" / "merge-plan.json").write_text(json.dumps(planted))
    with pytest.raises(ValueError, match="does not match the parts"):
        merge(args, str(out))
    assert victim.read_text() == "precious" and not (tmp_path / "moved.txt").exists()
    # A plan whose moves are right but one destination was swapped for other bytes is refused too.
    (out / ".seer-shards" / "merge-plan.json").unlink()
    man = merge(args, str(out))
    plan = json.loads((out / ".seer-shards" / "merge-plan.json").read_text())
    dst = Path(plan["moves"][0][1])
    dst.write_bytes(dst.read_bytes()[:-1] + b"\1")
    with pytest.raises(ValueError, match="sha256"):
        merge(args, str(out))


def test_an_interrupted_merge_is_finished_by_a_rerun(photo_dir: Path, tmp_path: Path, monkeypatch) -> None:
    parts = _parts(photo_dir, tmp_path)
    args = [str(p) for p in parts]
    calls = []

    def die_after_two(src: str, dst: str) -> None:  # the seam: one rename per planned move
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(src)
        _move(src, dst)

    monkeypatch.setattr("data_prep.merge._move", die_after_two)
    with pytest.raises(KeyboardInterrupt):
        merge(args, str(tmp_path / "m"))
    monkeypatch.undo()
    man = merge(args, str(tmp_path / "m"))
    assert man["written"] == 12 and verify(str(tmp_path / "m")) == []
