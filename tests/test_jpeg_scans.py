"""A progressive JPEG pruned to its DC scans decodes at 1/8 scale to the very same pixels."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from seer_pipeline.data.augment import MultiCrop
from seer_pipeline.codecs import jpeg_scans
from seer_pipeline.codecs.jpeg_scans import eighth_scale_scans


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _eighth(data: bytes) -> np.ndarray:
    w, h = Image.open(io.BytesIO(data)).size
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(w / 8),
                                  min_height=math.ceil(h / 8))


@pytest.fixture(scope="module")
def progressive(photo_dir: Path) -> List[Tuple[str, bytes]]:
    """Real photos re-saved as progressive JPEGs in every chroma layout libjpeg scales apart."""
    out = []
    for p in sorted(photo_dir.glob("*.jpg")):
        rgb = Image.open(p).convert("RGB")
        big = rgb.resize((rgb.width * 2, rgb.height * 2), Image.Resampling.BICUBIC)  # > 1 MP
        for sub, name in ((0, "4:4:4"), (1, "4:2:2"), (2, "4:2:0")):
            out.append((f"{p.name} {name}", _jpeg(big, quality=90, progressive=True, subsampling=sub)))
        out.append((f"{p.name} gray", _jpeg(big.convert("L"), quality=85, progressive=True)))
        out.append((f"{p.name} optimized", _jpeg(rgb, quality=75, progressive=True, optimize=True)))
    return out


def test_pruned_decode_is_bit_identical(progressive: List[Tuple[str, bytes]]) -> None:
    for name, data in progressive:
        pruned = eighth_scale_scans(data)
        assert pruned is not None, name
        assert len(pruned) < 0.6 * len(data), (name, len(pruned), len(data))
        assert np.array_equal(_eighth(pruned), _eighth(data)), name


def test_zeroed_tables_are_what_keeps_it_exact(progressive: List[Tuple[str, bytes]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the zeroed AC quantisers libjpeg-turbo's block smoothing would move the DC of
    # blocks that lost their AC scans: the pruning must not silently rely on luck.
    monkeypatch.setattr(jpeg_scans, "_zero_ac", lambda segment, tables: segment)
    differ = 0
    for name, data in progressive:
        pruned = eighth_scale_scans(data)
        assert pruned is not None, name
        differ += not np.array_equal(_eighth(pruned), _eighth(data))
    assert differ >= len(progressive) // 2, (differ, len(progressive))


def test_anything_unusual_falls_back(photo_dir: Path) -> None:
    rgb = Image.open(photo_dir / "opencv-doc__examples_data_butterfly.jpg").convert("RGB")
    assert eighth_scale_scans(_jpeg(rgb)) is None  # sequential: every scan carries DC and AC
    prog = _jpeg(rgb, progressive=True)
    assert eighth_scale_scans(prog[: len(prog) // 2]) is None  # cut: the decoder must judge it
    assert eighth_scale_scans(prog[:-2]) is None  # no EOI
    assert eighth_scale_scans(b"\x89PNG\r\n\x1a\n" + prog) is None
    assert eighth_scale_scans(b"") is None
    broken = bytearray(prog)
    at = prog.index(b"\xff\xc2")
    broken[at + 2:at + 4] = (60000).to_bytes(2, "big")  # SOF length past the end
    assert eighth_scale_scans(bytes(broken)) is None
    assert eighth_scale_scans(prog[:at + 2] + b"\x00\x02\xff\xd9") is None  # SOF shorter than its fields
    rng = np.random.default_rng(0)  # damaged headers: None or a file, never an exception
    for _ in range(2000):
        d = bytearray(prog)
        for i in rng.integers(0, 1500, rng.integers(1, 5)):
            d[i] = rng.integers(0, 256)
        out = eighth_scale_scans(bytes(d[: rng.integers(len(d) // 2, len(d) + 1)]))
        assert out is None or isinstance(out, bytes)


def test_multicrop_uses_it_only_at_one_eighth(progressive: List[Tuple[str, bytes]]) -> None:
    name, data = next((n, d) for n, d in progressive if n.endswith("4:2:0"))
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    eighth = MultiCrop._decode(img, data, [(0, 0, w, h)], [min(w, h) // 8])
    assert eighth.size == (math.ceil(w / 8), math.ceil(h / 8))
    assert np.array_equal(np.asarray(eighth), _eighth(data))
    quarter = MultiCrop._decode(Image.open(io.BytesIO(data)), data, [(0, 0, w, h)], [min(w, h) // 4])
    assert quarter.size == (math.ceil(w / 4), math.ceil(h / 4))
