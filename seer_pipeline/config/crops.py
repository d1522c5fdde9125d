"""The one table of multi-crop presets (torch-free: the planner and `seer-submit` read it too).

A preset is (size_crops, nmb_crops, min_scale_crops, max_scale_crops), the four lists of SwAV's
`main_swav.py` arguments; RandomResizedCrop draws each crop's area fraction from [min, max].
"""
from __future__ import annotations

CropSpec = tuple[list[int], list[int], list[float], list[float]]

CROP_PRESETS: dict[str, CropSpec] = {
    # SwAV paper (Caron et al. 2020) / repo main_swav.py: 2x224 + 6x96.
    "swav": ([224, 96], [2, 6], [0.14, 0.05], [1.0, 0.14]),
    # SEER model card / VISSL's 2x160+4x96 yaml: SEER's cheaper setting.
    "seer": ([160, 96], [2, 4], [0.14, 0.05], [1.0, 0.14]),
    # SEER paper (Goyal et al. 2021, section 3.1): 2x224 + 4x96.
    "seer2021": ([224, 96], [2, 4], [0.14, 0.05], [1.0, 0.14]),
}


def crop_counts(name: str) -> list[tuple[int, int]]:
    """[(count, resolution)] of a preset, e.g. seer2021 -> [(2, 224), (4, 96)]."""
    sizes, counts, _, _ = CROP_PRESETS[name]
    return list(zip(counts, sizes))
