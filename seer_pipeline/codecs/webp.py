"""WebP decoding straight to RGB through libwebp's advanced API (ctypes); PIL is the fallback.

Torch-free: the loader and `seer-shards` both use it.

PIL decodes every WebP through the animation decoder (RGBA, then a copy to RGB): 25.6 ms for a
1920x1080 photo vs 11.1 ms here (one core, loaded machine). libwebp can also scale while it
converts from YUV (`use_scaling`): for multi-crop that measured no faster (12.3 ms at 1/2, 9.5 ms
at 1/4: the VP8 decode dominates), so the loader decodes at full size; `seer-shards` uses it to
resize (23% less time than a full decode + bicubic resize on the WebPs of the benchmark photo set,
docs/benchmarks.md).
The library is the one PIL's WebP plugin links (Debian's libwebp7). The structures below are
copied by hand from webp/decode.h of libwebp 1.2.4 (WEBP_DECODER_ABI_VERSION 0x0209): a library
of another major version, or one whose decoder refuses that ABI, could lay them out differently
and a wrong layout would write out of bounds. So `_load` checks both and, on any mismatch,
`decode_webp` returns None and the caller uses PIL.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Optional

from PIL import Image

log = logging.getLogger(__name__)

_ABI = 0x0209  # WEBP_DECODER_ABI_VERSION in webp/decode.h of libwebp 1.2.4, the layout below
# libwebp keeps the decoder ABI major (the high byte) for a whole 1.x series; a minor ABI bump only
# appends to the padding. WebPGetDecoderVersion() packs (major << 16) | (minor << 8) | revision.
_LIB_MAJOR = 1
CHECKED_VERSION = "1.2.4"  # exhaustively checked against PIL (tests/test_codec_versions.py)
_MODE_RGB = 0


class _Features(ctypes.Structure):
    _fields_ = [("width", ctypes.c_int), ("height", ctypes.c_int), ("has_alpha", ctypes.c_int),
                ("has_animation", ctypes.c_int), ("format", ctypes.c_int), ("pad", ctypes.c_uint32 * 5)]


class _RGBA(ctypes.Structure):
    _fields_ = [("rgba", ctypes.c_void_p), ("stride", ctypes.c_int), ("size", ctypes.c_size_t)]


class _YUVA(ctypes.Structure):
    _fields_ = [("y", ctypes.c_void_p), ("u", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("a", ctypes.c_void_p), ("y_stride", ctypes.c_int), ("u_stride", ctypes.c_int),
                ("v_stride", ctypes.c_int), ("a_stride", ctypes.c_int), ("y_size", ctypes.c_size_t),
                ("u_size", ctypes.c_size_t), ("v_size", ctypes.c_size_t), ("a_size", ctypes.c_size_t)]


class _Union(ctypes.Union):
    _fields_ = [("RGBA", _RGBA), ("YUVA", _YUVA)]


class _DecBuffer(ctypes.Structure):
    _fields_ = [("colorspace", ctypes.c_int), ("width", ctypes.c_int), ("height", ctypes.c_int),
                ("is_external_memory", ctypes.c_int), ("u", _Union), ("pad", ctypes.c_uint32 * 4),
                ("private_memory", ctypes.c_void_p)]


class _Options(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in (
        "bypass_filtering", "no_fancy_upsampling", "use_cropping", "crop_left", "crop_top",
        "crop_width", "crop_height", "use_scaling", "scaled_width", "scaled_height", "use_threads",
        "dithering_strength", "flip", "alpha_dithering_strength")] + [("pad", ctypes.c_uint32 * 5)]


class _Config(ctypes.Structure):
    _fields_ = [("input", _Features), ("output", _DecBuffer), ("options", _Options)]


def library_version(lib: ctypes.CDLL) -> int:
    """WebPGetDecoderVersion(): (major << 16) | (minor << 8) | revision."""
    lib.WebPGetDecoderVersion.restype = ctypes.c_int
    return int(lib.WebPGetDecoderVersion())


def abi_compatible(version: int) -> bool:
    """Whether a libwebp of `version` (WebPGetDecoderVersion) has the struct layout copied here."""
    return (version >> 16) == _LIB_MAJOR


def _load() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("webp")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        version = library_version(lib)
        if not abi_compatible(version):
            log.warning("libwebp %d.%d.%d is not the 1.x series whose decoder ABI 0x%04x this "
                        "binding copies; WebP decodes through PIL", version >> 16,
                        (version >> 8) & 0xFF, version & 0xFF, _ABI)
            return None
        lib.WebPInitDecoderConfigInternal.argtypes = [ctypes.POINTER(_Config), ctypes.c_int]
        lib.WebPGetFeaturesInternal.argtypes = [ctypes.c_char_p, ctypes.c_size_t,
                                                ctypes.POINTER(_Features), ctypes.c_int]
        lib.WebPDecode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Config)]
        if not lib.WebPInitDecoderConfigInternal(ctypes.byref(_Config()), _ABI):
            log.info("libwebp %s has another decoder ABI; WebP decodes through PIL", name)
            return None
        return lib
    except (OSError, AttributeError) as e:
        log.info("libwebp not usable (%s); WebP decodes through PIL", e)
        return None


_LIB = _load()


def available() -> bool:
    return _LIB is not None


def webp_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) of a still WebP from its header alone (~1 us; PIL's open: ~120 us), or None."""
    if _LIB is None or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    feat = _Features()
    if _LIB.WebPGetFeaturesInternal(data, len(data), ctypes.byref(feat), _ABI) != 0:
        return None
    if feat.has_animation or feat.width <= 0 or feat.height <= 0:
        return None
    return feat.width, feat.height


def decode_webp(data: bytes, opaque_only: bool = False,
                size: Optional[tuple[int, int]] = None) -> Optional[Image.Image]:
    """RGB image of a still WebP (alpha dropped, as PIL's convert("RGB")), or None.

    `size` (w, h) smaller than the image: libwebp downscales while it converts from YUV, with its
    area-averaging rescaler (antialiased, not bicubic). None means "let PIL decide": no usable
    libwebp, an animation, a stream libwebp rejects (PIL then raises its own error for a broken
    file, which the caller counts), or, with `opaque_only`, an image with an alpha channel (for
    callers that composite it themselves).
    """
    if _LIB is None:
        return None
    cfg = _Config()
    if not _LIB.WebPInitDecoderConfigInternal(ctypes.byref(cfg), _ABI):
        return None
    if _LIB.WebPGetFeaturesInternal(data, len(data), ctypes.byref(cfg.input), _ABI) != 0:
        return None
    w, h = cfg.input.width, cfg.input.height
    if cfg.input.has_animation or w <= 0 or h <= 0 or (opaque_only and cfg.input.has_alpha):
        return None
    if size is not None and 0 < size[0] <= w and 0 < size[1] <= h and tuple(size) != (w, h):
        w, h = int(size[0]), int(size[1])
        opts = cfg.options
        opts.use_scaling, opts.scaled_width, opts.scaled_height = 1, w, h
    # A ctypes buffer rather than numpy: seer-shards imports this and starts faster without numpy.
    out = (ctypes.c_ubyte * (h * w * 3))()
    buf = cfg.output
    buf.colorspace, buf.is_external_memory = _MODE_RGB, 1
    buf.u.RGBA.rgba, buf.u.RGBA.stride, buf.u.RGBA.size = ctypes.addressof(out), w * 3, len(out)
    if _LIB.WebPDecode(data, len(data), ctypes.byref(cfg)) != 0:
        return None
    return Image.frombuffer("RGB", (w, h), out, "raw", "RGB", 0, 1)
