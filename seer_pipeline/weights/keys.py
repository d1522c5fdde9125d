"""Key names of a RegNetY trunk in each weight format, and renaming to/from ours.

Ours (`seer`) is `RegNetTrunk.state_dict()`: `stem.{conv,bn}`, `stages.{s}.blocks.{i}.{proj,a,b,c}
.{conv,bn}`, `...se.{reduce,expand}` (s, i from 0). The other layouts, as their projects name them:
  timm (models/regnet.py): `stem.{conv,bn}`, `s{s+1}.b{i+1}.{conv1,conv2,conv3}.{conv,bn}`,
    `se.{fc1,fc2}`, `downsample.{conv,bn}`; classifier `head.fc`.
  torchvision (models/regnet.py): `stem.{0,1}`, `trunk_output.block{s+1}.block{s+1}-{i}.f.{a,b,c}
    .{0,1}`, `f.se.{fc1,fc2}`, `proj.{0,1}`; classifier `fc`.
  VISSL/SEER (classy_vision AnyNet blocks, vissl regnet_fsdp.py): `_feature_blocks.conv1.stem.{0,1}`,
    `_feature_blocks.res{s+2}.block{s+1}-{i}.{proj,bn,f.a.{0,1},f.b.{0,1},f.se.excitation.{0,2},
    f.c,f.final_bn}`; the FSDP trunk (SEER 10B) nests blocks in groups: `block{s+1}-part{g}.`.
Every key is either renamed or reported: nothing is dropped silently.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

FORMATS = ("seer", "timm", "torchvision", "vissl")

# Block sub-modules: ours -> (timm, torchvision, vissl).
_BLOCK = {
    "proj.conv": ("downsample.conv", "proj.0", "proj"),
    "proj.bn": ("downsample.bn", "proj.1", "bn"),
    "a.conv": ("conv1.conv", "f.a.0", "f.a.0"),
    "a.bn": ("conv1.bn", "f.a.1", "f.a.1"),
    "b.conv": ("conv2.conv", "f.b.0", "f.b.0"),
    "b.bn": ("conv2.bn", "f.b.1", "f.b.1"),
    "se.reduce": ("se.fc1", "f.se.fc1", "f.se.excitation.0"),
    "se.expand": ("se.fc2", "f.se.fc2", "f.se.excitation.2"),
    "c.conv": ("conv3.conv", "f.c.0", "f.c"),
    "c.bn": ("conv3.bn", "f.c.1", "f.final_bn"),
}
_STEM = {"stem.conv": ("stem.conv", "stem.0", "_feature_blocks.conv1.stem.0"),
         "stem.bn": ("stem.bn", "stem.1", "_feature_blocks.conv1.stem.1")}
_COL = {"timm": 0, "torchvision": 1, "vissl": 2}
# Wrapper segments that FSDP1 / checkpoint_wrapper insert in module paths (fairscale _clean_path).
_WRAPPERS = {"_fsdp_wrapped_module", "_fpw_module", "_checkpoint_wrapped_module"}

_OURS_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_TIMM_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(.+)$")
_TV_BLOCK = re.compile(r"^trunk_output\.block(\d+)\.block(\d+)-(\d+)\.(.+)$")
_VISSL_BLOCK = re.compile(r"^_feature_blocks\.res(\d+)\.block(\d+)-(?:part(\d+)\.block(\d+)-)?(\d+)\.(.+)$")


class WeightsFormatError(ValueError):
    """Weights whose keys or layout this project cannot read or write."""


def clean_key(key: str) -> str:
    """Drop FSDP1 / activation-checkpoint wrapper segments from a module path."""
    if not any(w in key for w in _WRAPPERS):
        return key
    return ".".join(p for p in key.split(".") if p not in _WRAPPERS)


def _split_leaf(rest: str) -> tuple[str, str]:
    mod, _, leaf = rest.rpartition(".")
    return mod, leaf


def _lookup(table: Mapping[str, tuple[str, str, str]], col: int, their_mod: str) -> Optional[str]:
    for ours, theirs in table.items():
        if theirs[col] == their_mod:
            return ours
    return None


def to_ours(fmt: str, key: str) -> Optional[str]:
    """Our name for a trunk key of `fmt`, or None if the key is not a trunk key we know."""
    if fmt == "seer":
        m = _OURS_BLOCK.match(key)
        ok = (m and _split_leaf(m.group(3))[0] in _BLOCK) or _split_leaf(key)[0] in _STEM
        return key if ok else None
    col = _COL[fmt]
    key = clean_key(key) if fmt == "vissl" else key
    mod, leaf = _split_leaf(key)
    stem = _lookup(_STEM, col, mod)
    if stem is not None:
        return f"{stem}.{leaf}"
    if fmt == "timm":
        m = _TIMM_BLOCK.match(key)
        if not m:
            return None
        s, i, rest = int(m.group(1)) - 1, int(m.group(2)) - 1, m.group(3)
    elif fmt == "torchvision":
        m = _TV_BLOCK.match(key)
        if not m or m.group(1) != m.group(2):
            return None
        s, i, rest = int(m.group(1)) - 1, int(m.group(3)), m.group(4)
    else:
        m = _VISSL_BLOCK.match(key)
        if not m or int(m.group(1)) != int(m.group(2)) + 1 or (m.group(4) and m.group(4) != m.group(2)):
            return None
        s, i, rest = int(m.group(2)) - 1, int(m.group(5)), m.group(6)
    mod, leaf = _split_leaf(rest)
    ours = _lookup(_BLOCK, col, mod)
    if ours is None or s < 0 or i < 0:
        return None
    return f"stages.{s}.blocks.{i}.{ours}.{leaf}"


def from_ours(fmt: str, key: str, part_of: Optional[Callable[[int, int], int]] = None) -> str:
    """The `fmt` name of one of our trunk keys. `part_of(s, i)` puts VISSL blocks in FSDP groups."""
    if fmt == "seer":
        return key
    col = _COL[fmt]
    mod, leaf = _split_leaf(key)
    if mod in _STEM:
        return f"{_STEM[mod][col]}.{leaf}"
    m = _OURS_BLOCK.match(key)
    if not m:
        raise WeightsFormatError(f"not a trunk key of ours: {key!r}")
    s, i = int(m.group(1)), int(m.group(2))
    bmod, leaf = _split_leaf(m.group(3))
    theirs = _BLOCK[bmod][col]
    if fmt == "timm":
        return f"s{s + 1}.b{i + 1}.{theirs}.{leaf}"
    if fmt == "torchvision":
        return f"trunk_output.block{s + 1}.block{s + 1}-{i}.{theirs}.{leaf}"
    group = "" if part_of is None else f"block{s + 1}-part{part_of(s, i)}."
    return f"_feature_blocks.res{s + 2}.{group}block{s + 1}-{i}.{theirs}.{leaf}"


def rename_trunk(fmt: str, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their trunk dict -> ours; any key that is not a trunk key raises, naming a few."""
    out: dict[str, torch.Tensor] = {}
    bad = []
    for k, v in sd.items():
        ours = to_ours(fmt, k)
        if ours is None:
            bad.append(k)
        elif ours in out:
            raise WeightsFormatError(f"{fmt} weights name {ours!r} twice (last as {k!r})")
        else:
            out[ours] = v
    if bad:
        raise WeightsFormatError(
            f"{len(bad)} {fmt} key(s) are not RegNetY trunk keys, e.g. {sorted(bad)[:4]}")
    return out


