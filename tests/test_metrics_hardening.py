"""Issue #24: one bad line of metrics.jsonl (or an odd launch.json) blocks nothing.

Resume drops unreadable lines with a warning; seer-status and seer-plot print or draw what is
readable and never die with a traceback."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from seer_pipeline.train.metrics import MetricsLogger

GOOD = [{"step": s, "loss": 5.0 - s / 10, "lr": 0.1} for s in range(1, 7)]
BAD_LINES = {
    "non-utf8": b'{"step": 3, "note": "\xff\xfe"}',
    "json-list": b"[1, 2, 3]",
    "step-nan": b'{"step": NaN, "loss": 1.0}',
    "step-abc": b'{"step": "abc"}',
    "step-bool": b'{"step": true}',
    "step-huge": b'{"step": 1' + b"0" * 400 + b"}",
    "deep-list": b"[" * 50_000,  # under seer-status's 64 KiB tail, over the parser's depth
    "deep-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
}


def _write(run: Path, bad: bytes, where: int = 2) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r).encode() for r in GOOD]
    lines.insert(where, bad)
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_resume_drops_a_bad_line_with_a_warning(tmp_path: Path, caplog, kind: str) -> None:
    _write(tmp_path, BAD_LINES[kind])
    with caplog.at_level(logging.WARNING):
        m = MetricsLogger(tmp_path, rank=0, tensorboard=False, resumed_from=4)
    m.log_step(5, {"loss": 1.0})
    m.close()
    assert "skipped 1 unreadable line(s) (first: line 3" in caplog.text
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["resumed_from"] == 4


def test_torn_last_line_is_still_dropped_silently(tmp_path: Path, caplog) -> None:
    tmp_path.joinpath("metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in GOOD[:4]) + '{"step": 5, "lo')
    with caplog.at_level(logging.WARNING):
        MetricsLogger(tmp_path, rank=0, tensorboard=False, resumed_from=4).close()
    assert "unreadable" not in caplog.text
    assert tmp_path.joinpath("metrics.jsonl").read_text().count("\n") == 4


def test_metrics_fifo_does_not_hang_resume(tmp_path: Path, caplog) -> None:
    os.mkfifo(tmp_path / "metrics.jsonl")
    with caplog.at_level(logging.WARNING):
        m = MetricsLogger(tmp_path, rank=0, tensorboard=False, resumed_from=4)
    m.log_step(5, {"loss": 1.0})
    m.close()
    assert "not a regular file" in caplog.text
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 5


ODD_LAUNCH = [b"[]", b'{"jobs": 5}', b'{"jobs": [5]}', b'{"jobs": [{"job_id": 7}]}',
              b'{"jobs": [{"job_id": "../../etc"}]}', b'{"jobs": []}', b"[" * 200_000,
              b"\xff\xfe", b'{"jobs": [{"job_id": "12", "executor": "local"}]}']


@pytest.mark.parametrize("launch", ODD_LAUNCH, ids=range(len(ODD_LAUNCH)))
@pytest.mark.parametrize("kind", ["deep-list", "non-utf8", "json-list", "step-abc"])
def test_status_survives_odd_lines_and_launch_json(tmp_path: Path, capsys, kind: str,
                                                   launch: bytes) -> None:
    from launch.status import main as status_main

    _write(tmp_path, BAD_LINES[kind], where=len(GOOD))  # the bad line is the last one
    (tmp_path / "launch.json").write_bytes(launch)
    assert status_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"step": 6' in out  # the last readable record
    assert status_main([str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last_metrics"]["step"] == 6


def test_status_prints_a_bounded_line_for_a_huge_record(tmp_path: Path, capsys) -> None:
    from launch.status import main as status_main

    rec = {"step": 9, "x": [[["y" * 50] * 20] * 5]}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    assert status_main([str(tmp_path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("metrics:"))
    assert len(line) < 700 and "chars)" in line


def test_plot_survives_odd_lines_and_values(tmp_path: Path, capsys) -> None:
    from seer_pipeline.train.plot import main as plot_main

    _write(tmp_path, BAD_LINES["deep-list"])
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(BAD_LINES["non-utf8"] + b"\n")
        f.write(b'{"step": 7, "loss": 1e400, "lr": 10' + b"0" * 400 + b', "resumed_from": "abc"}\n')
        f.write(b'{"step": 8, "loss": "nan", "img_s": true, "resumed_from": [1]}\n')
    out = tmp_path / "p.png"
    assert plot_main([str(tmp_path), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"count": "abc"}', b"[]", b"\xff"])
def test_status_survives_an_odd_requeues_json(tmp_path: Path, capsys, content: bytes) -> None:
    from launch.status import main as status_main

    (tmp_path / "requeues.json").write_bytes(content)
    assert status_main([str(tmp_path)]) == 0
    assert "restarts:   0 (RUN/requeues.json)" in capsys.readouterr().out
