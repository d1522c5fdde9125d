"""seer-eval on a DINO run: the teacher's trunk by default (as DINO evaluates), the student's
with --student; --student on anything but a run folder is a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seer_pipeline.eval import cli, features
from seer_pipeline.weights.run import read_run
from tests.test_eval import _imagefolder
from tests.test_trainer import _cmd, _run

STEPS = 4


@pytest.fixture(scope="module")
def dino_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dino_eval") / "run"
    cmd = [c if c != "cpu_tiny" else "cpu_tiny_dino" for c in _cmd(run, tiny_shards)]
    cmd = [c for c in cmd if c != "dist.nproc=2"] + [f"train.steps={STEPS}", f"ckpt.every={STEPS}"]
    res = _run(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_eval_loads_the_teacher_by_default_and_the_student_on_request(
        dino_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    teacher, _, _ = read_run(dino_run, which="teacher")
    student, _, _ = read_run(dino_run, which="student")
    assert not _same(teacher, student)  # the EMA lags the student: the choice is visible

    spec = features.parse_checkpoint(str(dino_run))
    assert _same(features.load_trunk(spec).state_dict(), teacher) and spec.weights_of == "teacher"
    spec = features.parse_checkpoint(str(dino_run))
    spec.which = "student"
    assert _same(features.load_trunk(spec).state_dict(), student) and spec.weights_of == "model"

    root = _imagefolder(tmp_path / "folder")
    argv = ["knn", "--checkpoint", str(dino_run), "--data", f"imagefolder:{root}", "--size", "16",
            "--bn-images", "0", "--no-progress"]
    seen = {}
    for extra, name in (([], "teacher"), (["--student"], "student")):
        out = tmp_path / f"{name}.json"
        assert cli.main([*argv, *extra, "--out", str(out)]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["checkpoint_step"] == STEPS and json.loads(out.read_text()) == res
        seen[name] = res["weights_of"]
    assert seen == {"teacher": "teacher", "student": "model"}  # DCP entries: teacher / model


def test_student_needs_a_run_folder(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["knn", "--checkpoint", "random:cpu_tiny", "--data", "fashion-mnist", "--student"]) == 2
    assert "--student picks a model of a run folder" in capsys.readouterr().err
