"""RegNetY trunks (SEER configurations and small CPU ones) and their MAC counter."""
from seer_pipeline.models.flops import count_macs, trunk_macs
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
from seer_pipeline.models.trunk import RegNetTrunk, ResBottleneckBlock, Stage, Stem, build_trunk

__all__ = [
    "SEER_TRUNKS", "RegNetConfig", "RegNetConfigError", "RegNetTrunk", "ResBottleneckBlock",
    "Stage", "Stem", "adjust_to_groups", "build_trunk", "count_macs", "get_config",
    "list_trunks", "quantized_widths", "regnet_widths_depths", "trunk_macs",
]
