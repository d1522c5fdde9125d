"""Issue #24: reading weights never runs code and never passes damaged or wrong weights on.

A run folder given to `seer-ckpt export` or `init.weights=` is read as a resume reads it (hashes
checked, restricted unpickler); every weights format is refused when a tensor is non-finite or
shaped unlike the architecture its shapes name."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seer_pipeline.checkpoint import integrity
from seer_pipeline.checkpoint.checkpointer import Checkpointer
from seer_pipeline.checkpoint.cli import main as ckpt_main
from seer_pipeline.config.train import load_train_config
from seer_pipeline.models.swav import build_model

CFG_YAML = "model: {trunk: regnety_tiny, hidden_dims: [], out_dim: 8, n_prototypes: 8}\n"


class Planted:
    """Unpickling this creates the marker file (what a crafted pickle would do with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def _run(tmp_path: Path, steps=(4,)) -> Path:
    """A run folder holding real model checkpoints (what seer-train leaves)."""
    cfg = OmegaConf.merge(load_train_config(None, []), OmegaConf.create(CFG_YAML))
    torch.manual_seed(0)
    model = build_model(cfg)
    run = tmp_path / "run"
    ck = Checkpointer(run, every=1, keep_latest=3, config_yaml=CFG_YAML)
    for s in steps:
        ck.save(s, {"model": model.state_dict(), "train": {"step": s}}, {"x": s})
    return run


def _step(run: Path, step: int = 4) -> Path:
    return run / "checkpoints" / f"step_{step:09d}"


def _rehash(step_dir: Path) -> None:
    """Record the planted file's hash, as an attacker with write access could."""
    meta = json.loads((step_dir / "meta.json").read_text())
    for name in meta["sha256"]:
        meta["sha256"][name] = integrity.hash_file(step_dir / name)
        meta["files"][name] = (step_dir / name).stat().st_size
    (step_dir / "meta.json").write_text(json.dumps(meta))


def _flip_trunk_byte(step_dir: Path) -> None:
    """Flip one byte inside the stored trunk stem kernel (size unchanged, hash now stale)."""
    from seer_pipeline.checkpoint.safe_dcp import load_dcp_metadata

    with open(step_dir / ".metadata", "rb") as f:
        md = load_dcp_metadata(f)
    idx = next(i for i in md.storage_data if i.fqn == "model.trunk.stem.conv.weight")
    info = md.storage_data[idx]
    p = step_dir / Path(info.relative_path).name
    data = bytearray(p.read_bytes())
    data[info.offset + info.length // 2] ^= 0x40
    p.write_bytes(bytes(data))


def _export(src: Path, out: Path) -> int:
    return ckpt_main(["export", str(src), "--format", "timm", "--out", str(out)])


def test_run_folder_exports_and_warm_starts(tmp_path: Path) -> None:
    """The safe path still reads what seer-train writes."""
    from seer_pipeline.weights import load_trunk_state

    run = _run(tmp_path)
    assert _export(run, tmp_path / "t.pt") == 0
    sd = load_trunk_state(run, "regnety_tiny")
    assert "stem.conv.weight" in sd and sd["stem.conv.weight"].abs().sum() > 0


@pytest.mark.parametrize("via", ["export-run", "export-step", "init.weights"])
def test_planted_metadata_in_a_run_is_not_executed(tmp_path: Path, capsys, via: str) -> None:
    from seer_pipeline.weights import load_trunk_state

    marker = tmp_path / "pwned"
    run = _run(tmp_path)
    (_step(run) / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    _rehash(_step(run))
    if via == "init.weights":  # what the trainer calls for init.weights=RUN
        with pytest.raises(Exception, match="refusing to load global io.open"):
            load_trunk_state(run, "regnety_tiny")
    else:
        src = run if via == "export-run" else _step(run)
        assert _export(src, tmp_path / "t.pt") == 1
        err = capsys.readouterr().err
        assert "refusing to load global io.open" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "t.pt").exists()
    assert not marker.exists(), "a planted .metadata ran code"


@pytest.mark.parametrize("via", ["export-run", "export-step", "init.weights"])
def test_bit_flipped_trunk_tensor_is_refused(tmp_path: Path, capsys, via: str) -> None:
    from seer_pipeline.weights import load_trunk_state

    run = _run(tmp_path)
    _flip_trunk_byte(_step(run))
    if via == "init.weights":
        with pytest.raises(Exception, match="content hash"):
            load_trunk_state(run, "regnety_tiny")
    else:
        src = run if via == "export-run" else _step(run)
        assert _export(src, tmp_path / "t.pt") == 1
        assert "content hash" in capsys.readouterr().err
        assert not (tmp_path / "t.pt").exists()


def test_bit_flip_in_newest_falls_back_to_previous_with_a_warning(tmp_path: Path, caplog) -> None:
    from seer_pipeline.weights import load_weights

    run = _run(tmp_path, steps=(4, 8))
    _flip_trunk_byte(_step(run, 8))
    ws = load_weights(run)
    assert ws.trunk["stem.conv.weight"].shape[0] > 0
    assert "not usable" in caplog.text and "step_000000008" in caplog.text
