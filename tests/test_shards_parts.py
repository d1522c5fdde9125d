"""Inputs of a dump: archives found in folders (issue #22 "Bugs first") and `--part I/N`
assignment by whole inputs (issue #22 "Parts that scale")."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from data_prep.build import build_shards
from data_prep.verify import iter_samples
from seer_pipeline.shards import format as fmt


def _add(tf: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data))


def _sources(out: Path) -> list[str]:
    man = fmt.load_manifest(str(out))
    return sorted(json.loads(g["json"])["source"] for s in man["shards"] for _, g in iter_samples(str(out / s["name"])))


def _skips(out: Path) -> list[tuple[str, str]]:
    return sorted(fmt.read_skipped(str(out / fmt.SKIPPED)))


def test_archives_inside_a_folder_are_read_like_archives_on_the_command_line(photo_dir: Path,
                                                                                tmp_path: Path) -> None:
    photos = sorted(photo_dir.glob("*.jpg"))
    dump = tmp_path / "dump"
    (dump / "sub").mkdir(parents=True)
    with tarfile.open(dump / "a.tar", "w") as tf:
        _add(tf, "x/one.jpg", photos[0].read_bytes())
        _add(tf, "../escape.jpg", photos[1].read_bytes())  # unsafe: never an input
        _add(tf, "link.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    with tarfile.open(dump / "sub" / "b.tar.gz", "w:gz") as tf:
        _add(tf, "two.jpg", photos[2].read_bytes())
        _add(tf, "notes.txt", b"not an image")
    (dump / "three.jpg").write_bytes(photos[3].read_bytes())
    (dump / "cut.tar").write_bytes((dump / "a.tar").read_bytes()[:700])  # damaged archive

    m = build_shards([str(dump)], tmp_path / "o", workers=1)
    named = [str(dump / "a.tar"), str(dump / "cut.tar"), str(dump / "sub" / "b.tar.gz"), str(dump / "three.jpg")]
    ref = build_shards(named, tmp_path / "ref", workers=1)  # the walk's order: names sorted
    assert m["written"] == ref["written"] == 3 and m["reasons"] == ref["reasons"], (m, ref)
    assert _sources(tmp_path / "o") == _sources(tmp_path / "ref")
    assert f"{dump / 'a.tar'}::x/one.jpg" in _sources(tmp_path / "o")
    assert _skips(tmp_path / "o") == _skips(tmp_path / "ref")
    reasons = dict(m["reasons"])
    assert reasons.get("unsafe_member") == 2 and reasons.get("not_an_image") == 1, reasons
    assert "not_an_image" not in {r for s, r in _skips(tmp_path / "o") if s.endswith(".tar") or s.endswith(".gz")}
