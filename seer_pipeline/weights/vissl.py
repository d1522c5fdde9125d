"""VISSL / SEER checkpoint containers: consolidated, shard + shard_list, slice + slice_list.

Layout (vissl/utils/checkpoint.py, CheckpointItemType): every file is a dict with `type`.
  consolidated: classy_state_dict.base_model.model.{trunk, heads} (full tensors).
  shard_list:   `shards`: one file per FSDP rank; each shard's classy_state_dict.base_model has
                model.trunk (this rank's flat slices) and meta.trunk = fairscale's
                local_metadata_dict: param_metadata [{fsdp_path, params {backing name: {names,
                shapes, numels, padding}}, no_broadcast_optim_state}], buffer_names.
  slice_list:   model.trunk / heads map each name to a file holding {type: slice, weight}.
A sharded trunk is rebuilt one shard file at a time into preallocated full tensors, so at most
one shard set is in memory beside the result (SEER 10B: ~36 GB consolidated, 496 shards).
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from seer_pipeline.core.io_utils import atomic_write_bytes
from seer_pipeline.weights.keys import WeightsFormatError, clean_key, tensors_only

log = logging.getLogger(__name__)
VISSL_TYPES = ("consolidated", "shard", "shard_list", "slice", "slice_list")


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save to a file atomically (a kill leaves the old file or the new one)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def is_vissl(obj: Any) -> bool:
    """A VISSL container (typed or classy_state_dict) or a bare `_feature_blocks` trunk dict."""
    if not isinstance(obj, dict):
        return False
    if "classy_state_dict" in obj or obj.get("type") in VISSL_TYPES:
        return True
    return any(isinstance(k, str) and clean_key(k).startswith("_feature_blocks.") for k in obj)


def _model_of(obj: dict, where: str) -> dict:
    try:
        return obj["classy_state_dict"]["base_model"]["model"]
    except (KeyError, TypeError):
        raise WeightsFormatError(
            f"{where}: a VISSL checkpoint without classy_state_dict.base_model.model") from None


def _resolve(ref: str, folder: Path) -> Path:
    p = Path(ref)
    return p if p.is_absolute() else folder / p


def read_vissl(obj: dict, path: Path, load: Callable[[Path], Any]) -> tuple[dict, dict]:
    """(trunk, heads) as full tensors, in VISSL key names (wrapper segments kept)."""
    kind = obj.get("type", "consolidated")
    if kind not in VISSL_TYPES:
        raise WeightsFormatError(f"{path}: unknown VISSL checkpoint type {kind!r}")
    if "classy_state_dict" not in obj and kind == "consolidated":
        return tensors_only(obj.items(), str(path)), {}  # a bare trunk dict
    if kind == "consolidated":
        model = _model_of(obj, str(path))
        return (tensors_only(model.get("trunk", {}).items(), f"{path} trunk"),
                _heads_dict(model.get("heads", {}), str(path)))
    if kind == "slice_list":
        refs = obj["layers"] if "classy_state_dict" not in obj else _model_of(obj, str(path))
        trunk = refs["trunk"] if "trunk" in refs else refs
        heads = refs.get("heads", {}) if "trunk" in refs else {}
        return (_load_slices(trunk, path.parent, load), _load_slices(heads, path.parent, load))
    if kind == "shard_list":
        return consolidate_shards([_resolve(s, path.parent) for s in obj["shards"]], load)
    if kind == "shard":
        raise WeightsFormatError(f"{path}: one shard of a sharded VISSL checkpoint; pass the "
                                 "shard_list file that names all shards (model_*.torch)")
    raise WeightsFormatError(f"{path}: a single VISSL slice; pass the slice_list file")


def _heads_dict(heads: Any, where: str) -> dict:
    if isinstance(heads, list):  # per-head dicts: prefix the head index as VISSL's converter does
        return {f"{i}.{k}": v for i, h in enumerate(heads) for k, v in h.items()}
    return tensors_only(dict(heads).items(), f"{where} heads")


def _load_slices(refs: Mapping[str, str], folder: Path, load: Callable[[Path], Any]) -> dict:
    out = {}
    for name, ref in refs.items():
        sl = load(_resolve(ref, folder))
        if not isinstance(sl, dict) or sl.get("type") != "slice" or not isinstance(sl.get("weight"), torch.Tensor):
            raise WeightsFormatError(f"{ref}: not a VISSL slice file for {name!r}")
        out[name] = sl["weight"]
    return out


class _Assembler:
    """Full tensors of one module (trunk or a head) filled shard by shard."""

    def __init__(self, meta: dict, first: Mapping[str, torch.Tensor], where: str) -> None:
        self.meta, self.where = meta, where
        self.flat: dict[str, torch.Tensor] = {}
        self.fill: dict[str, int] = {}
        for unit in meta["param_metadata"]:
            for backing, v in unit["params"].items():
                key = _join(unit["fsdp_path"], backing)
                if key not in first:
                    raise WeightsFormatError(f"{where}: shard 0 lacks {key!r} named in its metadata")
                self.flat[key] = torch.empty(sum(v["numels"]), dtype=first[key].dtype)
                self.fill[key] = 0

    def add(self, rank: int, local: Mapping[str, torch.Tensor], meta: dict) -> None:
        for u, unit in enumerate(meta["param_metadata"]):
            if rank > 0 and unit.get("no_broadcast_optim_state"):
                continue  # such units are whole on rank 0 (fairscale consolidate_shard_weights)
            for backing, v in unit["params"].items():
                key = _join(unit["fsdp_path"], backing)
                if key not in self.flat or key not in local:
                    raise WeightsFormatError(f"{self.where}: shard {rank} lacks {key!r}")
                piece = local[key].reshape(-1)
                piece = piece[: piece.numel() - v["padding"]] if v["padding"] else piece
                start, end = self.fill[key], self.fill[key] + piece.numel()
                if end > self.flat[key].numel():
                    raise WeightsFormatError(f"{self.where}: shards overfill {key!r}")
                self.flat[key][start:end] = piece
                self.fill[key] = end

    def result(self, buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for unit in self.meta["param_metadata"]:
            for backing, v in unit["params"].items():
                key = _join(unit["fsdp_path"], backing)
                if self.fill[key] != self.flat[key].numel():
                    raise WeightsFormatError(f"{self.where}: {key!r} has {self.fill[key]} of "
                                             f"{self.flat[key].numel()} values: a shard is missing")
                for n, t, s in zip(v["names"], self.flat[key].split(list(v["numels"])), v["shapes"]):
                    out[_join(unit["fsdp_path"], n)] = t.view(tuple(s))
        for b in self.meta.get("buffer_names", []):
            if b not in buffers:
                raise WeightsFormatError(f"{self.where}: shard 0 lacks buffer {b!r}")
            out[b] = buffers[b].clone()
        return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def consolidate_shards(shards: list[Path], load: Callable[[Path], Any]) -> tuple[dict, dict]:
    """Full (trunk, heads) from FSDP shard files, loading one shard file at a time."""
    if not shards:
        raise WeightsFormatError("a shard_list with no shards")
    trunk_asm: Optional[_Assembler] = None
    head_asm: list[_Assembler] = []
    trunk_buf: dict = {}
    head_buf: list[dict] = []
    for rank, sp in enumerate(shards):
        if not sp.is_file():
            raise WeightsFormatError(f"shard {rank} of {len(shards)} is missing: {sp}")
        content = load(sp)
        if not isinstance(content, dict) or content.get("type") != "shard":
            raise WeightsFormatError(f"{sp}: not a VISSL shard file (type {content.get('type')!r})")
        base = content["classy_state_dict"]["base_model"]
        data, meta = base["model"], base["meta"]
        heads_data, heads_meta = list(data.get("heads") or []), list(meta.get("heads") or [])
        if rank == 0:
            trunk_asm = _Assembler(meta["trunk"], data["trunk"], f"{sp} trunk")
            trunk_buf = {k: v for k, v in data["trunk"].items() if k in set(meta["trunk"].get("buffer_names", []))}
            head_asm = [_Assembler(m, d, f"{sp} head {i}") for i, (d, m) in enumerate(zip(heads_data, heads_meta))]
            head_buf = [{k: v for k, v in d.items() if k in set(m.get("buffer_names", []))}
                        for d, m in zip(heads_data, heads_meta)]
        assert trunk_asm is not None
        trunk_asm.add(rank, data["trunk"], meta["trunk"])
        for asm, d, m in zip(head_asm, heads_data, heads_meta):
            asm.add(rank, d, m)
        del content, base, data, meta, heads_data, heads_meta  # one shard set at a time
    assert trunk_asm is not None
    heads = {f"{i}.{k}": v for i, (asm, b) in enumerate(zip(head_asm, head_buf))
             for k, v in asm.result(b).items()}
    return trunk_asm.result(trunk_buf), heads


def consolidated(trunk: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor]) -> dict:
    """A VISSL consolidated checkpoint dict (what timm's SEER reader expects)."""
    return {"type": "consolidated",
            "classy_state_dict": {"base_model": {"model": {"trunk": dict(trunk), "heads": dict(heads)}}}}


def _unit_of(key: str) -> str:
    """FSDP unit path of a trunk key as VISSL's regnet_fsdp wraps it: each block, else the root."""
    parts = key.split(".")
    for j, p in enumerate(parts):
        if p.startswith("block") and "-" in p and not p.split("-", 1)[1].startswith("part"):
            return ".".join(parts[: j + 1])
    return ""


def write_sharded(trunk: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor],
                  out: str | Path, world_size: int) -> list[Path]:
    """A VISSL shard_list at `out` plus `world_size` shard files beside it (fairscale layout).

    Trunk blocks are FSDP units with unflattened parameters (SEER 10B ran flatten_parameters=
    False); the stem (root unit) and the head are flattened into one `flat_param_0` each, so
    both metadata forms are exercised by the reader.
    """
    out = Path(out)
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    units: dict[str, dict[str, torch.Tensor]] = {}
    buffers = {k: v for k, v in trunk.items() if k.rsplit(".", 1)[1].startswith(("running_", "num_batches"))}
    for k, v in trunk.items():
        if k not in buffers:
            u = _unit_of(k)
            units.setdefault(u, {})[k[len(u) + 1:] if u else k] = v
    head_params = {k[2:]: v for k, v in heads.items() if k.startswith("0.")}
    if len(head_params) != len(heads):
        raise WeightsFormatError("write_sharded supports one head (keys '0.*')")
    names = []
    for rank in range(world_size):
        t_local, t_meta = _shard_units(units, rank, world_size, flatten_root=True)
        t_local.update(buffers)
        t_meta["buffer_names"] = sorted(buffers)
        model: dict[str, Any] = {"trunk": t_local}
        meta: dict[str, Any] = {"trunk": t_meta}
        if head_params:
            h_local, h_meta = _shard_units({"": head_params}, rank, world_size, flatten_root=True)
            h_meta["buffer_names"] = []
            model["heads"], meta["heads"] = [h_local], [h_meta]
        name = f"{out.stem}_shard{rank}{out.suffix}"
        save_torch({"type": "shard", "classy_state_dict": {"base_model": {"model": model, "meta": meta}}},
                   out.parent / name)
        names.append(name)
    save_torch({"type": "shard_list", "shards": names}, out)
    return [out.parent / n for n in names]


