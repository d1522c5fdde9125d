"""The one table of GPU peaks (torch-free), for the planner's MFU and the GPU check.

Dense tensor-core peaks from NVIDIA datasheets, no sparsity: V100 SXM2, A100 SXM4, H100 SXM5,
H200 SXM (same compute as H100), L40S, A10. `mem_gib` is the card's memory (A100 comes as 40 GB,
which SEER 10B used, and 80 GB).
"""
from __future__ import annotations

GPUS: dict[str, dict[str, float]] = {
    "v100": {"fp16": 125e12, "bf16": 0.0, "fp32": 15.7e12, "mem_gib": 32},
    "a100": {"fp16": 312e12, "bf16": 312e12, "fp32": 19.5e12, "mem_gib": 80},
    "a100_40gb": {"fp16": 312e12, "bf16": 312e12, "fp32": 19.5e12, "mem_gib": 40},
    "h100": {"fp16": 989.4e12, "bf16": 989.4e12, "fp32": 67e12, "mem_gib": 80},
    "h200": {"fp16": 989.4e12, "bf16": 989.4e12, "fp32": 67e12, "mem_gib": 141},
    "l40s": {"fp16": 362.05e12, "bf16": 362.05e12, "fp32": 91.6e12, "mem_gib": 48},
    "a10": {"fp16": 125e12, "bf16": 125e12, "fp32": 31.2e12, "mem_gib": 24},
}


def gpu_key(device_name: str) -> str | None:
    """Table key for a CUDA device name such as 'NVIDIA H200' or 'NVIDIA A100-SXM4-40GB'."""
    name = device_name.lower().replace(" ", "")
    for key in sorted(GPUS, key=len, reverse=True):
        base, _, mem = key.partition("_")
        if base in name and (not mem or mem in name):
            return key
    return None
