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
from seer_pipeline.checkpoint.checkpointer import Checkpointer, ckpt_config
from seer_pipeline.weights.cli import main as ckpt_main
from seer_pipeline.config.train import load_train_config
from seer_pipeline.models.swav_head import build_model

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
    ck = Checkpointer(run, ckpt_config(every=1, keep_latest=3), config_yaml=CFG_YAML)
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


# -- every format: non-finite values and mis-shaped tensors are refused ---------------------------
FORMATS = ["seer", "timm", "torchvision", "vissl", "vissl-sharded", "vissl-sliced"]


def _trunk_sd() -> dict[str, torch.Tensor]:
    from seer_pipeline.models import build_trunk

    torch.manual_seed(1)
    return {k: v.clone() for k, v in build_trunk("regnety_tiny").state_dict().items()}


def _write(sd: dict[str, torch.Tensor], fmt: str, out: Path) -> Path:
    """`sd` (our key names) written as `fmt` by the format's own writer, damage included."""
    from seer_pipeline.weights import keys as K
    from seer_pipeline.weights.vissl import consolidated, write_sharded, write_sliced

    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "seer":
        torch.save(sd, out)
    elif fmt in ("timm", "torchvision"):
        torch.save(K.trunk_from_ours(fmt, sd), out)
    elif fmt == "vissl":
        torch.save(consolidated(K.trunk_from_ours("vissl", sd), {}), out)
    elif fmt == "vissl-sharded":
        write_sharded(K.trunk_from_ours("vissl", sd), {}, out, 2)
    else:
        write_sliced(K.trunk_from_ours("vissl", sd), {}, out)
    return out


def _damage(kind: str) -> dict[str, torch.Tensor]:
    sd = _trunk_sd()
    if kind == "nan":
        sd["stages.0.blocks.0.se.expand.weight"][0, 0] = float("nan")
    elif kind == "inf-buffer":
        sd["stages.1.blocks.0.b.bn.running_var"][3] = float("inf")
    elif kind == "stem-5x5":  # arch.py reads only the stem's channel counts
        w = sd["stem.conv.weight"]
        sd["stem.conv.weight"] = torch.zeros(w.shape[0], w.shape[1], 5, 5)
    elif kind == "bn-vector":
        sd["stages.0.blocks.0.a.bn.weight"] = torch.ones(sd["stages.0.blocks.0.a.bn.weight"].numel() + 1)
    return sd


@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_weights_still_import_in_every_format(tmp_path: Path, fmt: str) -> None:
    from seer_pipeline.weights import load_trunk_state

    sd = _trunk_sd()
    got = load_trunk_state(_write(sd, fmt, tmp_path / "w.pt"), "regnety_tiny")
    assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("kind,match", [("nan", "NaN or inf"), ("inf-buffer", "NaN or inf"),
                                        ("stem-5x5", "stem.conv.weight"),
                                        ("bn-vector", "a.bn.weight")])
@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_weights_are_refused_in_every_format(tmp_path: Path, capsys, fmt: str, kind: str,
                                                     match: str) -> None:
    from seer_pipeline.weights import WeightsFormatError, load_trunk_state

    src = _write(_damage(kind), fmt, tmp_path / "w.pt")
    with pytest.raises(WeightsFormatError, match=match):  # init.weights and seer-eval's reader
        load_trunk_state(src, "regnety_tiny")
    out = tmp_path / "exported.pt"
    assert ckpt_main(["export", str(src), "--format", "timm", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert match.split()[0] in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_run_with_nan_weights_is_refused_by_export_and_eval(tmp_path: Path, capsys) -> None:
    from seer_pipeline.eval import features

    cfg = OmegaConf.merge(load_train_config(None, []), OmegaConf.create(CFG_YAML))
    model = build_model(cfg)
    with torch.no_grad():
        model.trunk.stem.conv.weight[0, 0, 0, 0] = float("nan")
    run = tmp_path / "run"
    Checkpointer(run, ckpt_config(every=1), config_yaml=CFG_YAML).save(4, {"model": model.state_dict()}, {})
    (run / "config.yaml").write_text(CFG_YAML)
    assert _export(run, tmp_path / "t.pt") == 1
    assert "NaN or inf" in capsys.readouterr().err
    with pytest.raises(features.CheckpointSpecError, match="NaN or inf"):
        features.load_trunk(features.parse_checkpoint(str(run)))


def test_eval_refuses_a_nan_trunk_file(tmp_path: Path) -> None:
    from seer_pipeline.eval import features

    path = _write(_damage("nan"), "seer", tmp_path / "nan.pt")
    with pytest.raises(features.CheckpointSpecError, match="NaN or inf"):
        features.load_trunk(features.parse_checkpoint(str(path), "regnety_tiny"))


def test_seer_train_init_weights_refuses_a_planted_run(tmp_path: Path, tiny_shards: Path, capsys,
                                                       caplog) -> None:
    """End to end: seer-train stops before training, nothing executed, the reason logged."""
    from seer_pipeline.train.cli import main

    marker = tmp_path / "pwned"
    src = _run(tmp_path)
    (_step(src) / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    _rehash(_step(src))
    new = tmp_path / "new"
    rc = main(["--config", "cpu_tiny", f"run.dir={new}", f"data.shards={tiny_shards}", "dist.nproc=1",
               "model.trunk=regnety_tiny", "model.hidden_dims=[]", "model.out_dim=8",
               "model.n_prototypes=8", f"init.weights={src}", "train.tensorboard=false"])
    out = capsys.readouterr().err + caplog.text + "".join(
        p.read_text() for p in (new / "logs").glob("*.log"))
    assert rc == 1 and not marker.exists()
    assert "refusing to load global io.open" in out
    assert not (new / "metrics.jsonl").exists() and not (new / "checkpoints").exists()
