"""seer-shards against hostile inputs (issue #13) and the one shard format module (issue #16).

Every input is accounted for (written, or skipped with a reason), none can stop, hang or swamp
a build; the names of inputs survive any bytes; merge and disk-full behave.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.build import build_shards
from data_prep.images import read_source
from data_prep.merge import merge
from data_prep.verify import iter_samples, verify
from seer_pipeline.shards import format as fmt
from seer_pipeline.shards import reader

REPO = Path(__file__).resolve().parent.parent
# Names that broke a build or split a skipped.tsv row: control characters, quotes, backslashes,
# bytes that are not UTF-8 (a Latin-1 e-acute, a lone 0xff).
ODD_NAMES = [b"cr\rname.jpg", b"lf\nname.jpg", b"tab\tname.jpg", b"quote\"'name.jpg", b"back\\slash\\x41.jpg",
             b"caf\xe9.jpg", b"\xff\xfe.jpg", b"esc\x1b.jpg"]


def _cli(*args: str, timeout: float = 120, limit_fsize: int | None = None) -> subprocess.CompletedProcess:
    def pre() -> None:
        if limit_fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
    return subprocess.run([sys.executable, "-m", "data_prep.cli", "--log-level", "WARNING", *args],
                          cwd=REPO, capture_output=True, timeout=timeout, preexec_fn=pre)


def _sources(out: Path) -> list[str]:
    """Sample sources (unescaped) over the whole set."""
    man = fmt.load_manifest(str(out))
    return [fmt.unescape_name(json.loads(g["json"])["source"])
            for s in man["shards"] for _, g in iter_samples(str(out / s["name"]), with_jpg=False)]


def _photos(photo_dir: Path) -> list[Path]:
    return sorted(p for p in photo_dir.iterdir() if p.suffix in (".jpg", ".png"))


# ------------------------------------------------------------------ names
def test_escape_name_round_trips_any_bytes() -> None:
    rng = random.Random(0)
    cases = [os.fsdecode(n) for n in ODD_NAMES] + ["\\x41", "\\\\", "plain", "\udc80\\u1234", "\ud800"]
    for _ in range(2000):
        cases.append(os.fsdecode(bytes(rng.randrange(1, 256) for _ in range(rng.randrange(12)))))
    for name in cases:
        text = fmt.escape_name(name)
        text.encode("utf-8")  # raises unless valid UTF-8 (SQLite and JSON need it)
        assert not set(text) & set("\t\n\r")  # one skipped.tsv row
        assert fmt.unescape_name(text) == name
    assert fmt.escape_name(os.fsdecode(b"caf\xe9\tx\\")) == "caf\\xe9\\tx\\\\"


def test_non_utf8_and_control_names_are_built_and_skipped_losslessly(photo_dir: Path, tmp_path: Path) -> None:
    photos = _photos(photo_dir)
    d = tmp_path / "dump"
    d.mkdir()
    good, bad = {}, {}
    for i, raw in enumerate(ODD_NAMES):
        path = os.path.join(os.fsencode(d), raw)
        if i % 2 == 0:  # a photo under an odd name: written
            shutil.copy(photos[i], os.fsdecode(path))
            good[os.fsdecode(path)] = photos[i].read_bytes()
        else:  # not an image under an odd name: skipped
            with open(path, "wb") as f:
                f.write(b"not an image %d" % i)
            bad[os.fsdecode(path)] = "not_an_image"
    # A Latin-1 member name in a tar (as a Windows-era archiver writes it) and a list file line.
    with tarfile.open(tmp_path / "latin1.tar", "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tf:
        ti = tarfile.TarInfo("café.jpg")
        data = photos[-1].read_bytes()
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    good[f"{tmp_path / 'latin1.tar'}::{os.fsdecode(b'caf' + bytes([0xE9]) + b'.jpg')}"] = data
    other = os.path.join(os.fsencode(tmp_path), b"list\xffed.jpg")
    shutil.copy(photos[-2], os.fsdecode(other))
    (tmp_path / "list.txt").write_bytes(other + b"\n" + os.fsencode(tmp_path) + b"/gone\xe9.jpg\n")
    good[os.fsdecode(other)] = photos[-2].read_bytes()
    bad[os.fsdecode(os.fsencode(tmp_path) + b"/gone\xe9.jpg")] = "missing"

    out = tmp_path / "out"
    man = build_shards([str(d), str(tmp_path / "latin1.tar"), str(tmp_path / "list.txt")], out, workers=2)
    assert man["written"] == len(good) and man["skipped"] == len(bad)
    srcs = _sources(out)
    assert sorted(srcs) == sorted(good)
    for _, g in (x for s in man["shards"] for x in iter_samples(str(out / s["name"]))):
        meta = json.loads(g["json"])
        # The sample is the file's bytes, under its exact name.
        assert meta["sha256"] == hashlib.sha256(good[fmt.unescape_name(meta["source"])]).hexdigest()
    lines = (out / "skipped.tsv").read_bytes().split(b"\n")
    assert len(lines) == 1 + len(bad) + 1 and lines[-1] == b""  # header, one row each, final LF
    assert dict(fmt.read_skipped(str(out / "skipped.tsv"))) == bad
    assert verify(str(out)) == []


# ------------------------------------------------------------------ not a file / size caps
def test_fifos_devices_and_special_tar_members_are_skipped_unread(photo_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "dump"
    d.mkdir()
    shutil.copy(_photos(photo_dir)[0], d / "good.jpg")
    os.mkfifo(d / "pipe.jpg")  # opening it for reading would block forever
    os.symlink("/dev/zero", d / "zero.jpg")  # reading it never ends
    os.symlink("/dev/null", d / "null.jpg")
    os.mkfifo(tmp_path / "top_fifo.tar")  # given as an input itself, with an archive suffix
    with tarfile.open(tmp_path / "special.tar", "w") as tf:
        for name, kind in (("fifo.jpg", tarfile.FIFOTYPE), ("chr.jpg", tarfile.CHRTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type = kind
            tf.addfile(ti)
    (tmp_path / "list.txt").write_text(f"{d / 'pipe.jpg'}\n/dev/zero\n")
    out = tmp_path / "out"
    r = _cli("build", str(d), str(tmp_path / "top_fifo.tar"), str(tmp_path / "special.tar"),
             str(tmp_path / "list.txt"), "--out", str(out), "--no-progress", "--workers", "2", timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    skips = dict(fmt.read_skipped(str(out / "skipped.tsv")))
    expect = [d / "pipe.jpg", d / "zero.jpg", d / "null.jpg", tmp_path / "top_fifo.tar", d / "pipe.jpg", "/dev/zero"]
    for p in expect:
        assert skips.get(str(p)) == "not_a_file", p
    for m in ("fifo.jpg", "chr.jpg"):
        assert skips[f"{tmp_path / 'special.tar'}::{m}"] == "not_a_file"
    man = fmt.load_manifest(str(out))
    assert man["written"] == 1 and man["inputs_seen"] == 1 + len(fmt.read_skipped(str(out / "skipped.tsv"))) == 9


def test_max_bytes_is_checked_before_reading(photo_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "dump"
    d.mkdir()
    photo = _photos(photo_dir)[0]
    shutil.copy(photo, d / "good.jpg")
    with open(d / "sparse.jpg", "wb") as f:  # 300 MB, over the 256 MB default: a hole, never read
        f.truncate(300 << 20)
    big = photo.read_bytes() + b"\0" * (3 << 20)  # a valid JPEG with 3 MB of trailing padding
    (d / "padded.jpg").write_bytes(big)
    with tarfile.open(tmp_path / "big.tar.gz", "w:gz") as tf:
        for name, data in (("big.jpg", big), ("ok.jpg", photo.read_bytes()[:-1] + b"\xd9")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    man = build_shards([str(d), str(tmp_path / "big.tar.gz")], tmp_path / "o", dedup=False)
    skips = dict(fmt.read_skipped(str(tmp_path / "o" / "skipped.tsv")))
    assert skips == {str(d / "sparse.jpg"): "too_large"} and man["written"] == 4
    man = build_shards([str(d), str(tmp_path / "big.tar.gz")], tmp_path / "o2", dedup=False, max_bytes=2 << 20)
    skips = dict(fmt.read_skipped(str(tmp_path / "o2" / "skipped.tsv")))
    assert skips == {str(d / "sparse.jpg"): "too_large", str(d / "padded.jpg"): "too_large",
                     f"{tmp_path / 'big.tar.gz'}::big.jpg": "too_large"}
    assert man["written"] == 2
    r = _cli("build", str(d), "--out", str(tmp_path / "o3"), "--max-bytes", "1M", "--no-progress")
    assert r.returncode == 0 and b"too_large 2" in r.stdout, r.stderr


_DECODE_PEAK = textwrap.dedent("""
    import io, sys
    from PIL import Image

    def hwm():  # this process's peak RSS in KiB (ru_maxrss would carry the parent's over exec)
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1])
    from data_prep import workers
    from data_prep.images import ProcessOptions, process_bytes
    opts = ProcessOptions(reencode="always")
    workers.init_worker(opts, frozenset(), ".", 0)  # the worker's allocator settings
    data = open(sys.argv[1], "rb").read()
    pixels = Image.open(io.BytesIO(data)).size
    base = hwm()
    r = process_bytes(0, "x", data, opts)
    assert r.reason is None, r.reason
    peak = hwm()
    print((peak - base) * 1024 / (pixels[0] * pixels[1]))
