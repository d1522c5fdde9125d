"""gpu_check's first steps on a machine it has never seen: refuse early and clearly, then record
where it runs. A lent GPU machine brings its own Python with CUDA torch, numpy and numba, and
`benchmarks/gpu_run.sh` adds the rest from gpu-bundle/ (docs/gpu.md); a missing piece must
stop the check in seconds, not fail inside seven training processes.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

#: What the check's processes import beyond the standard library and torch's own requirements
#: (traced from a --smoke run: every process's site-packages modules), with where each comes
#: from on a lent machine: "machine" = its Python (too large to carry, scripts/gpu_bundle.py
#: MACHINE), "bundle" = gpu-bundle/ (scripts/gpu_bundle.txt).
NEEDED = {"numpy": "machine", "numba": "machine", "llvmlite": "machine", "PIL": "bundle",
          "simplejpeg": "bundle", "omegaconf": "bundle", "yaml": "bundle"}
#: The product modules the check's processes run (seer-train, seer-plan --simulate, the shards).
PRODUCT = ("seer_pipeline.train.cli", "seer_pipeline.train.trainer", "seer_pipeline.data.augment",
           "seer_pipeline.plan.cli", "seer_pipeline.shards.synth")
HINT = (f"gpu_run.sh installed gpu-bundle/ into {os.environ['SEER_GPU_SITE']}; see docs/gpu.md"
        if os.environ.get("SEER_GPU_SITE") else
        "on a GPU machine run `bash benchmarks/gpu_run.sh`, which installs gpu-bundle/ (made by "
        "`make gpu-bundle`) first; see docs/gpu.md")


def preflight() -> str | None:
    """None when the check can run in this Python; else the one line that says why not."""
    try:
        import torch
    except ImportError as e:
        return (f"gpu_check: torch is not importable in {sys.executable} ({e}): use the Python that "
                f"has the machine's CUDA torch (python3 on a lent machine); {HINT}")
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError as e:  # absent, or present but broken (numba against a newer numpy)
            where = ("the machine's Python must have it (too large to bundle)" if NEEDED[name] == "machine"
                     else "it comes from gpu-bundle/")
            return f"gpu_check: cannot import {name} ({e}): {where}; {HINT}"
    from seer_pipeline.distributed.parallelize import check_torch_version

    try:
        check_torch_version(torch.__version__)
    except RuntimeError as e:
        return f"gpu_check: {e}"
    for mod in PRODUCT:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return f"gpu_check: {mod} does not import ({e}); {HINT}"
    return None


def environment() -> dict[str, Any]:
    """Python, torch, CUDA and the version and folder of every module in NEEDED."""
    import torch

    from seer_pipeline.train.provenance import provenance

    env = provenance(world_size=1, threads=torch.get_num_threads())
    env.update({"python_executable": sys.executable, "torch": torch.__version__,
                "torch_cuda": torch.version.cuda, "bundle_site": os.environ.get("SEER_GPU_SITE")})
    env["modules"] = {}
    for name, source in NEEDED.items():
        m = importlib.import_module(name)
        env["modules"][name] = {"version": getattr(m, "__version__", None), "expected_from": source,
                                "folder": str(Path(m.__file__ or "").parent.parent)}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update({"cuda_device": p.name, "capability": f"{p.major}.{p.minor}",
                    "cuda_memory_gib": p.total_memory / 2**30, "cudnn": torch.backends.cudnn.version(),
                    "nccl": ".".join(map(str, torch.cuda.nccl.version()))})
    return env