def trunk_from_ours(fmt: str, sd: Mapping[str, torch.Tensor],
                    part_of: Optional[Callable[[int, int], int]] = None) -> dict[str, torch.Tensor]:
    """Our trunk dict -> `fmt` names (tensors shared, not copied)."""
    return {from_ours(fmt, k, part_of): v for k, v in sd.items()}


def vissl_parts(depths: Sequence[int], delimiters: Sequence[Sequence[int]] = ()) -> Callable[[int, int], int]:
    """Block -> FSDP group index from VISSL's `stage_checkpoints` (e.g. SEER 10B: [[2],[7],[9,17],[]]).

    A stage without delimiters is one group; missing end delimiters are implied (regnet_fsdp.py).
    """
    bounds: list[list[int]] = []
    for s, d in enumerate(depths):
        b = sorted(delimiters[s]) if s < len(delimiters) else []
        if not b or b[-1] != d:
            b = [*b, d]
        bounds.append(b)

    def part_of(s: int, i: int) -> int:
        return next(g for g, end in enumerate(bounds[s]) if i < end)

    return part_of


# SwAV head: ours `projection.{j}` / `prototypes` <-> VISSL swav_head `projection_head.{j}` /
# `prototypes0` under head index 0 (both are Linear[, BN], ReLU, ... Linear sequences).
def head_to_vissl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our SwAV head dict -> VISSL `heads` names (head index 0)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("projection."):
            out["0.projection_head." + k[len("projection."):]] = v
        elif k == "prototypes.weight":
            out["0.prototypes0.weight"] = v
        else:
            raise WeightsFormatError(f"not a SwAV head key of ours: {k!r}")
    return out


def head_from_vissl(sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """VISSL heads -> (our SwAV head, linear classifier, keys of heads we do not model)."""
    head: dict[str, torch.Tensor] = {}
    clf: dict[str, torch.Tensor] = {}
    skipped = []
    for k, v in sd.items():
        k2 = clean_key(k)
        if k2.startswith("0.projection_head."):
            head["projection." + k2[len("0.projection_head."):]] = v
        elif k2 == "0.prototypes0.weight":
            head["prototypes.weight"] = v
        elif re.match(r"^\d+\.clf\.0\.(weight|bias)$", k2):  # VISSL linear eval head (timm: 0.clf.0)
            clf[k2.rsplit(".", 1)[1]] = v
        else:
            skipped.append(k)
    return head, clf, skipped


def tensors_only(items: Iterable[tuple[str, object]], where: str) -> dict[str, torch.Tensor]:
    """A dict of the items, raising on any value that is not a tensor."""
    out = {}
    for k, v in items:
        if not isinstance(v, torch.Tensor):
            raise WeightsFormatError(f"{where}: {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v
    return out
