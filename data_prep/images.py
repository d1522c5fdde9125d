"""Per-image work done in the worker processes: read, hash, check, decode, convert, encode.

Every failure becomes a `Result` with a reason string; nothing here raises on bad input.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageFile, UnidentifiedImageError

from data_prep.jpeg import checked_signature, jpeg_damage, jpeg_has_eoi, jpeg_rgb, jpeg_without_header_padding
from seer_pipeline.codecs.jpeg_scans import eighth_scale_scans
from seer_pipeline.codecs.webp import decode_webp

# Our own --max-pixels check replaces PIL's bomb guard, which would raise at open time with a
# different threshold (and warn below it).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

# EXIF orientation tag (0x0112) -> the transpose that undoes it (EXIF 2.3, table "Orientation").
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ProcessOptions:
    """What the workers need to know (picklable)."""

    resize_short_side: Optional[int] = None
    quality: int = 95
    reencode: str = "auto"  # auto | always
    check: str = "full"  # full | header (pass-through JPEGs only)
    min_side: int = 16
    max_pixels: int = 100_000_000
    max_bytes: Optional[int] = 256 << 20
    signature: bool = False  # --dedup near / --exclude-near: workers add data_prep.near's signature


@dataclass
class Result:
    """Outcome for one input: `reason` is None when `data` holds the JPEG to store."""

    ordinal: int
    source: str
    size: int = 0
    sha256: str = ""
    reason: Optional[str] = None
    data: bytes = b""
    width: int = 0
    height: int = 0
    orig_width: int = 0
    orig_height: int = 0
    passthrough: bool = False
    spool: str = ""  # where a worker stored `data` (then dropped from the result)
    off: int = 0
    length: int = 0
    signature: str = ""  # data_prep.near, when ProcessOptions.signature


def read_source(path: str, max_bytes: Optional[int] = None) -> tuple[Optional[bytes], Optional[str]]:
    """Read a regular file of at most `max_bytes`; anything else is a reason, not an exception.

    FIFOs, devices and sockets (also behind a symlink) are never read: a FIFO would block the
    build and /dev/zero never ends. The type and size come from stat before any byte is read;
    O_NONBLOCK keeps even a FIFO swapped in after the stat from blocking the open.
    """
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return None, "not_an_image"
        if not stat.S_ISREG(st.st_mode):
            return None, "not_a_file"
        if max_bytes is not None and st.st_size > max_bytes:
            return None, "too_large"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, "vanished"
    except OSError:
        return None, "unreadable"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
            return None, "not_a_file"
        cap = None if max_bytes is None else max_bytes + 1
        with os.fdopen(fd, "rb", closefd=False) as f:
            # Size the read from fstat, not from the cap: read(cap) allocates the whole cap
            # (256 MiB by default) for every file, which cost 0.3 ms a file, 14% of a
            # pass-through build's CPU (docs/benchmarks.md). One byte more notices growth.
            data = f.read(st.st_size + 1 if cap is None else min(st.st_size + 1, cap))
            if len(data) > st.st_size and (cap is None or len(data) < cap):  # grew since fstat
                data += f.read() if cap is None else f.read(cap - len(data))
    except OSError:
        return None, "unreadable"
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # grew after the stat
        return None, "too_large"
    return data, None


def _target_size(w: int, h: int, short: Optional[int]) -> tuple[int, int]:
    if not short or min(w, h) <= short:
        return w, h
    if w <= h:
        return short, max(1, round(h * short / w))
    return max(1, round(w * short / h)), short


_STRIP_PIXELS = 1 << 18  # converted at a time: the copies of a conversion stay this small


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, transparency composited on white, converted in row strips.

    Whole-image conversion costs several full-size copies (a 16-bit PNG went through float64
    arrays at ~28 bytes a pixel); strip by strip, the peak is the decoded image plus the RGB
    result. Every step is per pixel, so the strips give the same pixels as one conversion.
    """
    if img.mode == "RGB":
        return img
    w, h = img.size
    top = 1.0
    if img.mode == "F":
        top = max(float(img.getextrema()[1]), 1.0)
    out = Image.new("RGB", (w, h))
    rows = max(1, _STRIP_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        out.paste(_strip_to_rgb(img.crop((0, y, w, min(h, y + rows))), top), (0, y))
    return out


def _strip_to_rgb(img: Image.Image, top: float) -> Image.Image:
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit greyscale: PIL's convert("L") clips at 255 instead of scaling; scale by hand.
        import numpy as np

        if mode == "F":
            arr = np.clip(np.asarray(img, dtype=np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
        else:  # round(x * 255 / 65535) in integers: x / 257 is never halfway, so this is exact
            x = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
            arr = ((x * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def _reason(msg: str) -> str:
    # PIL reports most failures as OSError/ValueError; the message tells the kinds apart.
    if "truncat" in msg or "premature" in msg:
        return "truncated"
    if "could not create decoder object" in msg:  # Pillow's WebP plugin on a cut or damaged file
        return "corrupt"
    if "decoder" in msg or "not available" in msg or "unsupported" in msg or "conversion" in msg:
        return "unsupported"
    return "corrupt"


def process_bytes(ordinal: int, source: str, data: bytes, opts: ProcessOptions,
                  exclude: frozenset[str] = frozenset()) -> Result:
    """Turn one input's bytes into a stored JPEG, or a skip reason."""
    res = Result(ordinal, source, size=len(data))
    if not data:
        res.reason = "empty"
        return res
    res.sha256 = hashlib.sha256(data).hexdigest()
    if res.sha256 in exclude:
        res.reason = "excluded"
        return res
    r = _decode_or_reason(res, data, opts)
    if r.reason == "corrupt" and data[:2] == b"\xff\xd8":
        clean = jpeg_without_header_padding(data)
        if clean is not None:  # padding between header segments only: judge the stream without it
            fresh = Result(res.ordinal, res.source, size=res.size, sha256=res.sha256)
            return _decode_or_reason(fresh, clean, opts)
    return r


def _decode_or_reason(res: Result, data: bytes, opts: ProcessOptions) -> Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _decode_and_encode(res, data, opts)
        except UnidentifiedImageError:
            res.reason = "not_an_image"
        except Image.DecompressionBombError:
            res.reason = "too_many_pixels"
        except NotImplementedError:
            res.reason = "unsupported"
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            res.reason = _reason(str(e).lower())
        except Exception:  # a decoder bug must cost one image, not the run
            res.reason = "corrupt"
    res.data = b""
    return res


def _decode_and_encode(res: Result, data: bytes, opts: ProcessOptions) -> Result:
    """Checks from the header, then the pass-through path or decode -> resize -> encode."""
    img = Image.open(io.BytesIO(data))  # parses the header only
    w, h = img.size
    if w * h > opts.max_pixels:
        res.reason = "too_many_pixels"
        return res
    if img.format == "PNG":
        # PNG carries a CRC per chunk: a flipped byte in the pixel data (IDAT) is caught here,
        # where the zlib stream may still inflate to plausible garbage. Then decode before the
        # EXIF lookup: Pillow reads a PNG's eXIf by loading the image, and a load that fails
        # inside the lookup leaves the image marked loaded, so a second load() returned the
        # partial pixels without an error (issue #22).
        Image.open(io.BytesIO(data)).verify()
        img.load()
    orient = _orientation(img)
    ow, oh = (h, w) if orient in (5, 6, 7, 8) else (w, h)
    res.orig_width, res.orig_height = ow, oh
    if min(ow, oh) < opts.min_side:
        res.reason = "too_small"
        return res
    tw, th = _target_size(ow, oh, opts.resize_short_side)
    resize = (tw, th) != (ow, oh)
    # Grey JPEGs pass through as they are, like colour ones: every reader converts to RGB when
    # it decodes, and a one-component JPEG decodes faster than any colour form of it.
    if img.format == "JPEG" and opts.reencode != "always" and orient == 1 and not resize \
            and img.mode in ("RGB", "L"):
        return _pass_through(res, data, img.mode, w, h, opts)
    # Work in the stored orientation and transpose at the end: resizing first is cheaper.
    sw, sh = (th, tw) if orient in (5, 6, 7, 8) else (tw, th)
    rgb, reason = _decode_rgb(img, data, (sw, sh), resize)
    del img  # the decoded image goes before the resize and encode: one less full-size copy
    if rgb is None:
        res.reason = reason
        return res
    return _encode(res, rgb, (sw, sh), orient, opts)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of formats that carry one; 1 when absent or unreadable."""
    try:
        orient = int(img.getexif().get(0x0112, 1)) if img.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    except Exception:
        orient = 1  # a broken EXIF block does not make the pixels unusable
    return orient if orient in _ORIENT else 1


def _pass_through(res: Result, data: bytes, mode: str, w: int, h: int, opts: ProcessOptions) -> Result:
    """Store a JPEG byte for byte once it passes --check."""
    if opts.check == "full":
        # The decoder is the judge of a damaged stream. Damage shows in the entropy-coded
        # data, which libjpeg decodes in full even at 1/8 DCT scaling; the scaling only skips
        # most of the inverse DCT and colour work we would throw away. Measured on the 121
        # JPEGs of the benchmark photo set (docs/benchmarks.md): 35% less CPU, and the same
        # verdict on 240 cut or byte-flipped copies of them.
        if opts.signature:  # --dedup near: the check's decode also gives the signature
            res.signature, reason = checked_signature(data, w, h)
        else:
            reason = jpeg_damage(data, mode)
        if reason is not None:
            res.reason = reason
            return res
    elif not jpeg_has_eoi(data):
        res.reason = "truncated"
        return res
    res.data, res.passthrough = data, True
    res.width, res.height = w, h
    return res


def _decode_rgb(img: Image.Image, data: bytes, size: tuple[int, int],
                resize: bool) -> tuple[Optional[Image.Image], Optional[str]]:
    """(RGB pixels at `size` or at the nearest cheaper decode scale above it, None), or (None,
    reason) for a JPEG the strict decode refuses."""
    (w, h), (sw, sh) = img.size, size
    fast = None
    if img.format == "JPEG":
        # Pillow decodes through libjpeg's corrupt-data warnings and returns the damaged pixels,
        # which we would re-encode as a clean-looking sample. One strict simplejpeg decode both
        # judges the stream and gives the pixels (the same pixels as Pillow's draft() decode at
        # the same DCT scale: same libjpeg-turbo, checked on the test photos).
        fast, reason = jpeg_rgb(data, img.mode, w, h, sw, sh)
        if reason is not None:
            return None, reason
        if fast is not None and "comment" in img.info:  # Pillow's save writes the source's COM
            fast.info["comment"] = img.info["comment"]  # segment: keep the stored bytes as before
        if fast is None and resize:  # CMYK and other modes: Pillow converts them
            if w // sw >= 8 and h // sh >= 8:  # PIL's draft() will pick 1/8: for a progressive
                # JPEG only the DC scans matter there; same pixels, 3.5x less time on the benchmark
                # set's progressive JPEGs (seer_pipeline/codecs/jpeg_scans.py).
                pruned = eighth_scale_scans(data)
                if pruned is not None:
                    img = Image.open(io.BytesIO(pruned))
            # DCT-domain downscaling (1/2, 1/4, 1/8) while decoding; never below the target size.
            img.draft("RGB", (sw, sh))
    # Opaque WebPs: libwebp straight to RGB, downscaled while converting from YUV (area
    # averaging): 23% less time than a full decode + bicubic on the benchmark set's WebPs, and the
    # WebPs are half of that set. Transparent ones go through PIL, which composites them on white.
    if img.format == "WEBP":
        fast = decode_webp(data, opaque_only=True, size=(sw, sh))
    if fast is not None:
        return fast, None
    if img.format == "GIF":
        img.seek(0)
    img.load()
    return _to_rgb(img), None


def _encode(res: Result, rgb: Image.Image, size: tuple[int, int], orient: int, opts: ProcessOptions) -> Result:
    """Resize to `size` (stored orientation), undo the EXIF orientation, sign, encode."""
    if rgb.size != size:
        # reducing_gap: a box reduction first, then bicubic; Pillow documents the result as
        # indistinguishable from plain bicubic at gap >= 2, and it is much faster on big shrinks.
        rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if orient != 1:
        rgb = rgb.transpose(_ORIENT[orient])
    if opts.signature:  # --dedup near: from these pixels, not a second decode (data_prep.near)
        from data_prep.near import signature  # numpy: loaded only by near-duplicate builds

        res.signature = signature(rgb)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=opts.quality)
    res.data = buf.getvalue()
    res.width, res.height = rgb.size
    return res
