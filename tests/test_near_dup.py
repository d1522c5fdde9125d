"""Near-duplicates: `--dedup near`, `--exclude-near`, `seer-shards contamination`, on real photos.

Copies are made from the test photos (tests/data/photos) by the transforms the issue names:
resize, JPEG recompression, PNG/WebP round trips, a 3% border crop, greyscale.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_prep.build import build_shards
from data_prep.cli import main
from data_prep.merge import merge
from seer_pipeline.shards import format as fmt

REPO = Path(__file__).resolve().parent.parent
PHOTOS = sorted((REPO / "tests" / "data" / "photos").glob("*.jpg"))
SEEDS, OTHERS = PHOTOS[:4], PHOTOS[4:]


def _copies(src: Path, d: Path) -> dict[str, tuple[int, int]]:
    """Write src and five altered copies of it into d; name -> size."""
    im = Image.open(src).convert("RGB")
    w, h = im.size
    s = src.stem[-12:]
    out = {f"{s}.jpg": im, f"{s}_up.png": im.resize((w * 3 // 2, h * 3 // 2), Image.BICUBIC),
           f"{s}_half.webp": im.resize((w // 2, h // 2), Image.BICUBIC),
           f"{s}_q40.jpg": im, f"{s}_grey.png": im.convert("L"),
           f"{s}_crop.jpg": im.crop((w * 3 // 100, h * 3 // 100, w - w * 3 // 100, h - h * 3 // 100))}
    for name, img in out.items():
        img.save(d / name, quality=40 if "q40" in name else 90)
    return {n: i.size for n, i in out.items()}


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("near_in")
    for p in SEEDS:
        _copies(p, d)
    for p in OTHERS:
        (d / p.name).write_bytes(p.read_bytes())
    return d


def _skips(d: Path) -> dict[str, tuple[str, str]]:
    return {os.path.basename(s): (r, os.path.basename(k)) for s, r, k in fmt.read_skipped(str(d / "skipped.tsv"), dup=True)}


def _jsons(d: Path) -> list[dict]:
    man = fmt.load_manifest(str(d))
    return [json.loads(s["json"]) for e in man["shards"] for _, _, s in fmt.read_samples(str(d / e["name"]))]


def test_near_dedup_groups_transformed_copies_and_keeps_the_largest(dump: Path, tmp_path: Path) -> None:
    man = build_shards([str(dump)], tmp_path / "o", dedup="near", workers=1)
    # each seed's 6 versions collapse to one; the 8 unrelated photos all stay (no false pair)
    assert man["written"] == len(SEEDS) + len(OTHERS), man["reasons"]
    assert man["reasons"] == {"near_duplicate": 5 * len(SEEDS)}
    kept = {os.path.basename(j["source"]) for j in _jsons(tmp_path / "o")}
    assert {p.name for p in OTHERS} <= kept
    for p in SEEDS:
        s = p.stem[-12:]
        assert f"{s}_up.png" in kept  # the largest version of the picture
        for suffix in ("", "_half.webp", "_q40.jpg", "_grey.png", "_crop.jpg"):
            name = f"{s}{suffix}" if suffix else f"{s}.jpg"
            assert _skips(tmp_path / "o")[name] == ("near_duplicate", f"{s}_up.png")
    assert all(len(j["phash"]) == 96 for j in _jsons(tmp_path / "o"))  # the signature is stored
    assert man["near"]["signature"] and fmt.read_skipped(str(tmp_path / "o" / "skipped.tsv"))  # 2-col readers work


def test_keeper_is_deterministic_first_by_source_on_a_tie(tmp_path: Path) -> None:
    im = Image.open(SEEDS[0]).convert("RGB")
    d = tmp_path / "in"
    d.mkdir()
    for n in ("b.jpg", "a.png", "c.webp"):  # same size: the tie goes to the first source name
        im.save(d / n, quality=70)
    outs = []
    for k, workers in ((0, 1), (1, 2)):
        build_shards([str(d)], tmp_path / f"o{k}", dedup="near", workers=workers)
        outs.append((tmp_path / f"o{k}" / "skipped.tsv").read_text())
    assert outs[0] == outs[1]
    assert _skips(tmp_path / "o0") == {"b.jpg": ("near_duplicate", "a.png"), "c.webp": ("near_duplicate", "a.png")}


def test_near_dedup_holds_across_parts_and_merge(dump: Path, tmp_path: Path) -> None:
    whole = build_shards([str(dump)], tmp_path / "whole", dedup="near")
    parts = [str(tmp_path / f"p{i}") for i in range(3)]
    for i, p in enumerate(parts):
        build_shards([str(dump)], p, dedup="near", part=(i, 3))
    man = merge(parts, str(tmp_path / "m"))
    assert man["written"] == whole["written"] and man["reasons"] == whole["reasons"]
    assert sorted(j["source"] for j in _jsons(tmp_path / "m")) == sorted(j["source"] for j in _jsons(tmp_path / "whole"))
    kept = {os.path.basename(j["source"]) for j in _jsons(tmp_path / "m")}
    assert all(k in kept for r, k in _skips(tmp_path / "m").values())  # duplicate_of names a kept sample
    assert main(["verify", str(tmp_path / "m")]) == 0


def test_exclude_near_removes_copies_of_eval_images(dump: Path, tmp_path: Path, tiny_shards: Path) -> None:
    ev = tmp_path / "eval"
    ev.mkdir()
    im = Image.open(OTHERS[0]).convert("RGB")  # the eval copy is smaller and recompressed
    im.resize((im.width * 2 // 3, im.height * 2 // 3)).save(ev / "val_0001.png")
    man = build_shards([str(dump)], tmp_path / "o", exclude_near=[str(ev)])
    assert man["reasons"] == {"excluded_near": 1}
    assert _skips(tmp_path / "o") == {OTHERS[0].name: ("excluded_near", "val_0001.png")}
    assert man["written"] == 6 * len(SEEDS) + len(OTHERS) - 1  # dedup stays exact: copies kept
    # an existing shard set (the test photos, no signatures stored) as the evaluation input:
    # every input is a copy of one of its photos, so all go, before any near-dup grouping
    man = build_shards([str(dump)], tmp_path / "o2", dedup="near", exclude_near=[str(tiny_shards)])
    assert man["written"] == 0 and man["reasons"] == {"excluded_near": 6 * len(SEEDS) + len(OTHERS)}
    with pytest.raises(FileNotFoundError, match="exclude-near"):
        build_shards([str(dump)], tmp_path / "o3", exclude_near=[str(tmp_path / "nope")])


def test_contamination_report(dump: Path, tmp_path: Path, tiny_shards: Path, capsys: pytest.CaptureFixture) -> None:
    ev = tmp_path / "eval"
    ev.mkdir()
    im = Image.open(SEEDS[1]).convert("L")
    w, h = im.size
    im.crop((w // 25, h // 25, w - w // 25, h - h // 25)).save(ev / "val_7.webp")  # grey, 4% crop
    Image.new("RGB", (64, 64), (200, 30, 30)).save(ev / "flat_red.png")  # no copy anywhere
    # tiny_shards was built without signatures: they are computed from its JPEGs
    rc = main(["contamination", str(tiny_shards), str(ev), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rc == 1 and rep["eval_images"] == 2 and rep["contaminated"] == 1 and rep["shard_samples"] == 12
    assert rep["images"][0]["eval"].endswith("val_7.webp")
    assert [os.path.basename(c["source"]) for c in rep["images"][0]["copies"]] == [SEEDS[1].name]
    assert "1 of 2 evaluation images" in out and SEEDS[1].name in out
    (ev / "val_7.webp").unlink()
    assert main(["contamination", str(tiny_shards), str(ev)]) == 0
    assert main(["contamination", str(tmp_path / "none"), str(ev)]) == 2


def test_exact_default_is_unchanged(dump: Path, tmp_path: Path) -> None:
    """No signature, no third skipped.tsv column, the same config keys, none of the near libraries."""
    code = ("import sys, json; from data_prep.build import build_shards; "
            f"m = build_shards([{str(dump)!r}], {str(tmp_path / 'o')!r}); "
            "print(json.dumps([sorted(m['config']), sorted(k for k in ('imagehash', 'faiss', 'scipy') if k in sys.modules)]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    keys, loaded = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                             text=True, check=True).stdout.splitlines()[-1])
    assert loaded == [] and "exclude_near" not in keys and keys == sorted(keys)
    assert (tmp_path / "o" / "skipped.tsv").read_text().splitlines()[0] == "source\treason"
    assert all("phash" not in j for j in _jsons(tmp_path / "o"))
    man = fmt.load_manifest(str(tmp_path / "o"))
    assert "near" not in man and man["config"]["dedup"] is True


def test_signature_is_imagehash_phash_on_the_whole_image() -> None:
    """The batched pHash stays within a few bits of imagehash's, and unrelated photos stay far apart."""
    import imagehash

    from data_prep import near

    sigs = []
    for p in PHOTOS:
        im = Image.open(p)
        sigs.append(near.signature(im))
        ref = int(str(imagehash.phash(im.convert("L"))), 16)
        assert bin(ref ^ int(sigs[-1][:16], 16)).count("1") <= 4, p.name
    assert near.pairs(sigs) == []  # the ten test photos are distinct pictures


