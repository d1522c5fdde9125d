"""The libraries our hand-written codec kernels were checked against, pinned; and the WebP ABI guard.

Bit-exact kernels and what proves them (rerun these before changing a pin below):
- colour jitter / grayscale (seer_pipeline/data/colour.py) vs PIL ImageEnhance and HSV: tests/
  test_multicrop.py::test_colour_kernels_match_pil, ::test_hue_kernel_matches_pil_on_every_colour;
- Gaussian blur (seer_pipeline/data/blur.py) vs PIL's GaussianBlur: ::test_blur_kernel_matches_pil;
- ctypes WebP (seer_pipeline/codecs/webp.py) vs PIL: ::test_webp_and_jpeg_fast_decoders_match_pil;
- DC-scan pruning (seer_pipeline/codecs/jpeg_scans.py) vs libjpeg-turbo through simplejpeg:
  tests/test_jpeg_scans.py::test_pruned_decode_is_bit_identical.
"""
from __future__ import annotations

import ctypes
import io
import re
from pathlib import Path

import numpy as np
import PIL
import pytest
import simplejpeg
from PIL import Image
from PIL import features

from seer_pipeline.codecs import webp

RERUN = ("the bit-exact kernels were checked against {what} {want}; this machine has {got}. Rerun "
         "tests/test_multicrop.py and tests/test_jpeg_scans.py (the exhaustive kernel tests) against "
         "the new version, then update the pin here")

# pillow-simd 12.1.1.post0 is what `make install` builds (scripts/install_pillow_simd.sh).
CHECKED_PIL = {"12.1.1.post0"}
CHECKED_PIL_LIBJPEG_TURBO = {"2.1.5"}  # Debian 12's libjpeg62-turbo, linked by pillow-simd
CHECKED_LIBWEBP = {"1.2.4"}  # Debian 12's libwebp7, linked by PIL and loaded by codecs/webp.py
CHECKED_SIMPLEJPEG = {"1.9.0"}
CHECKED_SIMPLEJPEG_TURBO = {"3.1.2"}  # statically linked into simplejpeg 1.9.0's wheel


def _pin(what: str, got: str, want: set) -> None:
    assert got in want, RERUN.format(what=what, want=sorted(want), got=got)


def test_pil_and_its_codec_libraries_are_the_checked_ones() -> None:
    _pin("PIL/pillow-simd", PIL.__version__, CHECKED_PIL)
    _pin("PIL's libjpeg-turbo", str(features.version("libjpeg_turbo")), CHECKED_PIL_LIBJPEG_TURBO)
    _pin("PIL's libwebp", str(features.version("webp")), CHECKED_LIBWEBP)


def test_libwebp_loaded_by_the_ctypes_binding_is_the_checked_one() -> None:
    assert webp.available(), "libwebp not found: the WebP fast path is off on this machine"
    v = webp.library_version(webp._LIB)
    _pin("libwebp (ctypes)", f"{v >> 16}.{(v >> 8) & 0xFF}.{v & 0xFF}", CHECKED_LIBWEBP)
    assert webp.CHECKED_VERSION in CHECKED_LIBWEBP


def test_simplejpeg_and_its_libjpeg_turbo_are_the_checked_ones() -> None:
    _pin("simplejpeg", simplejpeg.__version__, CHECKED_SIMPLEJPEG)
    # The wheel carries its own libjpeg-turbo; its banner string names the version (read, not run).
    so = next(Path(simplejpeg.__file__).parent.glob("_jpeg*.so"))
    m = re.search(rb"libjpeg-turbo version (\d+\.\d+\.\d+)", so.read_bytes())
    assert m, f"no libjpeg-turbo version string in {so}"
    _pin("simplejpeg's libjpeg-turbo", m.group(1).decode(), CHECKED_SIMPLEJPEG_TURBO)


def test_abi_check_accepts_only_the_copied_major() -> None:
    assert webp.abi_compatible(0x010204) and webp.abi_compatible(0x010600)
    assert not webp.abi_compatible(0x020000) and not webp.abi_compatible(0x000603)


def _webp_bytes() -> bytes:
    a = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "WEBP", quality=90)
    return buf.getvalue()


def test_other_libwebp_major_falls_back_to_pil(monkeypatch: pytest.MonkeyPatch) -> None:
    # A libwebp reporting 2.0.0 must not be driven through the 1.x struct layout: the binding
    # switches itself off and every caller decodes through PIL, with the same pixels.
    from seer_pipeline.config.crops import CROP_PRESETS
    from seer_pipeline.data.augment import MultiCrop
    from data_prep.images import ProcessOptions, process_bytes

    data = _webp_bytes()
    assert webp.decode_webp(data) is not None  # the fast path is on before the patch
    opts = ProcessOptions(resize_short_side=20)
    monkeypatch.setattr(webp, "library_version", lambda lib: 0x020000)
    monkeypatch.setattr(webp, "_LIB", webp._load())
    assert webp._LIB is None and not webp.available()
    assert webp.decode_webp(data) is None and webp.webp_size(data) is None
    crops = MultiCrop(*CROP_PRESETS["seer"])(data, np.random.default_rng(0))
    assert len(crops) == 6 and all(c.isfinite().all() for c in crops)
    res = process_bytes(0, "x.webp", data, opts)  # seer-shards' decoder: PIL + resize
    assert res.reason is None and (res.width, res.height) == (28, 20), res


def test_refused_abi_falls_back_to_pil(monkeypatch: pytest.MonkeyPatch) -> None:
    # The library's own check (WebPInitDecoderConfigInternal refuses another ABI major) also
    # switches the binding off rather than decoding into a mismatched layout.
    monkeypatch.setattr(webp, "_ABI", 0x0309)
    monkeypatch.setattr(webp, "_LIB", webp._load())
    assert webp._LIB is None
    lib = ctypes.CDLL(ctypes.util.find_library("webp"))
    assert webp.library_version(lib) >> 16 == 1
