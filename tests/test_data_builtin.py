"""Built-in datasets: shapes (deterministic, true to the pixels, probe) and emoji (drawn, labelled)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmodal.data import emoji as E
from xmodal.data import make_emoji, make_shapes, read_records
from xmodal.data.records import DataStats
from xmodal.data.shapes import COLORS, KINDS, RELATIONS
from xmodal.errors import UserError

CANON = re.compile(r"^a (small|large) (\w+) (\w+)"
                   r"(?: (left of|right of|above|below) a (small|large) (\w+) (\w+))?$")


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, n_train=24, n_val=4, n_test=30, image_size=32, seed=3)
    return out


def test_shapes_deterministic_by_seed(shapes_dir, tmp_path):
    again = make_shapes(tmp_path / "again", n_train=24, n_val=4, n_test=30, image_size=32, seed=3)
    files = sorted(p.relative_to(shapes_dir) for p in shapes_dir.rglob("*") if p.is_file())
    assert len(files) == 24 + 4 + 30 + 4
    for rel in files:
        assert (shapes_dir / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    assert set(again) == {"train", "val", "test", "probe"}
    other = make_shapes(tmp_path / "other", n_train=24, n_val=0, n_test=0, image_size=32, seed=4)
    assert other["train"].read_text() != (shapes_dir / "train.jsonl").read_text()


def test_shapes_captions_parse_and_match_pixels(shapes_dir):
    rows = _lines(shapes_dir / "train.jsonl") + _lines(shapes_dir / "test.jsonl")
    n_pairs = 0
    for row in rows:
        assert 2 <= len(row["caption"]) <= 3 and len(set(row["caption"])) == len(row["caption"])
        m = CANON.match(row["caption"][0])
        assert m, row["caption"][0]
        size, color, kind, rel = m.group(1), m.group(2), m.group(3), m.group(4)
        assert color in COLORS and kind in KINDS and row["label"] == kind == row["shapes"][0]["kind"]
        assert row["shapes"][0] == {"kind": kind, "color": color, "size": size}
        assert rel == row["relation"]
        if rel is None:
            continue
        n_pairs += 1
        other_color = m.group(6)
        assert any(rel in c or r in c for c in row["caption"][1:] for r in ("to the", "over", "under"))
        # the relation is true in the pixels: compare where the two colours are
        px = np.asarray(Image.open(shapes_dir / row["image"]), dtype=int)

        (ax, ay), (bx, by) = _centre(px, color), _centre(px, other_color)
        ok = {"left of": ax < bx - 4, "right of": ax > bx + 4, "above": ay < by - 4, "below": ay > by + 4}
        assert ok[rel], row
    assert n_pairs >= 20


def _centre(px: np.ndarray, color: str) -> tuple[float, float]:
    ys, xs = np.nonzero(np.abs(px - np.array(COLORS[color])).sum(-1) < 60)
    assert len(xs) > 5, color
    return xs.mean(), ys.mean()


def test_shapes_probe(shapes_dir):
    truths = {r["image"]: set(r["caption"]) for r in _lines(shapes_dir / "test.jsonl")}
    probe = _lines(shapes_dir / "probe.jsonl")
    assert len(probe) == sum(1 for r in _lines(shapes_dir / "test.jsonl") if r["relation"]) > 10
    for p in probe:
        assert p["caption"] in truths[p["image"]]
        assert sorted(n["type"] for n in p["negatives"]) == ["attribute", "object", "relation"]
        for n in p["negatives"]:
            assert n["caption"] not in truths[p["image"]]
            assert CANON.match(n["caption"])
        neg = {n["type"]: n["caption"].split() for n in p["negatives"]}
        true = p["caption"].split()
        assert sorted(neg["attribute"]) == sorted(true)  # the same words, rebound
        assert [w for w in neg["relation"] if w not in ("left", "right", "above", "below")] == [
            w for w in true if w not in ("left", "right", "above", "below")]
        assert sum(a != b for a, b in zip(neg["object"], true, strict=True)) == 1
    recs = read_records(shapes_dir / "probe.jsonl")
    assert len(recs) == len(probe) and "negatives" in recs[0].extra
    assert any(r in recs[0].captions[0] for r in RELATIONS)


def test_shapes_bad_args(tmp_path):
    with pytest.raises(UserError, match="--n-train"):
        make_shapes(tmp_path, n_train=-1)


def _has_emoji_font() -> bool:
    try:
        return E.find_font() is not None
    except UserError:
        return False


needs_emoji = pytest.mark.skipif(not (_has_emoji_font() and E.EMOJI_TEST.is_file()),
                                 reason="fonts-noto-color-emoji / unicode-data not installed")


@needs_emoji
def test_emoji_subset_renders_with_group_labels(tmp_path):
    stats = DataStats()
    paths = make_emoji(tmp_path, image_size=32, langs=["de"], limit=12, val_frac=0.2, test_frac=0.2,
                       stats=stats, workers=1)
    rows = [r for split in ("train", "val", "test") for r in _lines(paths[split])]
    assert len(rows) + stats.total() == 12 and len(rows) >= 10
    assert all(_lines(paths[s]) for s in ("train", "val", "test"))
    groups = {ln.split(":", 1)[1].strip() for ln in E.EMOJI_TEST.read_text().splitlines()
              if ln.startswith("# group:")}
    assert {r["label"] for r in rows} <= groups and len({r["label"] for r in rows}) >= 4
    for r in rows:
        px = np.asarray(Image.open(tmp_path / r["image"]))
        assert px.shape == (32, 32, 3)
        assert (px < 200).any(axis=-1).mean() > 0.05 and (px > 250).all(axis=-1).any()  # drawn, on white
        assert len(r["caption_langs"]) == len(r["caption"]) and r["caption_langs"][0] == "en"
    assert any("de" in r["caption_langs"] for r in rows)
    grin = make_emoji(tmp_path / "one", image_size=16, langs=["de"], limit=1, workers=1)
    row = [r for s in ("train", "val", "test") for r in _lines(grin[s])][0]
    assert row["emoji"] == "😀" and row["caption"][:2] == ["grinning face", "face, grin"]
    assert "grinsendes Gesicht" in row["caption"] and row["label"] == "Smileys & Emotion"
    recs = read_records(grin["test"]) + read_records(grin["train"]) + read_records(grin["val"])
    assert recs[0].extra["caption_langs"][row["caption"].index("grinsendes Gesicht")] == "de"


@needs_emoji
def test_emoji_split_keeps_skin_tones_together():
    emojis = E.parse_emoji_test(E.EMOJI_TEST)
    assert len(emojis) > 3000 and all(e.group and e.subgroup for e in emojis)
    split = E._split(emojis, seed=1, val_frac=0.1, test_frac=0.1)
    assert split == E._split(emojis, seed=1, val_frac=0.1, test_frac=0.1) != E._split(emojis, 2, 0.1, 0.1)
    where: dict[str, set] = {}
    for e in emojis:
        bare = e.text.translate({c: None for c in range(0x1F3FB, 0x1F400)})
        where.setdefault(bare, set()).add(split[e.base])
    assert len(where) > 1000 and all(len(s) == 1 for s in where.values())
    n_test = sum(split[e.base] == "test" for e in emojis)
    assert 0.05 < n_test / len(emojis) < 0.15


def test_emoji_missing_font_and_lang(tmp_path):
    with pytest.raises(UserError, match="fonts-noto-color-emoji"):
        make_emoji(tmp_path, font=tmp_path / "NoSuchFont.ttf", limit=2)
    with pytest.raises(UserError, match="xx-nope.*unicode-cldr-core"):
        E.read_annotations(tmp_path, "xx-nope")


@pytest.mark.skipif(not _has_emoji_font(), reason="fonts-noto-color-emoji not installed")
def test_emoji_falls_back_to_the_emoji_package(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "EMOJI_TEST", tmp_path / "absent.txt")
    paths = make_emoji(tmp_path / "out", image_size=16, limit=4, workers=1, val_frac=0, test_frac=0)
    rows = _lines(paths["train"])
    assert len(rows) == 4 and all(r["label"] is None and r["caption"][0] for r in rows)
    with pytest.raises(UserError, match="unicode-data"):
        make_emoji(tmp_path / "x", emoji_test=tmp_path / "absent.txt", limit=1)
