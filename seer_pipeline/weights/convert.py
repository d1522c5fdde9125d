"""Read weights in any supported format, check them, write them in any other.

`load_weights(src)` takes a run folder (newest complete DCP checkpoint) or a file in the seer,
timm, torchvision or VISSL format (detected from the keys, never from the name) and returns a
`WeightSet` in our key names with the architecture read from the shapes. `save_weights` writes
it in a chosen format; every output loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import importlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from seer_pipeline.core.io_utils import atomic_write_json
from seer_pipeline.models.regnet import RegNetConfig
from seer_pipeline.weights import keys as K
from seer_pipeline.weights.arch import (
    TIMM_NAMES,
    TORCHVISION_NAMES,
    TrunkArch,
    infer_arch,
    resolve_config,
)
from seer_pipeline.weights.check import check_finite, check_shapes
from seer_pipeline.weights.keys import WeightsFormatError
from seer_pipeline.weights.run import read_run
from seer_pipeline.weights.vissl import (
    consolidated,
    is_vissl,
    read_vissl,
    save_torch,
    write_sharded,
    write_sliced,
)

log = logging.getLogger(__name__)

# Globals a VISSL/classy checkpoint may hold outside its tensors (numpy scalars in loss or
# meter state). Allow-listed for the weights-only unpickler; anything else is refused.
_NUMPY_GLOBALS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype")


@dataclass
class WeightSet:
    """A trunk (our key names), optional SwAV head and linear classifier, and what they are."""

    trunk: dict[str, torch.Tensor]
    arch: TrunkArch
    config: RegNetConfig
    preset: Optional[str]
    source_format: str
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    classifier: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _numpy_safe_globals() -> list:
    out = []
    for name in _NUMPY_GLOBALS:
        mod, _, attr = name.rpartition(".")
        try:
            out.append((getattr(importlib.import_module(mod), attr), name))
        except (ImportError, AttributeError):
            continue
    if out:  # numpy >= 1.25 pickles a scalar's dtype by its class (numpy.dtypes.Int64DType ...)

        for code in "?bhilqBHILQefd":
            cls = type(np.dtype(code))
            out.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return out


def _load(path: Path) -> Any:
    # mmap: tensors stay file-backed until touched, so a 2.6 GB (128GF) or 36 GB (10B) file is
    # not copied into anonymous memory on read. Files in the pre-1.6 format cannot be mapped.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def safe_load(path: str | Path, notes: Optional[list[str]] = None) -> Any:
    """torch.load(weights_only=True); numpy scalars through an allow-list, nothing else."""
    path = Path(path)
    try:
        return _load(path)
    except pickle.UnpicklingError as first:
        allowed = _numpy_safe_globals()
        try:
            with torch.serialization.safe_globals([g for g, _ in allowed]):
                obj = _load(path)
        except pickle.UnpicklingError as e:
            raise WeightsFormatError(f"{path}: holds objects the weights-only unpickler refuses "
                                     f"(it never runs code from a file): {e}") from first
        msg = f"{path}: read with allow-listed numpy scalar/dtype globals (weights_only unpickler)"
        log.warning(msg)
        if notes is not None:
            notes.append(msg)
        return obj
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as e:
        # a truncated or foreign file: torch's readers fail with whatever they trip on
        raise WeightsFormatError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from e


def _unwrap(obj: Any) -> tuple[Any, dict, dict]:
    """Strip common wrappers ({state_dict|model: ...}, prefixes). Returns (dict, head, classifier)."""
    head: dict = {}
    clf: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("trunk"), dict) and not is_vissl(obj):
        head = dict(obj.get("head") or {})
        clf = dict(obj.get("classifier") or {})
        obj = obj["trunk"]
    for wrapper in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and not is_vissl(obj):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsFormatError(f"expected a dict of tensors, got {type(obj).__name__}")
    for prefix in ("module.", "trunk."):
        if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj, head, clf


def detect_format(sd: Mapping[str, Any]) -> str:
    """seer | timm | torchvision | vissl, from the keys."""
    if is_vissl(dict(sd)):
        return "vissl"
    ks = set(sd)
    if "stem.conv.weight" in ks and any(k.startswith("stages.0.blocks.0.") for k in ks):
        return "seer"
    if "stem.conv.weight" in ks and any(k.startswith("s1.b1.") for k in ks):
        return "timm"
    if "stem.0.weight" in ks and any(k.startswith("trunk_output.block1.") for k in ks):
        return "torchvision"
    raise WeightsFormatError(
        f"does not hold RegNetY trunk weights in a known format (keys like {sorted(ks)[:4]}; "
        f"formats: {', '.join(K.FORMATS)})")


def _split_classifier(fmt: str, sd: dict) -> tuple[dict, dict]:
    name = {"timm": "head.fc.", "torchvision": "fc.", "seer": "classifier."}.get(fmt)
    if not name:
        return sd, {}
    clf = {k[len(name):]: v for k, v in sd.items() if k.startswith(name)}
    return {k: v for k, v in sd.items() if not k.startswith(name)}, clf


def _fill_bn_counters(sd: dict) -> None:
    """Formats differ on `num_batches_tracked`; a missing one is 0 (it is unused in eval)."""
    for k in [k for k in sd if k.endswith(".running_mean")]:
        sd.setdefault(k[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0))


def split_spec(src: str | Path) -> tuple[Optional[str], Path]:
    """`timm:FILE` -> ("timm", FILE); a plain path -> (None, path). The prefix is only checked."""
    text = str(src)
    head, sep, rest = text.partition(":")
    if sep and head in K.FORMATS and not Path(text).exists():
        return head, Path(rest)
    return None, Path(text)


def load_weights(src: str | Path, preset: Optional[str] = None, step: Optional[int] = None,
                 which: Optional[str] = None) -> WeightSet:
    """Weights from a run folder or a file in any format, checked against `preset` if given.
    `which`: teacher or student of a DINO run (default: the teacher)."""
    declared, src = split_spec(src)
    notes: list[str] = []
    skipped: list[str] = []
    if src.is_dir():
        trunk, head, run_trunk = read_run(src, step, which)
        fmt, clf = "run", {}
        preset = preset or run_trunk
    elif not src.is_file():
        raise WeightsFormatError(f"{src}: no such run folder or weights file")
    else:
        obj = safe_load(src, notes)
        if isinstance(obj, dict) and is_vissl(obj):
            fmt = "vissl"
            vt, vh = read_vissl(obj, src, lambda p: safe_load(p, notes))
            trunk = K.rename_trunk("vissl", vt)
            head, clf, skipped = K.head_from_vissl(vh)
        else:
            sd, head, clf = _unwrap(obj)
            try:
                fmt = detect_format(sd)
            except WeightsFormatError as e:
                raise WeightsFormatError(f"{src}: {e}") from None
            sd, clf2 = _split_classifier(fmt, K.tensors_only(sd.items(), str(src)))
            clf = clf or clf2
            trunk = K.rename_trunk(fmt, sd)
    if declared and declared != fmt:
        raise WeightsFormatError(f"{src}: declared {declared}: but its keys are {fmt} keys")
    _fill_bn_counters(trunk)
    arch = infer_arch(trunk)
    cfg, name = resolve_config(arch, preset)
    if set(clf) - {"weight", "bias"}:
        raise WeightsFormatError(f"{src}: classifier keys {sorted(clf)}: expected weight, bias")
    if clf and (clf["weight"].dim() != 2 or clf["weight"].shape[1] != arch.widths[-1]
                or tuple(clf.get("bias", clf["weight"][:, 0]).shape) != (clf["weight"].shape[0],)):
        raise WeightsFormatError(f"{src}: classifier weight {tuple(clf['weight'].shape)} / bias "
                                 f"{tuple(clf['bias'].shape) if 'bias' in clf else None} do not "
                                 f"map the trunk's {arch.widths[-1]} features to classes")
    check_shapes(trunk, cfg, str(src))  # every tensor, not only the kernels arch reads
    for part, tensors in (("trunk", trunk), ("head", head), ("classifier", clf)):
        check_finite(tensors, f"{src} ({part})")
    if skipped:
        notes.append(f"skipped {len(skipped)} VISSL head tensor(s) this project has no module for: "
                     f"{skipped[:4]}")
    return WeightSet(trunk, arch, cfg, name, fmt, head, clf, skipped, notes)


def load_trunk_state(src: str | Path, preset: str) -> dict[str, torch.Tensor]:
    """Our trunk state_dict from any supported file or run, after checking it is a `preset`."""
    return load_weights(src, preset).trunk


def export_dict(ws: WeightSet, fmt: str) -> dict:
    """The object `save_weights` writes for `fmt` (vissl: consolidated)."""
    if fmt not in K.FORMATS:
        raise WeightsFormatError(f"unknown format {fmt!r}; choose from {', '.join(K.FORMATS)}")
    if fmt == "seer":
        if not ws.head and not ws.classifier:
            return dict(ws.trunk)  # what `seer-ckpt consolidate` writes: loads into build_trunk
        out: dict[str, Any] = {"trunk": dict(ws.trunk)}
        if ws.head:
            out["head"] = dict(ws.head)
        if ws.classifier:
            out["classifier"] = dict(ws.classifier)
        return out
    sd = K.trunk_from_ours(fmt, ws.trunk)
    if fmt == "vissl":
        heads = K.head_to_vissl(ws.head)
        idx = 1 if ws.head else 0  # VISSL keeps one list of heads: the SwAV head is head 0
        heads.update({f"{idx}.clf.0.{k}": v for k, v in ws.classifier.items()})
        return consolidated(sd, heads)
    prefix = "head.fc." if fmt == "timm" else "fc."
    sd.update({prefix + k: v for k, v in ws.classifier.items()})
    return sd


def save_weights(ws: WeightSet, fmt: str, out: str | Path, vissl_layout: str = "consolidated",
                 shards: int = 1) -> dict:
    """Write `ws` as `fmt` to `out` (+ `out`.json describing it); returns that description."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "vissl" and vissl_layout != "consolidated":
        heads = K.head_to_vissl(ws.head)
        trunk = K.trunk_from_ours("vissl", ws.trunk)
        if vissl_layout == "sharded":
            write_sharded(trunk, heads, out, shards)
        elif vissl_layout == "sliced":
            write_sliced(trunk, heads, out)
        else:
            raise WeightsFormatError(f"unknown VISSL layout {vissl_layout!r}")
    else:
        save_torch(export_dict(ws, fmt), out)
    info = {"format": fmt, "trunk": ws.preset, "source_format": ws.source_format,
            "timm_name": TIMM_NAMES.get(ws.preset or ""),
            "torchvision_name": TORCHVISION_NAMES.get(ws.preset or ""),
            "widths": ws.arch.widths, "depths": ws.arch.depths,
            "group_widths": [s[2] for s in ws.arch.stages], "stem_width": ws.arch.stem_width,
            "head": bool(ws.head) and fmt in ("vissl", "seer"),
            "classifier": bool(ws.classifier), "notes": ws.notes}
    if ws.head and fmt in ("timm", "torchvision"):
        info["notes"] = [*ws.notes, f"the SwAV head is not part of a {fmt} file (trunk only)"]
    atomic_write_json(str(out) + ".json", info)
    return info

