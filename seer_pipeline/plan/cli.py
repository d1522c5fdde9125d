"""`seer-plan`: what a SEER-style run costs at scale, from the real model graph.

Two ways in: a trunk and the run's shape on the command line (`--model --gpus --batch-per-gpu
--crops ...`, full sharding), or a training preset (`--config seer_10b [key=value ...]`), whose
world size (SLURM nodes x tasks), mesh, crops, batch, precision, FSDP units and AC are the ones
`seer-train` would use. `--simulate` (with `--config`) also runs one real training step on fake
tensors at that world size (seer_pipeline.plan.simulate) and prints its measured peak. A DINO
preset (train.objective=dino) is planned with its teacher.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

from seer_pipeline.config.base import ConfigError
from seer_pipeline.config.train import load_train_config
from seer_pipeline.core.exit_codes import USAGE
from seer_pipeline.plan.activations import activation_profile
from seer_pipeline.plan.analytic import build_meta, largest_unit, plan, plan_config
from seer_pipeline.plan.shape import CROPS, DTYPE_BYTES, GIB, parse_crops
from seer_pipeline.plan.gpus import GPUS

# The planner's public API is this module, on purpose: `seer-plan` and the functions behind its
# numbers, so tests and benchmarks call `cli.plan(...)` for what the command prints.
__all__ = ["FIT_CARDS", "FIT_SHARE", "activation_profile", "build_meta", "fits", "largest_unit",
           "main", "parse_crops", "plan", "render", "render_simulation"]

#: Cards the fit columns are reported for (SEER 10B trained on A100-40GB).
FIT_CARDS = ("a100_40gb", "h100", "h200")
#: Share of a card's memory a plan may use: the rest is the CUDA context (~0.5-1 GiB), NCCL
#: buffers and the caching allocator's fragmentation, none of which either estimate counts.
FIT_SHARE = 0.9


def fits(peak_gib: float) -> dict[str, bool]:
    """Whether a per-GPU peak fits each card of FIT_CARDS with the FIT_SHARE margin."""
    return {c: peak_gib <= FIT_SHARE * GPUS[c]["mem_gib"] for c in FIT_CARDS}


def _fmt_bytes(b: float) -> str:
    return f"{b / GIB:8.2f} GiB"


def _teacher_rows(p: dict[str, Any]) -> list[str]:
    """A DINO plan's teacher: its parameters and buffers, its forward, its targets."""
    if "teacher" not in p:
        return []
    m, t = p["memory_per_gpu_bytes"], p["teacher"]
    crops = "+".join(f"{n}x{r}" for n, r in t["crops"])
    return [f"    teacher params (fp32)   {_fmt_bytes(m['teacher_params_sharded'])}  (no grads, no momentum)",
            f"    teacher BN buffers      {_fmt_bytes(m['teacher_buffers'])}",
            f"    {'teacher forward ' + crops:24s}{_fmt_bytes(m['teacher_forward'])}  (no_grad: nothing saved)",
            f"    teacher targets         {_fmt_bytes(m['teacher_targets'])}"]