def test_store_merge_refuses_near_parts() -> None:
    """The s3 merge copies shards server-side and knows only two-column skipped.tsv: one line, no damage."""
    from data_prep.store_build import _combine

    mans = [(f"s3://b/p{i}", {"part": [i, 2], "config": {"dedup": "near", "part": [i, 2]}, "shards": []})
            for i in range(2)]
    with pytest.raises(ValueError, match="merge into a local folder"):
        _combine(mans, {p: "source\treason\tduplicate_of\n" for p, _ in mans})


def test_small_sets_search_without_faiss_and_find_the_same_pairs() -> None:
    """numpy's brute force (small sets: no faiss import) and faiss's exact index agree pair for pair."""
    import numpy as np

    from data_prep import near

    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=(300, near.PARTS * 8), dtype=np.uint8)
    copies = base[:100].copy()
    for k in range(100):  # 0-9 bits flipped in the whole-image hash: some within THRESHOLD, some not
        for b in rng.choice(64, size=k % 10, replace=False):
            copies[k, b // 8] ^= np.uint8(1 << (b % 8))
    sigs = [r.tobytes().hex() for r in np.concatenate([base, copies])]
    brute = near.pairs(sigs)
    assert isinstance(near._index(near.codes(sigs)[0], len(sigs) * near.PARTS), near._Brute)
    old = near.BRUTE_MAX
    near.BRUTE_MAX = 0
    try:
        assert not isinstance(near._index(near.codes(sigs)[0], 1), near._Brute)
        flat = near.pairs(sigs)
        cross = near.pairs(sigs[:250], sigs[250:])
    finally:
        near.BRUTE_MAX = old
    assert brute == flat and len(brute) >= 80  # the planted copies within 8 bits are found
    assert near.pairs(sigs[:250], sigs[250:]) == cross


def test_exclude_near_takes_one_path_and_leaves_later_inputs_to_the_build(dump: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """`build --exclude-near E IN1 IN2` builds IN1 and IN2 (both were swallowed as evaluation
    sets); `build IN0 --exclude-near E IN1` is a usage error naming IN1, not a silent drop."""
    from data_prep.cli import _parser

    ev, a, b = tmp_path / "eval", tmp_path / "a", tmp_path / "b"
    for d in (ev, a, b):
        d.mkdir()
    (a / OTHERS[0].name).write_bytes(OTHERS[0].read_bytes())
    (b / OTHERS[1].name).write_bytes(OTHERS[1].read_bytes())
    Image.open(OTHERS[2]).save(ev / "val.png")
    args = _parser().parse_args(["build", "--exclude-near", str(ev), "--exclude-near", str(dump), str(a), "--out", "o"])
    assert args.inputs == [str(a)] and args.exclude_near == [str(ev), str(dump)]
    assert main(["build", "--exclude-near", str(ev), str(a), str(b), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert fmt.load_manifest(str(tmp_path / "o"))["written"] == 2
    with pytest.raises(SystemExit) as e:
        main(["build", str(a), "--exclude-near", str(ev), str(b), "--out", str(tmp_path / "o2")])
    assert e.value.code == 2 and f"unrecognized arguments: {b}" in capsys.readouterr().err


def test_bucketed_search_finds_the_single_index_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FLAT_MAX, merge's `--workers` search by hash-prefix buckets (data_prep.near_buckets):
    the same pairs, groups and kept images as faiss's one index, whatever the worker count."""
    import numpy as np

    from data_prep import near

    monkeypatch.setattr(near, "FLAT_MAX", 1000)
    monkeypatch.setattr(near, "BRUTE_MAX", 0)
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, size=(3000, near.PARTS * 8), dtype=np.uint8)
    copies = base[:1500].copy()
    for k in range(1500):  # 0-8 flips anywhere in the 48 bytes: in the whole-image hash or not
        for b in rng.choice(near.PARTS * 64, size=k % 9, replace=False):
            copies[k, b // 8] ^= np.uint8(1 << (b % 8))
    sigs = [r.tobytes().hex() for r in np.concatenate([base, copies])]
    single = near.pairs(sigs)
    assert len(single) > 500
    assert near.pairs(sigs, workers=2) == single
    assert near.pairs(sigs, workers=3) == single
    px, src = [int(x) for x in rng.integers(1, 100, len(sigs))], [f"s{i:05d}" for i in range(len(sigs))]
    assert near.dedup(sigs, px, src, workers=2) == near.dedup(sigs, px, src)


def test_near_merge_with_workers_equals_one_process(dump: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data_prep import near

    parts = [str(tmp_path / f"p{i}") for i in range(2)]
    for i, p in enumerate(parts):
        build_shards([str(dump)], p, dedup="near", part=(i, 2))
    monkeypatch.setattr(near, "FLAT_MAX", 4)  # the scale path, where --workers share the search
    monkeypatch.setattr(near, "BRUTE_MAX", 0)
    for w in (1, 2):
        copies = [str(tmp_path / f"w{w}-{p[-2:]}") for p in parts]
        for p, c in zip(parts, copies):
            shutil.copytree(p, c)
        merge(copies, str(tmp_path / f"m{w}"), workers=w)
    assert (tmp_path / "m1" / "skipped.tsv").read_text() == (tmp_path / "m2" / "skipped.tsv").read_text()
    assert sorted(j["source"] for j in _jsons(tmp_path / "m1")) == sorted(j["source"] for j in _jsons(tmp_path / "m2"))


def test_groups_are_the_connected_components_in_order() -> None:
    """groups() keeps only images that have an edge; against a breadth-first search over the
    whole graph (every image a node): same components, ordered by smallest member."""
    import random
    from collections import deque

    from data_prep import near

    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 80)
        edges = [(rng.randrange(n), rng.randrange(n), rng.randrange(9)) for _ in range(rng.randint(0, 2 * n))]
        adj: dict[int, set[int]] = {x: set() for x in range(n)}
        for i, j, _ in edges:
            adj[i].add(j)
            adj[j].add(i)
        seen, want = set(), []
        for x in range(n):
            if x in seen:
                continue
            comp, todo = [], deque([x])
            seen.add(x)
            while todo:
                y = todo.popleft()
                comp.append(y)
                for z in adj[y] - seen:
                    seen.add(z)
                    todo.append(z)
            if len(comp) > 1:
                want.append(sorted(comp))
        assert near.groups(n, edges) == want
    with pytest.raises(IndexError):
        near.groups(3, [(0, 3, 1)])


@pytest.mark.parametrize("damage", ["z" * 96, "ab" * 47, 12345, None], ids=["not-hex", "short", "number", "null"])
def test_a_damaged_stored_signature_is_recomputed_not_fatal(dump: Path, tmp_path: Path, damage: object) -> None:
    """A set's `phash` comes from its json, written by the builder; a hand-edited or damaged one
    (not hex, short, not a string) was taken as is and `bytes.fromhex` failed deep in a merge
    or a contamination check. Now it is recomputed from the stored image, as for older sets."""
    from data_prep import near, near_build

    out = tmp_path / "o"
    build_shards([str(dump)], out, dedup="near", workers=1)
    first = fmt.load_manifest(str(out))["shards"][0]["name"]
    samples = list(fmt.read_samples(str(out / first)))
    meta = json.loads(samples[0][2]["json"])
    meta["phash"] = damage
    fmt.write_shard(str(out / first), [(k, s["jpg"], json.dumps(meta).encode() if i == 0 else s["json"])
                                       for i, k, s in samples])
    got = {src: sig for src, sig, _ in near_build.shard_set_signatures(str(out))}
    assert len(got) == sum(e["count"] for e in fmt.load_manifest(str(out))["shards"])
    assert got[meta["source"]] == near.signature_of_bytes(samples[0][2]["jpg"])
    assert len(near.codes(list(got.values()))[0]) == len(got)  # every signature is usable


def test_spilled_sources_read_back_as_written(tmp_path: Path) -> None:
    from data_prep.near_build import SpilledStrings

    words = ["a/b.jpg", "", "café/猫.png", "bad-\udcff-byte.jpg", "x" * 5000, "dump.tar::m/1.jpg"]
    with SpilledStrings(str(tmp_path)) as s:
        for w in words:
            s.append(w)
            assert s[len(s) - 1] == w  # a read between writes sees the last one
        assert len(s) == len(words) and list(s) == words and s[-1] == words[-1]
        with pytest.raises(IndexError):
            s[len(words)]
        assert os.listdir(tmp_path) == []  # unlinked: a killed merge leaves nothing behind


def test_exclusion_then_dedup_names_the_right_keepers(dump: Path, tmp_path: Path) -> None:
    """Both stages in one build: grouping runs on the rows left after excluded_near, so each
    duplicate_of is looked up through that selection (an off-by-one there names the wrong file)."""
    ev = tmp_path / "eval"
    ev.mkdir()
    im = Image.open(OTHERS[0]).convert("RGB")
    im.resize((im.width * 2 // 3, im.height * 2 // 3)).save(ev / "val_0001.png")
    names = sorted(os.listdir(dump))
    assert names.index(OTHERS[0].name) < max(names.index(f"{p.stem[-12:]}.jpg") for p in SEEDS)  # rows after it
    man = build_shards([str(dump)], tmp_path / "o", dedup="near", exclude_near=[str(ev)], workers=1)
    assert man["reasons"] == {"excluded_near": 1, "near_duplicate": 5 * len(SEEDS)}
    skips = _skips(tmp_path / "o")
    assert skips.pop(OTHERS[0].name) == ("excluded_near", "val_0001.png")
    want = {}
    for p in SEEDS:
        s = p.stem[-12:]
        for suffix in (".jpg", "_half.webp", "_q40.jpg", "_grey.png", "_crop.jpg"):
            want[f"{s}{suffix}"] = ("near_duplicate", f"{s}_up.png")
    assert skips == want
