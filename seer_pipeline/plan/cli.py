"""`seer-plan`: what a SEER-style run costs at scale, from the real model graph.

Parameters and multiply-adds come from the model built on the meta device: the trunk
(`count_macs` per crop resolution) and the SwAV head (projection MLP + prototypes) of the preset
named, or of the SEER preset that trains the named trunk. Activation memory is measured, not
guessed: one meta-device forward in training mode records every tensor autograd saves for backward (`saved_tensors_hooks`,
deduplicated by storage, parameters excluded), attributed to the stem or the stage running at
the time. Two batch sizes give an exact per-image slope. Activation checkpointing then keeps
only stage (or block) inputs plus one recomputed segment. Nothing is allocated.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from seer_pipeline.config.train import load_train_config
from seer_pipeline.data.crops import CROP_PRESETS, crop_counts
from seer_pipeline.eval.features import trunk_name_from_config
from seer_pipeline.models import build_trunk, count_macs, list_trunks
from seer_pipeline.models.swav import build_model
from seer_pipeline.plan.gpus import GPUS

GIB = 2**30
CROPS = {name: crop_counts(name) for name in CROP_PRESETS}  # name -> [(count, resolution)]
CROPS["seer160"] = CROPS["seer"]  # the name earlier plans used for SEER's 2x160+4x96
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SEER_MS_PER_ITER = 6125.0  # SEER 2021 paper, section 3.2 (512 V100-32GB, RegNetY-256GF)


def parse_crops(spec: str) -> list[tuple[int, int]]:
    """A preset name or 'NxR+NxR' (e.g. 2x224+4x96)."""
    if spec in CROPS:
        return CROPS[spec]
    if not re.fullmatch(r"\d+x\d+(\+\d+x\d+)*", spec):
        raise ValueError(f"--crops {spec!r}: a preset ({', '.join(CROPS)}) or like 2x224+4x96")
    return [(int(n), int(r)) for n, r in (p.split("x") for p in spec.split("+"))]


@dataclass
class ActProfile:
    """Bytes autograd saves per image (fp32) at one resolution, by segment."""
    resolution: int
    stem: float
    stages: list[float]  # saved inside each stage
    stage_inputs: list[float]  # input tensor of each stage (what stage-AC keeps)
    blocks: list[float]  # saved inside each block (all stages, in order)
    block_inputs: list[float]
    max_tensor: float  # the largest single saved tensor

    def saved(self, ac: str) -> float:
        """Per-image activation bytes held at the peak of backward under an AC policy."""
        full = self.stem + sum(self.stages)
        if ac == "none":
            return full
        # The first segment's input is the stem's output, which the stem already holds.
        if ac == "stage":
            return self.stem + sum(self.stage_inputs[1:]) + max(self.stages)
        if ac == "block":
            return self.stem + sum(self.block_inputs[1:]) + max(self.blocks)
        raise ValueError(f"ac must be none|stage|block, got {ac!r}")


def _record(trunk: nn.Module, res: int, batch: int) -> dict[str, Any]:
    seen: dict[int, tuple[Any, int, str]] = {}
    inputs: dict[str, int] = {}
    param_ids = {id(p) for p in trunk.parameters()}
    where = ["stem"]
    hooks = []

    def enter(name: str):
        def pre(_m: nn.Module, args: tuple) -> None:
            where[0] = name
            inputs[name] = args[0].untyped_storage().nbytes()
        return pre

    for i, stage in enumerate(trunk.stages):
        hooks.append(stage.register_forward_pre_hook(enter(f"s{i}")))
        for j, block in enumerate(getattr(stage, "blocks", [])):
            hooks.append(block.register_forward_pre_hook(enter(f"s{i}.b{j}")))

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in param_ids or isinstance(t, nn.Parameter):
            return t
        s = t.untyped_storage()
        # Keep the storage alive so its id cannot be reused by a later tensor.
        seen.setdefault(id(s), (s, s.nbytes(), where[0]))
        return t

    # Meta trunks cost nothing; a real one works too (and is how the meta count was checked).
    x = torch.empty(batch, 3, res, res, device=next(trunk.parameters()).device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trunk(x)
    finally:
        for h in hooks:
            h.remove()
    return {"seen": [(n, w) for _, n, w in seen.values()], "inputs": inputs}


def activation_profile(trunk: nn.Module, resolution: int) -> ActProfile:
    """Per-image saved bytes from two meta forwards (batch 1 and 2: the slope is per image)."""
    trunk.train()
    recs = [_record(trunk, resolution, b) for b in (1, 2)]

    def total(rec: dict[str, Any], pred) -> float:
        return float(sum(n for n, w in rec["seen"] if pred(w)))

    def slope(pred) -> float:
        return total(recs[1], pred) - total(recs[0], pred)

    n_st = len(trunk.stages)
    stages = [slope(lambda w, i=i: w == f"s{i}" or w.startswith(f"s{i}.")) for i in range(n_st)]
    bnames = [k for k in recs[0]["inputs"] if "." in k]
    blocks = [slope(lambda w, k=k: w == k) for k in bnames]
    inp = lambda k: float(recs[1]["inputs"][k] - recs[0]["inputs"][k])  # noqa: E731
    return ActProfile(
        resolution, slope(lambda w: w == "stem"), stages, [inp(f"s{i}") for i in range(n_st)],
        blocks, [inp(k) for k in bnames], float(max(n for n, _ in recs[1]["seen"])) / 2,
    )


def build_meta(model: str, with_head: bool = True) -> tuple[nn.Module, nn.Module | None, str]:
    """(trunk, SwAV head or None, where the head came from), built on the meta device.

    A training preset gives its own head. A trunk name borrows the head of the first preset
    that trains that trunk (SEER's presets: seer_32gf ... seer_10b); with none, no head.
    """
    name = trunk_name_from_config(model)
    preset = model if model.lower() not in list_trunks() else _preset_for(name)
    with torch.device("meta"):
        if preset is None or not with_head:
            why = "left out" if not with_head else "none (no preset trains this trunk)"
            return build_trunk(name), None, why
        m = build_model(load_train_config(preset))
    return m.trunk, m.head, preset


def _preset_for(trunk: str) -> str | None:
    for f in sorted(resources.files("seer_pipeline.config").joinpath("presets").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml") and OmegaConf.select(OmegaConf.load(str(f)), "model.trunk") == trunk:
            return f.name[:-5]
    return None


def head_macs(head: nn.Module | None) -> int:
    """Multiply-adds of the head per crop: its Linear layers (projection MLP and prototypes)."""
    if head is None:
        return 0
    return sum(m.in_features * m.out_features for m in head.modules() if isinstance(m, nn.Linear))


def largest_unit(trunk: nn.Module, head: nn.Module | None = None) -> int:
    """Parameters of the largest FSDP unit: one block (the trainer's default blocks_per_unit),
    the stem, the head's projection MLP or the prototypes (the head's two units)."""
    sizes = [sum(p.numel() for p in b.parameters()) for s in trunk.stages for b in s.blocks]
    sizes.append(sum(p.numel() for p in trunk.stem.parameters()))
    if head is not None:
        sizes += [sum(p.numel() for p in head.projection.parameters()),
                  sum(p.numel() for p in head.prototypes.parameters())]
    return max(sizes)


def plan(model: str, gpus: int, batch_per_gpu: int, crops: str = "seer2021",
         precision: str | None = None, ac: str = "stage", gpu_type: str = "v100",
         mfu: float = 0.25, images: float = 1e9, with_head: bool = True) -> dict[str, Any]:
    """Every number `seer-plan` prints, as one dict."""
    if gpu_type not in GPUS:
        raise ValueError(f"--gpu-type must be one of {', '.join(GPUS)}")
    precision = precision or ("fp16" if gpu_type == "v100" else "bf16")
    if not GPUS[gpu_type].get(precision):
        raise ValueError(f"{gpu_type} has no {precision} tensor cores")
    if gpus < 1 or batch_per_gpu < 1 or not 0 < mfu <= 1:
        raise ValueError("need gpus >= 1, batch_per_gpu >= 1 and 0 < mfu <= 1")
    crop_list = parse_crops(crops)
    trunk, head, head_from = build_meta(model, with_head)
    trunk_params = sum(p.numel() for p in trunk.parameters())
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    params = trunk_params + head_params
    trunk_macs = {r: count_macs(trunk, r) for _, r in crop_list}
    macs = {r: trunk_macs[r] + head_macs(head) for r in trunk_macs}
    fwd_flops = sum(n * 2 * macs[r] for n, r in crop_list)
    train_flops = 3 * fwd_flops  # backward = 2x forward (standard estimate, Kaplan et al. 2020)
    profiles = {r: activation_profile(trunk, r) for _, r in crop_list}
    b_act = DTYPE_BYTES[precision]  # autocast: saved activations are in the compute dtype
    scale = b_act / 4
    act = {a: batch_per_gpu * scale * sum(n * profiles[r].saved(a) for n, r in crop_list)
           for a in ("none", "stage", "block")}
    # Backward holds a gradient (and a temporary) the size of the largest saved activation.
    transient = 2 * scale * max(n * batch_per_gpu * profiles[r].max_tensor for n, r in crop_list)
    unit = largest_unit(trunk, head)
    shard = params / gpus
    mem = {
        "params_sharded": 4 * shard,  # fp32 master weights
        "grads_sharded": 4 * shard,
        "optimizer_sharded": 4 * shard,  # LARS: one momentum buffer
        # Two units gathered (current + prefetched) in the compute dtype, plus one unit's
        # unsharded gradient before its reduce-scatter.
        "unsharded_units": unit * (2 * b_act + b_act),
        "activations_no_ac": act["none"],
        "activations_stage_ac": act["stage"],
        "activations_block_ac": act["block"],
        "backward_transient": transient,
    }
    peak = (mem["params_sharded"] + mem["grads_sharded"] + mem["optimizer_sharded"]
            + mem["unsharded_units"] + act[ac] + transient)
    peak_flops = GPUS[gpu_type][precision]
    step_s = batch_per_gpu * train_flops / (peak_flops * mfu)
    global_batch = gpus * batch_per_gpu
    ips = global_batch / step_s
    comm_frac = (gpus - 1) / gpus
    # FULL_SHARD: all-gather in forward and again in backward, reduce-scatter the gradients.
    comm = comm_frac * params * (2 * b_act + b_act)
    out = {
        "model": model, "gpus": gpus, "batch_per_gpu": batch_per_gpu, "global_batch": global_batch,
        "crops": crop_list, "precision": precision, "ac": ac, "gpu_type": gpu_type, "mfu": mfu,
        "params": params, "trunk_params": trunk_params, "head_params": head_params, "head_from": head_from,
        "macs_per_crop": {str(r): macs[r] for r in macs},
        "trunk_macs_per_crop": {str(r): trunk_macs[r] for r in trunk_macs}, "head_macs_per_crop": head_macs(head),
        "flops_per_image": train_flops, "fwd_flops_per_image": fwd_flops,
        "memory_per_gpu_bytes": mem, "peak_memory_per_gpu_bytes": peak,
        "memory_per_gpu_gib": peak / GIB, "gpu_memory_gib": GPUS[gpu_type]["mem_gib"],
        "step_time_s": step_s, "images_per_s": ips, "days_for_images": images / ips / 86400,
        "images": images, "comm_bytes_per_gpu_per_step": comm,
        "activation_profile": {str(r): asdict(p) for r, p in profiles.items()},
    }
    if (model, gpus, batch_per_gpu, crops, gpu_type) == ("regnety_256gf", 512, 16, "seer2021", "v100"):
        measured = SEER_MS_PER_ITER / 1000
        out["seer_check"] = {"paper_step_s": measured, "planned_step_s": step_s,
                             "implied_mfu": batch_per_gpu * train_flops / (measured * peak_flops)}
    return out


def _fmt_bytes(b: float) -> str:
    return f"{b / GIB:8.2f} GiB"


def render(p: dict[str, Any]) -> str:
    m = p["memory_per_gpu_bytes"]
    crops = "+".join(f"{n}x{r}" for n, r in p["crops"])
    lines = [
        f"seer-plan: {p['model']} on {p['gpus']} x {p['gpu_type'].upper()}, {p['batch_per_gpu']}/GPU "
        f"(global {p['global_batch']}), crops {crops}, {p['precision']}, AC {p['ac']}",
        f"  parameters            {p['params'] / 1e6:10.1f} M  (trunk {p['trunk_params'] / 1e6:.1f} M, "
        f"SwAV head {p['head_params'] / 1e6:.1f} M from {p['head_from']})",
        "  multiply-adds / crop  " + ", ".join(f"{r}px {v / 1e9:.2f} G" for r, v in p["macs_per_crop"].items()),
        f"  FLOPs / image (all crops): forward {p['fwd_flops_per_image'] / 1e12:.3f} T, "
        f"forward+backward {p['flops_per_image'] / 1e12:.3f} T",
        "  memory per GPU:",
        f"    params (fp32, sharded)  {_fmt_bytes(m['params_sharded'])}",
        f"    grads (sharded)         {_fmt_bytes(m['grads_sharded'])}",
        f"    LARS momentum (sharded) {_fmt_bytes(m['optimizer_sharded'])}",
        f"    gathered FSDP units     {_fmt_bytes(m['unsharded_units'])}",
        f"    activations, no AC      {_fmt_bytes(m['activations_no_ac'])}",
        f"    activations, stage AC   {_fmt_bytes(m['activations_stage_ac'])}",
        f"    activations, block AC   {_fmt_bytes(m['activations_block_ac'])}",
        f"    backward transient      {_fmt_bytes(m['backward_transient'])}",
        f"    peak (AC {p['ac']:5s})         {_fmt_bytes(p['peak_memory_per_gpu_bytes'])}"
        f"  of {p['gpu_memory_gib']} GiB{'  (DOES NOT FIT)' if p['memory_per_gpu_gib'] > p['gpu_memory_gib'] else ''}",
        f"  at MFU {p['mfu']:.0%}: step {p['step_time_s'] * 1000:.0f} ms, {p['images_per_s']:.0f} images/s, "
        f"{p['days_for_images']:.1f} days for {p['images']:.0e} images",
        f"  FSDP traffic per GPU per step: {p['comm_bytes_per_gpu_per_step'] / 1e9:.2f} GB",
    ]
    if "seer_check" in p:
        c = p["seer_check"]
        lines.append(f"  SEER check: paper {c['paper_step_s'] * 1000:.0f} ms/iteration vs planned "
                     f"{c['planned_step_s'] * 1000:.0f} ms at MFU {p['mfu']:.0%}; the paper's time "
                     f"implies MFU {c['implied_mfu']:.1%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seer-plan", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="regnety_256gf", help="trunk name or training preset")
    ap.add_argument("--gpus", type=int, default=512)
    ap.add_argument("--batch-per-gpu", type=int, default=16)
    ap.add_argument("--crops", default="seer2021", help=f"{', '.join(CROPS)} or e.g. 2x224+4x96")
    ap.add_argument("--precision", choices=tuple(DTYPE_BYTES), default=None,
                    help="default: fp16 on V100, bf16 on A100/H100 (SEER's own)")
    ap.add_argument("--ac", choices=("stage", "block", "none"), default="stage")
    ap.add_argument("--gpu-type", choices=tuple(GPUS), default="v100")
    ap.add_argument("--mfu", type=float, default=0.25, help="assumed model-FLOPs utilisation")
    ap.add_argument("--images", type=float, default=1e9, help="images seen, for the days estimate")
    ap.add_argument("--no-head", action="store_true", help="count the trunk only (no SwAV head)")
    ap.add_argument("--json", action="store_true", help="also print the numbers as a JSON last line")
    args = ap.parse_args(argv)
    try:
        p = plan(args.model, args.gpus, args.batch_per_gpu, args.crops, args.precision, args.ac,
                 args.gpu_type, args.mfu, args.images, not args.no_head)
    except (ValueError, KeyError) as e:
        print(f"seer-plan: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(render(p))
    if args.json:
        print(json.dumps(p, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
