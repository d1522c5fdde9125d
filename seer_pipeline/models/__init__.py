"""RegNetY trunks (SEER configurations and small CPU ones) and their MAC counter."""
from seer_pipeline.models.regnet import (
    SEER_TRUNKS,
    RegNetConfig,
    RegNetConfigError,
    adjust_to_groups,
    get_config,
    list_trunks,
    quantized_widths,
    regnet_widths_depths,
)

# The torch modules load on first use: the config validator reads trunk names from the pure
# generator, and `seer-submit` must not pay for torch (PEP 562 module __getattr__).
_LAZY = {"count_macs": "flops", "trunk_macs": "flops", "RegNetTrunk": "trunk",
         "ResBottleneckBlock": "trunk", "Stage": "trunk", "Stem": "trunk", "build_trunk": "trunk"}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        # Lazy: `models.regnet` (the trunk table config validates against) loads without torch.
        import importlib

        return getattr(importlib.import_module(f"seer_pipeline.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'seer_pipeline.models' has no attribute {name!r}")


__all__ = [
    "SEER_TRUNKS", "RegNetConfig", "RegNetConfigError", "RegNetTrunk", "ResBottleneckBlock",
    "Stage", "Stem", "adjust_to_groups", "build_trunk", "count_macs", "get_config",
    "list_trunks", "quantized_widths", "regnet_widths_depths", "trunk_macs",
]
