"""The digits data set (scikit-learn's bundled 8×8 digits) and `xmodal data digits`."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, run_cli
from xmodal.data.cli import register
from xmodal.data.digits import TEMPLATES, WORDS, captions_for, make_digits, split_indices


def _rows(path):
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    make_digits(out, image_size=16, seed=3)
    return out


def test_splits_cover_every_scan_once_and_are_stratified(digits_dir):
    splits = {s: _rows(digits_dir / f"{s}.jsonl") for s in ("train", "val", "test")}
    idx = [r["sklearn_index"] for rows in splits.values() for r in rows]
    assert sorted(idx) == list(range(1797))  # all of sklearn's digits, each in exactly one split
    counts = {s: Counter(r["label"] for r in rows) for s, rows in splits.items()}
    for s, frac in (("test", 0.2), ("val", 0.1)):
        assert set(counts[s]) == {str(d) for d in range(10)}
        total = Counter(r["label"] for rows in splits.values() for r in rows)
        for d, n in counts[s].items():  # per class within one item of the share
            assert abs(n - total[d] * frac) <= 1, (s, d, n, total[d])
    assert len(splits["test"]) == pytest.approx(1797 * 0.2, abs=10)


def test_rows_captions_labels_and_images(digits_dir):
    from sklearn.datasets import load_digits

    target = load_digits().target
    for r in _rows(digits_dir / "test.jsonl")[:50]:
        d = int(r["label"])
        assert d == target[r["sklearn_index"]] and r["digit_word"] == WORDS[d]
        assert len(r["caption"]) == len(set(r["caption"])) == 3
        assert all(re.search(rf"\b({WORDS[d]}|{d})\b", c) for c in r["caption"])
        img = Image.open(digits_dir / r["image"])
        assert img.mode == "RGB" and img.size == (16, 16)
        px = np.asarray(img)
        assert px[0, 0].min() > 200 and px.min() < 120  # white paper, dark ink


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, digits_dir):
    make_digits(tmp_path / "again", image_size=16, seed=3)
    for name in ("train.jsonl", "test.jsonl", "images/0007.png"):
        assert (tmp_path / "again" / name).read_bytes() == (digits_dir / name).read_bytes()
    t = np.repeat(np.arange(10), 20)
    a, b = split_indices(t, 0, 0.1, 0.2), split_indices(t, 1, 0.1, 0.2)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(200))
    assert a["test"].tolist() != b["test"].tolist() and len(a["test"]) == 40


def test_captions_for_picks_distinct_templates():
    rng = np.random.default_rng(0)
    caps = captions_for(7, rng)
    filled = [t.format(word="seven", digit=7) for t in TEMPLATES]
    assert len(caps) == 3 and all(c in filled for c in caps)
    assert caps == sorted(caps, key=filled.index)  # template order kept


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop", hidden=True)(lambda: None)
    register(app)
    return app


def test_data_digits_command(tmp_path):
    res = CliRunner().invoke(_app(), ["data", "digits", str(tmp_path / "d"), "--image-size", "12"])
    assert res.exit_code == 0, res.output
    assert "train.jsonl" in res.output and "test lines" in res.output
    assert Image.open(tmp_path / "d" / "images" / "0000.png").size == (12, 12)


def test_bad_fractions_are_one_line_errors(tmp_path):
    p = run_cli("data", "digits", str(tmp_path / "d"), "--test-frac", "0.7", "--val-frac", "0.4", check=False)
    assert_one_line_error(p, "--val-frac/--test-frac")