def render(p: dict[str, Any]) -> str:
    m = p["memory_per_gpu_bytes"]
    crops = "+".join(f"{n}x{r}" for n, r in p["crops"])
    mesh = p.get("mesh") or (f"full {p['gpus']}" if p["shard_size"] == p["gpus"]
                             else f"hybrid {p['replicas']}x{p['shard_size']}")
    lines = [
        f"seer-plan: {p['model']} on {p['gpus']} x {p['gpu_type'].upper()} (mesh {mesh}), "
        f"{p['batch_per_gpu']}/GPU (global {p['global_batch']}), crops {crops}, {p['precision']}, AC {p['ac']}",
        f"  parameters            {p['params'] / 1e6:10.1f} M  (trunk {p['trunk_params'] / 1e6:.1f} M, "
        f"{'DINO' if 'teacher' in p else 'SwAV'} head {p['head_params'] / 1e6:.1f} M from {p['head_from']})",
        "  multiply-adds / crop  " + ", ".join(f"{r}px {v / 1e9:.2f} G" for r, v in p["macs_per_crop"].items()),
        f"  FLOPs / image (all crops): forward {p['fwd_flops_per_image'] / 1e12:.3f} T, "
        f"forward+backward {p['flops_per_image'] / 1e12:.3f} T",
        f"  memory per GPU (parameters split over {p['shard_size']} ranks):",
        f"    params (fp32, sharded)  {_fmt_bytes(m['params_sharded'])}",
        f"    grads (sharded)         {_fmt_bytes(m['grads_sharded'])}",
        f"    LARS momentum (sharded) {_fmt_bytes(m['optimizer_sharded'])}",
        f"    BN buffers              {_fmt_bytes(m['buffers'])}",
        f"    gathered FSDP units     {_fmt_bytes(m['unsharded_units'])}",
        f"    input crops             {_fmt_bytes(m['inputs'])}",
        f"    activations, no AC      {_fmt_bytes(m['activations_no_ac'])}",
        f"    activations, stage AC   {_fmt_bytes(m['activations_stage_ac'])}",
        f"    activations, block AC   {_fmt_bytes(m['activations_block_ac'])}",
        f"    backward transient      {_fmt_bytes(m['backward_transient'])}",
        *_teacher_rows(p),
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


def render_simulation(s: dict[str, Any]) -> str:
    rows = [f"simulated step: {s['preset']} on {s['world_size']} ranks (mesh {s['mesh']}, "
            f"{s['fsdp_units']} FSDP units), {s['wall_s']:.1f} s, peak RSS {s['peak_rss_mib']:.0f} MiB"]
    rows += [f"    {k:22s}{v:10.3f} GiB" for k, v in s["simulated_gib"].items() if v]
    rows.append(f"  simulated peak {s['simulated_peak_gib']:.3f} GiB, planned {s['memory_per_gpu_gib']:.3f} GiB "
                f"(planned/simulated {s['planned_over_simulated']:.3f})")
    if "init_peak_gib" in s:
        i = {k: v * 1024 for k, v in s["init_gib"].items()}
        rows.append(f"  init (meta build, then this rank's rows): peak {s['init_peak_gib'] * 1024:.1f} MiB = "
                    f"shard {i['param_shards']:.1f} + buffers {i['buffers']:.1f} + staging "
                    f"{i['largest_local_param']:.1f} MiB (the whole fp32 model: {s['init_whole_model_gib']:.2f} GiB)")
    return "\n".join(rows)


def _json(obj: Any) -> str:
    return json.dumps(obj, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seer-plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="training preset or YAML: plan the run it describes")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of --config (e.g. data.batch_size=32)")
    ap.add_argument("--simulate", action="store_true", help="with --config: also run one fake step at scale")
    ap.add_argument("--model", default="regnety_256gf", help="trunk name or training preset")
    ap.add_argument("--gpus", type=int, default=None, help="default 512, or the preset's world size")
    ap.add_argument("--batch-per-gpu", type=int, default=16)
    ap.add_argument("--crops", default="seer2021", help=f"{', '.join(CROPS)} or e.g. 2x224+4x96")
    ap.add_argument("--precision", choices=tuple(DTYPE_BYTES), default=None,
                    help="default: fp16 on V100, bf16 on A100/H100 (SEER's own)")
    ap.add_argument("--ac", choices=("stage", "block", "none"), default="stage")
    ap.add_argument("--gpu-type", choices=tuple(GPUS), default=None, help="default v100 (h100 with --config)")
    ap.add_argument("--mfu", type=float, default=0.25, help="assumed model-FLOPs utilisation")
    ap.add_argument("--images", type=float, default=1e9, help="images seen, for the days estimate")
    ap.add_argument("--no-head", action="store_true", help="count the trunk only (no SwAV/DINO head)")
    ap.add_argument("--json", action="store_true", help="also print the numbers as a JSON last line")
    args = ap.parse_args(argv)
    if (args.simulate or args.overrides) and not args.config:
        ap.error("--simulate and key=value overrides need --config PRESET")
    try:
        if args.config:

            try:
                cfg = load_train_config(args.config, args.overrides)
            except ConfigError as e:
                raise ValueError(str(e)) from e
            p = plan_config(cfg, args.gpus, None, args.gpu_type or "h100", args.mfu, args.images)
        else:
            p = plan(args.model, args.gpus or 512, args.batch_per_gpu, args.crops, args.precision, args.ac,
                     args.gpu_type or "v100", args.mfu, args.images, not args.no_head)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"seer-plan: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return USAGE
    print(render(p))
    out: dict[str, Any] = p
    if args.simulate:
        from seer_pipeline.plan.simulate import simulate  # lazy: torch's test internals, --simulate only

        sim = simulate(cfg, args.gpus, None, args.gpu_type or "h100", args.config)
        print(render_simulation(sim))
        out = {**sim, "overrides": list(args.overrides), "fits_planned": fits(sim["memory_per_gpu_gib"]),
               "fits_simulated": fits(sim["simulated_peak_gib"]), "plan": p}
    if args.json:
        print(_json(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
