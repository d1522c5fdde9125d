"""seer-shards build/verify/stats/merge on real photos and on every kind of bad input."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_prep.build import build_shards
from data_prep.merge import merge
from data_prep.verify import iter_samples, stats, verify

REPO = Path(__file__).resolve().parent.parent


def _samples(d: Path) -> dict[str, tuple[bytes, dict]]:
    """key -> (jpg bytes, json) over the whole set, asserting each key appears once."""
    out: dict[str, tuple[bytes, dict]] = {}
    man = json.loads((d / "manifest.json").read_text())
    for s in man["shards"]:
        for key, g in iter_samples(str(d / s["name"])):
            assert key not in out, f"duplicate key {key}"
            out[key] = (g["jpg"], json.loads(g["json"]))
    return out


def _skips(d: Path) -> dict[str, str]:
    lines = (d / "skipped.tsv").read_text().splitlines()
    assert lines[0] == "source\treason"
    return {Path(src.split("::")[-1]).name: reason for src, reason in (ln.split("\t") for ln in lines[1:])}


def _png_bomb(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels with almost no data behind it."""
    def chunk(t: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue: orientation and colour mistakes show up."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2, 0] = 255
    arr[:, w // 2:, 2] = 255
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> dict:
    """A dump with real photos plus every kind of bad and unusual input."""
    root = tmp_path_factory.mktemp("messy")
    d = root / "dump"
    (d / "sub").mkdir(parents=True)
    photos = sorted(p for p in photo_dir.iterdir() if p.suffix in (".jpg", ".png"))
    for p in photos[:6]:
        shutil.copy(p, d / p.name)
    shutil.copy(photos[0], d / "sub" / "copy_of_first.jpg")  # exact duplicate
    jpg = photos[0].read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    (d / "empty.jpg").write_bytes(b"")
    (d / "tiny.png").write_bytes(_save(Image.new("RGB", (1, 1)), "PNG"))
    (d / "bomb.png").write_bytes(_png_bomb(50_000, 50_000))
    (d / "cmyk.jpg").write_bytes(_save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"))
    grey16 = np.full((24, 32), 32896, np.uint16)  # 32896 / 257 = 128
    (d / "grey16.png").write_bytes(_save(Image.fromarray(grey16), "PNG"))
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 16, 32))
    (d / "palette_alpha.png").write_bytes(_save(pal, "PNG", transparency=0))  # right half transparent
    frames = [Image.new("RGB", (40, 40), c) for c in ((0, 255, 0), (255, 0, 0))]
    (d / "anim.gif").write_bytes(_save(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    (d / "img.tiff").write_bytes(_save(_halves(48, 32), "TIFF"))
    (d / "img.bmp").write_bytes(_save(_halves(48, 32), "BMP"))
    (d / "img.webp").write_bytes(_save(_halves(48, 32), "WEBP", lossless=True))
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)  # right half fully transparent
    (d / "alpha.webp").write_bytes(_save(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True))
    (d / "grey.jpg").write_bytes(_save(Image.new("L", (40, 40), 90), "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6
    (d / "rotated.jpg").write_bytes(_save(_halves(64, 32), "JPEG", exif=exif, quality=98))
    os.symlink("..", d / "sub" / "loop")  # a directory symlink loop
    # Archives: a plain tar with unsafe members and a tar.gz, never extracted.
    def add(tf: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        for k, v in kw.items():
            setattr(ti, k, v)
        tf.addfile(ti, io.BytesIO(data))
    with tarfile.open(root / "pack.tar", "w") as tf:
        add(tf, "ok/in_tar.jpg", photos[6].read_bytes())
        add(tf, "/abs.jpg", photos[7].read_bytes())
        add(tf, "../escape.jpg", photos[7].read_bytes())
        add(tf, "link.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    with tarfile.open(root / "pack.tar.gz", "w:gz") as tf:
        add(tf, "in_targz.png", photos[-1].read_bytes())
    (root / "list.txt").write_text(f"{d / 'img.bmp'}\n# a comment\n\nnot/here.jpg\n")
    return {"root": root, "dump": d, "photos": photos, "inputs": [str(d), str(root / "pack.tar"),
            str(root / "pack.tar.gz"), str(root / "list.txt")]}


@pytest.fixture(scope="module")
def messy_built(messy: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("messy_out")
    return out, build_shards(messy["inputs"], out, maxcount=5, workers=2)


def test_bad_inputs_get_reasons_and_run_goes_on(messy_built: tuple[Path, dict]) -> None:
    out, man = messy_built
    skips = _skips(out)
    expect = {"truncated.jpg": "truncated", "random.jpg": "not_an_image", "empty.jpg": "empty",
              "tiny.png": "too_small", "bomb.png": "too_many_pixels", "copy_of_first.jpg": "duplicate",
              "abs.jpg": "unsafe_member", "escape.jpg": "unsafe_member", "link.jpg": "unsafe_member",
              "here.jpg": "missing"}
    for name, reason in expect.items():
        assert skips.get(name) == reason, (name, skips.get(name))
    # written: 6 photos + cmyk grey16 palette gif tiff bmp webp alpha-webp grey rotated + tar + tar.gz + bmp again
    # via the list (same bytes as img.bmp -> duplicate).
    assert skips.get("img.bmp") == "duplicate"
    assert man["written"] == 6 + 10 + 2
    assert man["inputs_seen"] == man["written"] + man["skipped"] == len(_samples(out)) + len(skips)
    assert man["duplicates"] == 2
    assert verify(str(out)) == []


def test_conversions_orientation_and_passthrough(messy_built: tuple[Path, dict], messy: dict) -> None:
    out, _ = messy_built
    by_name = {Path(m["source"].split("::")[-1]).name: (jpg, m) for jpg, m in _samples(out).values()}
    for name, (jpg, meta) in by_name.items():
        im = Image.open(io.BytesIO(jpg))
        src = messy["dump"] / name
        grey_jpeg = src.suffix == ".jpg" and src.exists() and Image.open(src).mode == "L"  # passed through
        assert im.format == "JPEG" and im.mode == ("L" if grey_jpeg else "RGB"), name
        assert im.size == (meta["width"], meta["height"])
    # 16-bit grey is scaled, not clipped to white.
    assert abs(np.asarray(Image.open(io.BytesIO(by_name["grey16.png"][0]))).mean() - 128) < 3
    # Transparent palette pixels land on white; the opaque half stays red.
    pa = np.asarray(Image.open(io.BytesIO(by_name["palette_alpha.png"][0])), float)
    assert pa[:, :12].mean(axis=(0, 1)) == pytest.approx([255, 0, 0], abs=12)
    assert pa[:, 20:].mean(axis=(0, 1)) == pytest.approx([255, 255, 255], abs=12)
    # Transparent WebP (libwebp's fast path declines it): composited on white too.
    wa = np.asarray(Image.open(io.BytesIO(by_name["alpha.webp"][0])), float)
    assert wa[:, :12].mean(axis=(0, 1)) == pytest.approx([255, 0, 0], abs=12)
    assert wa[:, 20:].mean(axis=(0, 1)) == pytest.approx([255, 255, 255], abs=12)
    # Opaque WebP (decoded by libwebp straight to RGB): red left, blue right.
    wo = np.asarray(Image.open(io.BytesIO(by_name["img.webp"][0])), float)
    assert wo[:, :20].mean(axis=(0, 1)) == pytest.approx([255, 0, 0], abs=12)
    assert wo[:, 28:].mean(axis=(0, 1)) == pytest.approx([0, 0, 255], abs=12)
    # GIF: first frame (green).
    assert np.asarray(Image.open(io.BytesIO(by_name["anim.gif"][0])), float).mean(axis=(0, 1))[1] > 200
    # CMYK (0,255,255,0) is red.
    assert np.asarray(Image.open(io.BytesIO(by_name["cmyk.jpg"][0])), float).mean(axis=(0, 1))[0] > 200
    # EXIF orientation applied: compare with PIL's own exif_transpose of the source.
    src = ImageOps.exif_transpose(Image.open(messy["dump"] / "rotated.jpg")).convert("RGB")
    got = Image.open(io.BytesIO(by_name["rotated.jpg"][0]))
    assert got.size == src.size == (32, 64)
    assert by_name["rotated.jpg"][1]["orig_width"] == 32
    assert np.abs(np.asarray(got, float) - np.asarray(src, float)).mean() < 8
    # A JPEG needing no change (colour or grey) is stored byte for byte.
    assert by_name["grey.jpg"][0] == (messy["dump"] / "grey.jpg").read_bytes()
    for p in messy["photos"][:6]:
        if p.suffix == ".jpg":
            jpg, meta = by_name[p.name]
            assert jpg == p.read_bytes()
            assert meta["sha256"] == hashlib.sha256(jpg).hexdigest()


def test_resize_maxsize_and_reencode(photo_dir: Path, tmp_path: Path) -> None:
    man = build_shards([str(photo_dir)], tmp_path / "a", resize_short_side=64, maxsize=25_000,
                       reencode="always", quality=80)
    assert len(man["shards"]) > 1
    for s in man["shards"]:
        assert s["bytes"] == os.path.getsize(tmp_path / "a" / s["name"])
        assert s["bytes"] <= 25_000 or s["count"] == 1
    for jpg, meta in _samples(tmp_path / "a").values():
        assert min(meta["width"], meta["height"]) == min(64, meta["orig_width"], meta["orig_height"])
        ar_in, ar_out = meta["orig_width"] / meta["orig_height"], meta["width"] / meta["height"]
        assert abs(ar_in - ar_out) < 0.03
    st = stats(str(tmp_path / "a"))
    assert st["written"] == 12 and st["short_side_histogram"]["64-127"] == 12


def test_resized_webp_matches_a_bicubic_resize(photo_dir: Path, tmp_path: Path) -> None:
    # Opaque WebPs are downscaled by libwebp while decoding (area averaging); the stored image
    # must be the same picture as PIL's bicubic resize of the full decode, at the planned size.
    d = tmp_path / "in"
    d.mkdir()
    src = Image.open(sorted(p for p in photo_dir.iterdir() if p.suffix == ".jpg")[0]).convert("RGB")
    src = src.resize((400, 300))
    (d / "big.webp").write_bytes(_save(src, "WEBP", quality=95))
    build_shards([str(d)], tmp_path / "out", resize_short_side=120, quality=95)
    (jpg, meta), = _samples(tmp_path / "out").values()
    got = Image.open(io.BytesIO(jpg))
    assert got.size == (meta["width"], meta["height"]) == (160, 120)
    want = Image.open(d / "big.webp").convert("RGB").resize((160, 120), Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(got, float) - np.asarray(want, float)).mean() < 4


def test_big_progressive_jpeg_resized_from_its_dc_scans(photo_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # At 1/8 DCT scale only a progressive JPEG's DC scans are read where Pillow decodes (CMYK):
    # the stored JPEG must be the very bytes a decode of the whole file gives, and the source
    # hash that of the whole file. Colour and grey JPEGs are decoded by one strict simplejpeg
    # pass over every scan (damage in an AC scan must be seen, issue #24): it must store the
    # very bytes Pillow's decode of the whole file gives.
    from data_prep import images
    src = Image.open(photo_dir / "opencv-doc__examples_data_butterfly.jpg").convert("RGB")
    big = src.resize((src.width * 4, src.height * 4))
    opts = images.ProcessOptions(resize_short_side=min(src.size) // 2)
    for mode in ("RGB", "L", "CMYK"):
        data = _save(big.convert(mode), "JPEG", quality=90, progressive=True)
        calls = []
        real = images.eighth_scale_scans
        monkeypatch.setattr(images, "eighth_scale_scans", lambda d: calls.append(len(d)) or real(d))
        fast = images.process_bytes(0, "big.jpg", data, opts)
        monkeypatch.setattr(images, "eighth_scale_scans", lambda d: None)
        monkeypatch.setattr(images, "jpeg_rgb", lambda data, mode, *a: (None, images.jpeg_damage(data, mode)))
        slow = images.process_bytes(0, "big.jpg", data, opts)
        monkeypatch.undo()
        assert calls == ([len(data)] if mode == "CMYK" else []), mode
        assert fast.reason is None and not fast.passthrough
        assert fast.data == slow.data and fast.sha256 == slow.sha256 == hashlib.sha256(data).hexdigest(), mode
        assert (fast.width, fast.height) == (src.width // 2, src.height // 2)


@pytest.mark.parametrize("check", ["full", "header"])
def test_grey_jpegs_pass_through_unchanged(photo_dir: Path, tmp_path: Path, check: str) -> None:
    # Stored byte for byte like colour JPEGs; readers decode them to R = G = B = the grey.
    import simplejpeg
    d = tmp_path / "in"
    d.mkdir()
    grey = Image.open(photo_dir / "opencv-doc__examples_data_butterfly.jpg").convert("L")
    variants = {"plain.jpg": {}, "restarts.jpg": {"restart_marker_blocks": 3},
                "progressive.jpg": {"quality": 60, "progressive": True}}
    for name, kw in variants.items():
        (d / name).write_bytes(_save(grey, "JPEG", **kw))
    (d / "odd.jpg").write_bytes(_save(grey.resize((37, 21)), "JPEG"))
    build_shards([str(d)], tmp_path / "out", check=check)
    got = _samples(tmp_path / "out")
    assert len(got) == 4
    for jpg, meta in got.values():
        src = (d / Path(meta["source"]).name).read_bytes()
        assert jpg == src
        want = np.asarray(Image.open(io.BytesIO(src)))
        rgb = simplejpeg.decode_jpeg(jpg, colorspace="RGB")
        assert all(np.array_equal(rgb[..., c], want) for c in range(3)), meta["source"]
        assert (meta["width"], meta["height"]) == want.shape[::-1]


def test_shuffle_is_deterministic_and_independent_of_workers(photo_dir: Path, tmp_path: Path) -> None:
    a = build_shards([str(photo_dir)], tmp_path / "a", maxcount=3, workers=1, seed=7)
    b = build_shards([str(photo_dir)], tmp_path / "b", maxcount=3, workers=2, seed=7)
    c = build_shards([str(photo_dir)], tmp_path / "c", maxcount=3, workers=1, seed=8)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert list(_samples(tmp_path / "a")) != list(_samples(tmp_path / "c"))
    assert sorted(_samples(tmp_path / "a")) == sorted(_samples(tmp_path / "c"))
    order = [m["source"] for _, m in _samples(tmp_path / "a").values()]
    assert order != sorted(order)  # not the enumeration order


def test_exclude_and_no_dedup(photo_dir: Path, tmp_path: Path) -> None:
    evalset = tmp_path / "eval"
    evalset.mkdir()
    photos = sorted(p for p in photo_dir.iterdir() if p.suffix == ".jpg")
    shutil.copy(photos[0], evalset / "x.jpg")
    (tmp_path / "sums.txt").write_text(f"{hashlib.sha256(photos[1].read_bytes()).hexdigest()}  y.jpg\n")
    man = build_shards([str(photo_dir), str(photos[2])], tmp_path / "o",
                       exclude=[str(evalset), str(tmp_path / "sums.txt")])
    assert man["excluded"] == 2 and man["duplicates"] == 1 and man["written"] == 10
    sources = {m["source"] for _, m in _samples(tmp_path / "o").values()}
    assert str(photos[0]) not in sources and str(photos[1]) not in sources
    man2 = build_shards([str(photo_dir), str(photos[2])], tmp_path / "p", dedup=False)
    assert man2["duplicates"] == 0 and man2["written"] == 13


def test_parts_merge_to_the_full_set(photo_dir: Path, tmp_path: Path) -> None:
    full = build_shards([str(photo_dir)], tmp_path / "full", maxcount=2)
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        build_shards([str(photo_dir)], p, maxcount=2, part=(i, 3))
    with pytest.raises(ValueError, match="missing parts"):
        merge([str(parts[0]), str(parts[2])], str(tmp_path / "bad"))
    man = merge([str(p) for p in reversed(parts)], str(tmp_path / "m"))
    assert man["written"] == full["written"] and man["inputs_seen"] == full["inputs_seen"]
    assert sorted(_samples(tmp_path / "m")) == sorted(_samples(tmp_path / "full"))
    assert [s["name"] for s in man["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(man["shards"]))]
    assert verify(str(tmp_path / "m")) == []
    assert merge([str(p) for p in parts], str(tmp_path / "m")) == man  # rerun is a no-op


def test_verify_finds_damage_and_resume_refuses_other_options(photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    man = build_shards([str(photo_dir)], out, maxcount=4)
    data = bytearray((out / man["shards"][0]["name"]).read_bytes())
    data[5000] ^= 0xFF
    (out / man["shards"][0]["name"]).write_bytes(bytes(data))
    (out / man["shards"][1]["name"]).unlink()
    problems = verify(str(out))
    assert any("sha256 differs" in p for p in problems) and any("missing" in p for p in problems)
    assert subprocess.run([sys.executable, "-m", "data_prep.cli", "verify", str(out)],
                          capture_output=True, cwd=REPO).returncode == 1
    with pytest.raises(ValueError, match="other options"):
        build_shards([str(photo_dir)], out, maxcount=5)


def test_cli_does_not_import_torch(photo_dir: Path, tmp_path: Path) -> None:
    code = ("import sys; from data_prep.cli import main; "
            f"rc = main(['build', {str(photo_dir)!r}, '--out', {str(tmp_path / 'o')!r}, '--no-progress', "
            "'--maxcount', '5', '--workers', '2']); "
            f"rc |= main(['stats', {str(tmp_path / 'o')!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "12 written in 3 shards" in r.stdout and "short side" in r.stdout


def test_tiny_shards_fixture(tiny_shards: Path) -> None:
    man = json.loads((tiny_shards / "manifest.json").read_text())
    assert [s["name"] for s in man["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert len(_samples(tiny_shards)) == 12


def test_slurm_array_template_run_as_three_tasks(photo_dir: Path, tmp_path: Path) -> None:
    """slurm/shards-array.sbatch, run as array tasks 2, 0, 1 by hand: the last one merges."""
    env = {**os.environ, "N": "3", "OUT": str(tmp_path / "out"), "INPUTS": str(photo_dir),
           "SEER_SHARDS": str(Path(sys.executable).parent / "seer-shards"), "BUILD_ARGS": "--maxcount 2"}
    for i in (2, 0, 1):
        r = subprocess.run(["bash", str(REPO / "slurm" / "shards-array.sbatch")], cwd=tmp_path,
                           env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out" / "manifest.json").exists() == (i == 1)
    assert verify(str(tmp_path / "out")) == []
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["written"] == 12


def test_header_check_broken_links_and_damaged_archives(photo_dir: Path, tmp_path: Path) -> None:
    photos = sorted(p for p in photo_dir.iterdir() if p.suffix == ".jpg")
    d = tmp_path / "d"
    d.mkdir()
    good = photos[0].read_bytes()
    (d / "good.jpg").write_bytes(good)
    (d / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])
    os.symlink(tmp_path / "nowhere.jpg", d / "broken_link.jpg")  # vanished before it was read
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for p in photos[1:4]:
            tf.add(p, arcname=p.name)
    raw = (tmp_path / "a.tar").read_bytes()
    first = photos[1].stat().st_size
    (tmp_path / "cut.tar").write_bytes(raw[: 512 + first + 512 + 1000])  # cut in a header
    (tmp_path / "cut2.tar").write_bytes(raw[: len(raw) - 10240 - 20000])  # cut in the last member
    man = build_shards([str(d), str(tmp_path / "cut.tar"), str(tmp_path / "cut2.tar")], tmp_path / "o",
                       check="header", dedup=False)
    lines = (tmp_path / "o" / "skipped.tsv").read_text().splitlines()[1:]
    skips = dict(ln.split("\t") for ln in lines)
    assert skips[str(d / "cut.jpg")] == "truncated" and skips[str(d / "broken_link.jpg")] == "vanished"
    assert skips[f"{tmp_path / 'cut.tar'}::<damaged>"] == "truncated"
    assert skips[f"{tmp_path / 'cut2.tar'}::{photos[3].name}"] == "truncated"
    samples = {m["source"]: jpg for jpg, m in _samples(tmp_path / "o").values()}
    assert samples[str(d / "good.jpg")] == good
    assert samples[f"{tmp_path / 'cut.tar'}::{photos[1].name}"] == photos[1].read_bytes()
    assert samples[f"{tmp_path / 'cut2.tar'}::{photos[2].name}"] == photos[2].read_bytes()
    assert man["written"] == 4 and man["inputs_seen"] == man["written"] + man["skipped"] == 8


def test_full_check_gives_the_verdict_of_a_full_decode(photo_dir: Path, tmp_path: Path) -> None:
    """--check full decodes pass-through JPEGs at 1/8 DCT scale (all entropy data, less IDCT);
    on cut baseline and progressive streams it must judge exactly as a full-size decode does."""
    src = next(p for p in sorted(photo_dir.glob("*.jpg")) if Image.open(p).mode == "RGB")
    d = tmp_path / "d"
    d.mkdir()
    expect: dict[str, str] = {}
    for tag, data in (("base", src.read_bytes()),
                      ("prog", _save(Image.open(src), "JPEG", quality=90, progressive=True))):
        for frac in (1.0, 0.3, 0.7, 0.95):
            cut = data[: int(len(data) * frac)]
            name = f"{tag}_{int(frac * 100)}.jpg"
            (d / name).write_bytes(cut)
            try:
                Image.open(io.BytesIO(cut)).load()
                expect[name] = "written"
            except OSError:
                expect[name] = "truncated"
    assert list(expect.values()).count("truncated") >= 4  # the cuts must be real damage
    build_shards([str(d)], tmp_path / "o", check="full", dedup=False)
    got = {name: "written" for name in expect} | _skips(tmp_path / "o")
    assert got == expect
    stored = {Path(m["source"]).name: jpg for jpg, m in _samples(tmp_path / "o").values()}
    assert stored["base_100.jpg"] == src.read_bytes()  # passed through byte for byte


def test_hand_built_tar_headers_match_tarfile(tmp_path: Path) -> None:
    from seer_pipeline.shards.format import write_shard

    rng = np.random.default_rng(1)
    samples = [(f"{i:024x}", rng.bytes(int(rng.integers(0, 3000))), b'{"i":%d}' % i) for i in range(40)]
    count, nbytes, sha = write_shard(str(tmp_path / "a.tar"), samples)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, jpg, meta in samples:
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", meta)):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o444, 0, 0, "", ""
                tf.addfile(ti, io.BytesIO(data))
    got = (tmp_path / "a.tar").read_bytes()
    assert got == buf.getvalue() and count == 40 and nbytes == len(got)
    assert sha == hashlib.sha256(got).hexdigest()


def test_second_build_in_the_same_directory_is_refused(photo_dir: Path, tmp_path: Path) -> None:
    import fcntl

    (tmp_path / "o" / ".seer-shards").mkdir(parents=True)
    with open(tmp_path / "o" / ".seer-shards" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another seer-shards build"):
            build_shards([str(photo_dir)], tmp_path / "o")
    assert build_shards([str(photo_dir)], tmp_path / "o")["written"] == 12


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_prep.cli import main

    assert main(["build", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "do not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["verify", str(tmp_path)]) == 2  # no manifest: says so instead of a traceback
    assert "no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", str(tmp_path), "--out", str(tmp_path / "o"), "--part", "3/3"])
