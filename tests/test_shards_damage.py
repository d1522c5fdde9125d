"""Damaged images are never stored (issue #22 "Bugs first", #24 "JPEGs with damaged scans").

The judge of damage is the decoder: an image whose fresh, independent decode fails (Pillow's
full load, a PNG chunk CRC, libjpeg's corrupt-data warnings seen through simplejpeg) must be
skipped, whichever path the builder takes (pass-through or re-encode/resize). A flip that no
decoder can notice (uncompressed BMP/TIFF pixels carry no checksum) is outside what any builder
can refuse, so the tests damage the kinds of data each format can notice.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from data_prep.build import build_shards
from data_prep.images import ProcessOptions, process_bytes
from seer_pipeline.shards import format as fmt

FORMATS = ["PNG", "GIF", "TIFF", "BMP", "WEBP", "JPEG"]


def _picture() -> Image.Image:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 128)
    arr = np.stack([np.tile(x, (96, 1)), np.tile(x[:96, None], (1, 128)), np.full((96, 128), 80.0)], -1)
    return Image.fromarray((arr + rng.integers(0, 30, arr.shape)).clip(0, 255).astype("uint8"))


def _encode(kind: str) -> bytes:
    img = _picture()
    buf = io.BytesIO()
    (img.convert("P") if kind == "GIF" else img).save(buf, kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buf.getvalue()


def _damaged(kind: str, n: int = 24) -> list[bytes]:
    """n copies with 8 bytes flipped at spread positions. BMP/TIFF (uncompressed) and WebP
    (VP8 has no checksum: 58 of 60 flips decode to plausible pixels) are cut short instead,
    the damage their decoders can see."""
    good = _encode(kind)
    out = []
    for t in range(n):
        d = bytearray(good)
        if kind in ("BMP", "TIFF", "WEBP"):
            out.append(bytes(d[: int(len(d) * (0.4 + 0.5 * t / n))]))
            continue
        i = int(len(d) * 0.3 + t * len(d) * 0.6 / n)
        for k in range(i, min(len(d), i + 8)):
            d[k] ^= 0x5A
        out.append(bytes(d))
    return out


def _decoder_refuses(data: bytes) -> bool:
    """An independent verdict: a fresh full decode, chunk CRCs, libjpeg's warnings."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "PNG":
            Image.open(io.BytesIO(data)).verify()
        if img.format == "JPEG":
            simplejpeg.decode_jpeg(data, min_height=1, min_width=1, strict=True)
        img.load()
    except Exception:
        return True
    return False


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("resize", [None, 48], ids=["passthrough", "resize"])
def test_a_decoder_failure_is_always_a_skip(kind: str, resize: int | None) -> None:
    opts = ProcessOptions(resize_short_side=resize)
    refused = 0
    for i, data in enumerate(_damaged(kind)):
        r = process_bytes(i, f"x{i}", data, opts)
        if _decoder_refuses(data):
            refused += 1
            assert r.reason in ("corrupt", "truncated"), (kind, i, r.reason)
            assert r.data == b""
    assert refused >= 4, f"{kind}: the damage must be of a kind its decoder sees ({refused} of 24)"
    if kind == "PNG":  # every IDAT flip breaks a chunk CRC
        assert refused == 24


def test_damaged_png_and_jpeg_are_skipped_by_the_build(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "ok.png").write_bytes(_encode("PNG"))
    png = _encode("PNG")
    d = bytearray(png)
    i = png.find(b"IDAT") + 200
    d[i:i + 8] = bytes(b ^ 0x5A for b in d[i:i + 8])
    (src / "bad.png").write_bytes(bytes(d))
    jpeg = next(x for x in _damaged("JPEG") if _decoder_refuses(x))
    (src / "bad.jpg").write_bytes(jpeg)
    for resize in (None, 48):
        out = tmp_path / f"out{resize}"
        m = build_shards([str(src)], out, workers=1, resize_short_side=resize)
        assert m["written"] == 1 and m["reasons"] == {"corrupt": 2}, m
        assert sorted(s.rsplit("/", 1)[-1] for s, _ in fmt.read_skipped(out / fmt.SKIPPED)) == ["bad.jpg", "bad.png"]


def test_damaged_jpeg_scan_is_refused_in_full_check_only() -> None:
    # --check header looks at markers only (documented): it still stores a JPEG whose scan is
    # damaged but whose end marker is intact; --check full refuses it.
    bad = next(x for x in _damaged("JPEG") if _decoder_refuses(x) and x.rstrip(b"\0")[-2:] == b"\xff\xd9")
    assert process_bytes(0, "a", bad, ProcessOptions(check="full")).reason == "corrupt"
    r = process_bytes(0, "a", bad, ProcessOptions(check="header"))
    assert r.reason is None and r.passthrough


def test_strict_jpeg_decode_stores_what_pillow_stored(photo_dir: Path, monkeypatch) -> None:
    # The resize/re-encode path decodes colour and grey JPEGs through simplejpeg (strict) instead
    # of Pillow: the stored bytes must not change for an undamaged JPEG, at any scale.
    import data_prep.images as images

    pillow = lambda data, mode, *a: (None, images.jpeg_damage(data, mode))  # noqa: E731
    n = 0
    for p in sorted(photo_dir.glob("*.jpg")):
        data = p.read_bytes()
        for short, reencode in ((None, "always"), (32, "auto"), (100, "auto"), (333, "always")):
            opts = ProcessOptions(resize_short_side=short, reencode=reencode)
            ours = process_bytes(0, "x", data, opts)
            with monkeypatch.context() as m:
                m.setattr(images, "jpeg_rgb", pillow)
                ref = process_bytes(0, "x", data, opts)
            assert ours.reason is None and ours.data == ref.data, (p.name, short)
            n += 1
    assert n >= 40


def test_jpeg_padded_between_header_segments_is_stored_whole_and_clean(photo_dir: Path) -> None:
    """libjpeg's "N extraneous bytes before marker" between header segments: the pixels are
    whole (libjpeg skips the bytes), so the image is kept, stored without the stray bytes; the
    same warning from inside a scan is damage and stays `corrupt`."""
    data = (photo_dir / "opencv-doc__examples_data_home.jpg").read_bytes()
    i = data.index(b"\xff\xdb")  # before the first quantisation table
    padded = data[:i] + b"\x00\x12\x00" + data[i:]
    with pytest.raises(ValueError, match="extraneous bytes before marker"):
        simplejpeg.decode_jpeg(padded, strict=True)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(padded)).convert("RGB")),
                          simplejpeg.decode_jpeg(data))  # what a tolerant decoder shows: the whole picture
    r = process_bytes(0, "x", padded, ProcessOptions())
    assert r.reason is None and r.passthrough and r.data == data
    assert r.sha256 == hashlib.sha256(padded).hexdigest()  # exact dedup still sees the input
    r = process_bytes(0, "x", padded, ProcessOptions(resize_short_side=100))
    ref = process_bytes(0, "x", data, ProcessOptions(resize_short_side=100))
    assert r.reason is None and r.data == ref.data
    j = data.index(b"\xff\xda") + 300  # a marker inside the scan: damage, not padding
    scan = data[:j] + b"\xff\xd3" + data[j + 2:]
    assert process_bytes(0, "x", scan, ProcessOptions()).reason == "corrupt"
    assert process_bytes(0, "x", scan[:i] + b"\x00" + scan[i:], ProcessOptions()).reason == "corrupt"
