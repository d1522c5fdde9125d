"""Weight files in and out: this project's own, timm, torchvision and VISSL/SEER layouts.

The one owner of weight-file formats: detect a format from the keys, read the architecture
from the shapes, check it against a preset, convert between all formats (see docs/weights.md).
"""
from seer_pipeline.weights.arch import (
    TIMM_NAMES, TORCHVISION_NAMES, ArchMismatchError, TrunkArch, arch_of_config, check_arch,
    infer_arch, match_preset,
)
from seer_pipeline.weights.convert import (
    WeightSet, detect_format, export_dict, load_trunk_state, load_weights, safe_load, save_weights,
)
from seer_pipeline.weights.keys import FORMATS, WeightsFormatError

__all__ = [
    "FORMATS", "TIMM_NAMES", "TORCHVISION_NAMES", "ArchMismatchError", "TrunkArch", "WeightSet",
    "WeightsFormatError", "arch_of_config", "check_arch", "detect_format", "export_dict",
    "infer_arch", "load_trunk_state", "load_weights", "match_preset", "safe_load", "save_weights",
]
