"""A folder that does not exist is named as such by every tool that reads one, not reported as
empty metrics, an unfinished build or a missing checkpoint; and nothing is written."""
from __future__ import annotations

import pytest

from data_prep import cli as shards_cli
from seer_pipeline.checkpoint import cli as ckpt_cli
from seer_pipeline.train import plot


@pytest.mark.parametrize("tool, argv, expect", [
    (plot.main, ["{missing}"], "seer-plot: no such folder: {missing}"),
    (shards_cli.main, ["verify", "{missing}"], "seer-shards verify: error: no such folder: {missing}"),
    (shards_cli.main, ["stats", "{missing}"], "seer-shards stats: error: no such folder: {missing}"),
    (ckpt_cli.main, ["consolidate", "{missing}", "--out", "{tmp}/t.pt"],
     "seer-ckpt consolidate: no such folder or file: {missing}"),
    (ckpt_cli.main, ["export", "{missing}", "--format", "timm", "--out", "{tmp}/t.pt"],
     "seer-ckpt export: no such folder or file: {missing}"),
])
def test_missing_folder_is_named(tool, argv, expect, tmp_path, capsys):
    missing = str(tmp_path / "runs" / "nope")
    fill = lambda s: s.format(missing=missing, tmp=tmp_path)  # noqa: E731
    rc = tool([fill(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err == [fill(expect)]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, no --out file