""")


@pytest.mark.parametrize("kind", ["grey16_png", "rgba_png", "palette_alpha_png"])
def test_decode_memory_per_pixel_is_bounded(tmp_path: Path, kind: str) -> None:
    """Peak RSS of one decode + convert + encode, per pixel, for the costliest conversions.

    Measured (noisy, this machine) on incompressible 9 MP images: 16-bit grey PNG 11.9 B/px
    (31.7 before the strip-wise conversion), RGBA PNG 10.8 (15.0), palette + transparency 7.7
    (16.0); on 36 MP ones 7.8 (16-bit grey) and 8.4 (RGBA). At the default caps (100 MP,
    256 MB input) a worker peaks near 0.85 GB for the decode plus the input bytes it holds.
    """
    side = 2400
    yy, xx = np.mgrid[0:side, 0:side]
    smooth = (xx * 7 + yy * 13) % 4096
    if kind == "grey16_png":
        img = Image.fromarray((smooth * 16).astype(np.uint16))
    elif kind == "rgba_png":
        img = Image.fromarray(np.stack([smooth % 256, smooth // 16, xx % 256, (yy % 2) * 255], -1).astype(np.uint8), "RGBA")
    else:
        img = Image.fromarray((smooth % 200).astype(np.uint8), "L").convert("P")
        img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1, **({"transparency": 0} if kind == "palette_alpha_png" else {}))
    (tmp_path / "img.png").write_bytes(buf.getvalue())
    r = subprocess.run([sys.executable, "-c", _DECODE_PEAK, str(tmp_path / "img.png")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    per_px = float(r.stdout.split()[-1])
    print(f"{kind}: {per_px:.1f} bytes per pixel")
    assert per_px < 12.0, f"{kind}: {per_px:.1f} bytes per pixel"


# ------------------------------------------------------------------ output folder, merge
def test_out_inside_an_input_is_not_walked(photo_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "dump"
    shutil.copytree(photo_dir, d)
    n = sum(1 for _ in d.iterdir())
    out = d / "shards"
    first = build_shards([str(d)], out, maxcount=5)
    again = build_shards([str(d)], out, maxcount=5)  # a rerun walks the finished set too
    for man in (first, again):
        assert man["inputs_seen"] == n
    assert not [s for s in _sources(out) if s.startswith(str(out))]


def _parts(photo_dir: Path, tmp_path: Path) -> list[Path]:
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, p in enumerate(parts):
        build_shards([str(photo_dir)], p, maxcount=3, part=(i, 2))
    return parts


def test_merge_locks_refuses_a_used_output_and_checks_every_shard(photo_dir: Path, tmp_path: Path) -> None:
    parts = _parts(photo_dir, tmp_path)
    args = [str(p) for p in parts]
    out = tmp_path / "m"
    (out / ".seer-shards").mkdir(parents=True)
    with open(out / ".seer-shards" / "lock", "w") as held:  # a build (or merge) running there
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another seer-shards"):
            merge(args, str(out))
    (out / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        merge(args, str(out))
    # A part whose manifest no longer matches its files: nothing is moved.
    man0 = json.loads((parts[0] / "manifest.json").read_text())
    s0 = parts[0] / man0["shards"][0]["name"]
    saved = s0.read_bytes()
    s0.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(ValueError, match="sha256"):
        merge(args, str(tmp_path / "m2"))
    s0.write_bytes(saved + b"\0" * 512)
    with pytest.raises(ValueError, match="bytes"):
        merge(args, str(tmp_path / "m2"))
    s0.write_bytes(saved)
    outside = tmp_path / "elsewhere.tar"
    shutil.copy(s0, outside)
    s0.unlink()
    os.symlink(outside, s0)  # the right bytes, but not a file of the part
    with pytest.raises(ValueError, match="not a file in the part"):
        merge(args, str(tmp_path / "m2"))
    s0.unlink()
    shutil.copy(outside, s0)
    bad = dict(man0, shards=[dict(man0["shards"][0], name="../elsewhere.tar")] + man0["shards"][1:])
    (parts[0] / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="does not name a file"):
        merge(args, str(tmp_path / "m2"))
    (parts[0] / "manifest.json").write_text(json.dumps(man0))
    assert not (tmp_path / "m2" / "manifest.json").exists() and s0.exists() and outside.exists()
    man = merge(args, str(out), force=True)  # --force: replace what is there
    assert man["written"] == 12 and verify(str(out)) == []
    r = _cli("merge", *args, "--out", str(tmp_path / "m3"))
    assert r.returncode == 2 and b"missing" in r.stderr  # the parts' shards were moved: nothing to take


# ------------------------------------------------------------------ disk full, file modes
def test_disk_full_is_one_line_and_resumable(photo_dir: Path, tmp_path: Path) -> None:
    ref = _cli("build", str(photo_dir), "--out", str(tmp_path / "ref"), "--maxcount", "4", "--no-progress")
    assert ref.returncode == 0
    for workers, limit in (("1", 250_000), ("2", 250_000)):
        out = tmp_path / f"o{workers}"
        r = _cli("build", str(photo_dir), "--out", str(out), "--maxcount", "4", "--no-progress",
                 "--workers", workers, limit_fsize=limit)
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert "Traceback" not in err and "over the file size limit" in err
        assert len([ln for ln in err.splitlines() if "error" in ln.lower()]) == 1, err
        done = _cli("build", str(photo_dir), "--out", str(out), "--maxcount", "4", "--no-progress",
                    "--workers", workers)
        assert done.returncode == 0, done.stderr.decode()
        assert verify(str(out)) == []
        want = fmt.load_manifest(str(tmp_path / "ref"))
        got = fmt.load_manifest(str(out))
        assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in want["shards"]]


def test_outputs_get_the_umask_mode(photo_dir: Path, tmp_path: Path) -> None:
    from seer_pipeline.core.io_utils import atomic_write_bytes

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        build_shards([str(photo_dir)], tmp_path / "o", maxcount=5)
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir() if p.is_file()}
    assert set(modes.values()) == {0o640}, modes


def test_no_fault_hook_in_the_builder() -> None:
    # Faults are tests patching named seams (tests/faultinject); production code carries none.
    import data_prep.build as b
    import data_prep.store_build as sb
    from seer_pipeline.store import objects

    assert not hasattr(b, "fault") and not hasattr(sb, "upload_fault")
    assert "on_part" not in Path(objects.__file__).read_text()
    for mod in (b, sb, objects):
        assert "SEER_TEST" not in Path(mod.__file__).read_text()


# ------------------------------------------------------------------ one format module
def test_every_reader_splits_keys_the_same_way(tmp_path: Path) -> None:
    """The loader's reader, verify and the build's resume check read through format.py."""
    buf = io.BytesIO()
    names = ["d.1/x.jpg", "d.1/x.json", "d.1/y.tar.jpg", "d.1/y.tar.json", "z.JPG", "z.json"]
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for n in names:
            ti = tarfile.TarInfo(n)
            ti.size = 2
            tf.addfile(ti, io.BytesIO(b"{}"))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    want = [("d.1/x", {"jpg", "json"}), ("d.1/y", {"tar.jpg", "tar.json"}), ("z", {"jpg", "json"})]
    assert [(k, set(g)) for k, g in iter_samples(str(tmp_path / "s.tar"))] == want
    got = [(s.pop("__key__").decode(), set(s)) for _, s in reader.iter_samples(str(tmp_path / "s.tar"), lambda i: True)]
    assert got == want
    assert fmt.shard_keys(str(tmp_path / "s.tar")) == [k for k, _ in want]


def test_manifest_version(tmp_path: Path, tiny_shards: Path) -> None:
    man = json.loads((tiny_shards / "manifest.json").read_text())
    assert man["version"] == fmt.FORMAT_VERSION == 1
    d = tmp_path / "set"
    shutil.copytree(tiny_shards, d)
    man.pop("version")  # manifests written before the field: read as version 1
    (d / "manifest.json").write_text(json.dumps(man))
    assert len(reader.load_manifest(str(d))) == 3 and verify(str(d)) == []
    (d / "manifest.json").write_text(json.dumps(dict(man, version=2)))
    with pytest.raises(ValueError, match="version 2 is not supported"):
        reader.load_manifest(str(d))
    r = _cli("verify", str(d))
    assert r.returncode == 2 and b"version 2 is not supported" in r.stderr


# ------------------------------------------------------------------ everything at once
def _gzip_bomb(path: Path, member_bytes: int) -> None:
    """A .tar.gz of a few hundred KB holding one all-zero member of `member_bytes`."""
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as gz:
        gz.write(fmt.ustar_header("zeros.jpg", member_bytes))
        for _ in range(member_bytes >> 20):
            gz.write(zeros)
        gz.write(bytes(fmt.tar_bytes(fmt.member_bytes(member_bytes)) - fmt.member_bytes(member_bytes)))


_MEASURED = textwrap.dedent("""
    import resource, subprocess, sys, time
    t = time.monotonic()
    r = subprocess.run(sys.argv[1:], timeout=60)
    print(r.returncode, time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


@pytest.mark.slow
def test_hostile_folder_builds_within_a_minute_and_a_gigabyte(photo_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "dump"
    d.mkdir()
    photos = _photos(photo_dir)
    for p in photos:
        shutil.copy(p, d / p.name)
    os.mkfifo(d / "fifo.jpg")
    os.symlink("/dev/zero", d / "zero.jpg")
    _gzip_bomb(d / "bomb.tar.gz", 512 << 20)
    assert (d / "bomb.tar.gz").stat().st_size < 1 << 20
    with open(os.path.join(os.fsencode(d), b"caf\xe9.jpg"), "wb") as f:  # not UTF-8
        f.write(photos[0].read_bytes() + b"#1")  # other bytes than the photo: not a duplicate
    (d / "unicode\xe9_bad.png").write_bytes(b"junk")
    (d / "carriage\rreturn.jpg").write_bytes(photos[1].read_bytes() + b"#2")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.cli", "--log-level", "WARNING", "build", str(d),
           str(d / "bomb.tar.gz"), "--out", str(out), "--workers", "2", "--no-progress"]
    r = subprocess.run([sys.executable, "-c", _MEASURED, *cmd], cwd=REPO, capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stderr
    rc, secs, maxrss_kb = r.stdout.split()[-3:]
    print(f"hostile build: {float(secs):.1f} s, largest process {int(maxrss_kb) >> 10} MiB")
    assert rc == "0", r.stderr
    assert float(secs) < 60 and int(maxrss_kb) < 1 << 20, (secs, maxrss_kb)  # KiB: under 1 GiB
    man = fmt.load_manifest(str(out))
    skips = dict(fmt.read_skipped(str(out / "skipped.tsv")))
    names = {os.path.basename(s.split("::")[-1]): r for s, r in skips.items()}
    # The bomb is read as an archive both in the folder and on the command line (issue #22).
    assert names == {"fifo.jpg": "not_a_file", "zero.jpg": "not_a_file", "zeros.jpg": "too_large",
                     "unicode\xe9_bad.png": "not_an_image"}
    rows = fmt.read_skipped(str(out / "skipped.tsv"))
    assert [r for s, r in rows if s.endswith("::zeros.jpg")] == ["too_large", "too_large"]
    srcs = _sources(out)
    assert {str(d / "carriage\rreturn.jpg"), os.fsdecode(os.fsencode(d) + b"/caf\xe9.jpg")} < set(srcs)
    walked = len(photos) + 5 + 2  # the folder's other entries, and the bomb tar's member twice
    assert man["inputs_seen"] == walked == man["written"] + len(rows) == len(srcs) + len(rows)


def test_read_source_cap_is_exact_and_the_read_is_sized_from_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "f.bin"
    payload = os.urandom(1000)
    f.write_bytes(payload)
    assert read_source(str(f), max_bytes=1000) == (payload, None)
    assert read_source(str(f), max_bytes=999) == (None, "too_large")
    assert read_source(str(f)) == (payload, None)
    tracemalloc.start()
    try:
        assert read_source(str(f), max_bytes=256 << 20) == (payload, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"reading 1,000 bytes under a 256 MiB cap allocated {peak} bytes"

    # A file that grew after its size was taken is still read whole, and still capped: fake a
    # smaller stat/fstat size so the first, right-sized read comes back one byte over it.
    real_stat, real_fstat = os.stat, os.fstat

    def shrink(st: os.stat_result) -> os.stat_result:
        fields = list(st)
        fields[6] = 400  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", lambda fd: shrink(real_fstat(fd)))
    assert read_source(str(f), max_bytes=1000) == (payload, None)
    assert read_source(str(f)) == (payload, None)
    monkeypatch.setattr(os, "stat", lambda path, **kw: shrink(real_stat(path, **kw)))
    assert read_source(str(f), max_bytes=600) == (None, "too_large")
    assert read_source(str(f), max_bytes=1000) == (payload, None)


def test_huge_pax_header_is_a_counted_skip_not_a_read(photo_dir: Path, tmp_path: Path) -> None:
    """tarfile reads an extended header whole, at the size its header declares: a gzip of a few
    hundred KB holding a 64 MiB pax record would be held in memory. Past the cap (1 MiB) the
    archive is reported damaged and counted; the members before it are kept."""
    from data_prep.sources import MAX_META_BYTES

    photos = _photos(photo_dir)
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_tarinfo("a.jpg", photos[0].read_bytes()), io.BytesIO(photos[0].read_bytes()))
        ti = _tarinfo("b.jpg", photos[1].read_bytes())
        ti.pax_headers = {"comment": "x" * (64 << 20)}  # a valid record, 64 MiB
        tf.addfile(ti, io.BytesIO(photos[1].read_bytes()))
    assert path.stat().st_size < 2 << 20 and 64 << 20 > MAX_META_BYTES
    tracemalloc.start()
    try:
        man = build_shards([str(path)], tmp_path / "o", dedup=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert man["written"] == 1 and man["reasons"] == {"corrupt": 1}, man
    assert dict(fmt.read_skipped(str(tmp_path / "o" / "skipped.tsv"))) == {f"{path}::<damaged>": "corrupt"}
    assert peak < 32 << 20  # the 64 MiB record was never held


def _tarinfo(name: str, data: bytes) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti
