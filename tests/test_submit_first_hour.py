"""seer-submit refuses a training job that cannot start before sbatch, and a submission sbatch
refuses leaves no run folder behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch import submit


def _shards(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text('{"shards": [{"name": "shard-000000.tar", "count": 1}]}')
    (d / "shard-000000.tar").write_bytes(b"")
    return d


@pytest.mark.parametrize("shards, expect", [
    (None, "data.shards is empty"),
    ("{tmp}/nope", "data.shards={tmp}/nope: no such folder or file"),
    ("{tmp}", "has no manifest.json"),
])
def test_unstartable_job_is_not_queued(tmp_path, capsys, monkeypatch, shards, expect):
    def no_sbatch(*a, **k):
        raise AssertionError("the executor must not be built for a job that cannot start")

    monkeypatch.setattr(submit, "build_executor", no_sbatch)
    run = tmp_path / "run"
    extra = [] if shards is None else [f"data.shards={shards.format(tmp=tmp_path)}"]
    rc = submit.main(["--config", "cpu_tiny", f"run.dir={run}", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and expect.format(tmp=tmp_path) in err[0], err
    assert not run.exists()


def test_dry_run_warns_about_shards_and_still_shows_the_script(tmp_path, capsys):
    rc = submit.main(["--config", "cpu_tiny", f"run.dir={tmp_path / 'run'}", "--dry-run"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out.startswith("#!/bin/bash")
    assert "seer-submit: warning: data.shards is empty" in cap.err


def test_refused_submission_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    class Refusing:
        def __init__(self, folder: Path) -> None:
            self.folder = folder

        def submit(self, job):  # noqa: ANN001 - as submitit: job files first, then sbatch
            (self.folder / "slurm").mkdir(parents=True)
            (self.folder / "slurm" / "submission_file.sh").write_text("#!/bin/bash\n")
            raise RuntimeError("sbatch: error: invalid partition specified: gpu")

    monkeypatch.setattr(submit, "build_executor", lambda slurm, run_dir, local=False: Refusing(Path(run_dir)))
    run = tmp_path / "run"
    rc = submit.main(["--config", "cpu_tiny", f"run.dir={run}", f"data.shards={_shards(tmp_path)}"])
    assert rc == 1
    assert "invalid partition" in capsys.readouterr().err
    assert not run.exists()
    # A folder that existed before (a run being resumed) is left as it was.
    run.mkdir()
    (run / "keep").write_text("x")
    assert submit.main(["--config", "cpu_tiny", f"run.dir={run}", f"data.shards={_shards(tmp_path / 'b')}"]) == 1
    assert (run / "keep").exists()