def _shard_units(units: Mapping[str, Mapping[str, torch.Tensor]], rank: int, world: int,
                 flatten_root: bool) -> tuple[dict, dict]:
    local, param_meta = {}, []
    for path, params in units.items():
        if path == "" and flatten_root:
            groups = {"flat_param_0": list(params)}
        else:
            groups = {n: [n] for n in params}
        meta: dict[str, Any] = {"fsdp_path": path, "params": {}, "no_broadcast_optim_state": False,
                                "shared_param_info": []}
        for backing, members in groups.items():
            flat = torch.cat([params[n].reshape(-1) for n in members])
            per = -(-flat.numel() // world)  # ceil: fairscale pads the flat tensor to world * per
            pad_total = per * world - flat.numel()
            padded = torch.cat([flat, flat.new_zeros(pad_total)])
            piece = padded[rank * per:(rank + 1) * per].clone()
            real = max(0, min(per, flat.numel() - rank * per))
            local[_join(path, backing)] = piece
            meta["params"][backing] = {"names": members, "shapes": [params[n].shape for n in members],
                                       "numels": [params[n].numel() for n in members],
                                       "padding": per - real}
        param_meta.append(meta)
    return local, {"param_metadata": param_meta}


def write_sliced(trunk: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor], out: str | Path) -> None:
    """A VISSL slice_list at `out`, one slice file per tensor in `<out stem>_layers/`."""
    out = Path(out)
    folder = out.parent / f"{out.stem}_layers"
    folder.mkdir(parents=True, exist_ok=True)

    def save(part: Mapping[str, torch.Tensor]) -> dict[str, str]:
        refs = {}
        for k, v in part.items():
            name = f"{hashlib.sha1(k.encode()).hexdigest()}.torch"  # VISSL names slices by sha1(key)
            save_torch({"type": "slice", "weight": v}, folder / name)
            refs[k] = f"{folder.name}/{name}"
        return refs

    save_torch({"type": "slice_list",
                "classy_state_dict": {"base_model": {"model": {"trunk": save(trunk), "heads": save(heads)}}}}, out)
