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


def _keys(out: Path) -> list[tuple[str, str]]:
    man = fmt.load_manifest(str(out))
    return sorted((k, json.loads(g["json"])["source"]) for s in man["shards"]
                  for k, g in iter_samples(str(out / s["name"])))


def _tar_dump(photo_dir: Path, root: Path, n_tars: int) -> Path:
    photos = sorted(photo_dir.iterdir())
    dump = root / "dump"
    dump.mkdir(parents=True)
    for t in range(n_tars):
        with tarfile.open(dump / f"{t:03d}.tar", "w") as tf:
            for j in range(3):
                _add(tf, f"{t}/{j}.img", photos[(3 * t + j) % len(photos)].read_bytes() + bytes([t]))
            _add(tf, f"{t}/../bad.jpg", b"x")  # unsafe: accounted for by the part holding the archive
    for j in range(3):
        (dump / f"loose{j}.jpg").write_bytes(photos[j].read_bytes())
    return dump


def test_parts_get_whole_archives_and_their_union_is_the_single_build(photo_dir: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    import data_prep.sources as sources

    dump = _tar_dump(photo_dir, tmp_path, 8)
    full = build_shards([str(dump)], tmp_path / "full", workers=1)
    opened: list[str] = []
    real = sources._iter_tar
    monkeypatch.setattr(sources, "_iter_tar", lambda path, *a, **k: (opened.append(path), real(path, *a, **k))[1])
    keys, seen, reasons = [], 0, {}
    for i in range(2):  # 8 archives >= 4 per part: archives go whole, round robin
        opened.clear()
        m = build_shards([str(dump)], tmp_path / f"p{i}", workers=1, part=(i, 2))
        assert m["part_by"] == "archive"
        assert sorted(opened) == [str(dump / f"{t:03d}.tar") for t in range(i, 8, 2)]
        keys += _keys(tmp_path / f"p{i}")
        seen += m["inputs_seen"]
        for k, v in m["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert sorted(keys) == _keys(tmp_path / "full")
    assert seen == full["inputs_seen"] and reasons == full["reasons"]
    for i in range(4):  # 8 archives < 4 per part for 4 parts: split by member, union still exact
        m = build_shards([str(dump)], tmp_path / f"q{i}", workers=1, part=(i, 4))
        assert m["part_by"] == "member"
    assert sorted(k for i in range(4) for k in _keys(tmp_path / f"q{i}")) == _keys(tmp_path / "full")


def test_a_build_begun_with_the_old_numbering_is_not_resumed(photo_dir: Path, tmp_path: Path) -> None:
    # Inputs were numbered by one flat counter before whole-archive parts: resuming such a scan
    # with the new numbering would record every input twice, so it is refused in one line.
    import sqlite3

    import pytest

    out = tmp_path / "o"
    build_shards([str(photo_dir)], out, workers=1)
    db = sqlite3.connect(out / ".seer-shards" / "index.sqlite")
    db.execute("DELETE FROM meta WHERE k IN ('ordinals', 'scan_done')")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="older seer-shards"):
        build_shards([str(photo_dir)], out, workers=1)
