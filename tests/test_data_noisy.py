"""Noisy-caption variants (`xmodal data noisy`): which pairs are shuffled is known exactly."""

import json
from collections import Counter

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from tests.conftest import assert_one_line_error, run_cli, write_tiny_manifest
from xmodal.data.cli import register
from xmodal.data.noisy import cyclic_permutation, make_noisy, side_file


def _rows(path):
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _unique_manifest(folder, n=30):
    """n images whose captions are all different (so every shuffled pair is wrong)."""
    src = write_tiny_manifest(folder, n=n)
    rows = _rows(src)
    for i, r in enumerate(rows):
        r["caption"] = [f"item {i} " + c for c in r["caption"]]
        r["extra_field"] = i
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def test_cyclic_permutation_has_no_fixed_point():
    for k in (2, 3, 10, 101):
        for seed in range(5):
            p = cyclic_permutation(k, np.random.default_rng(seed))
            assert sorted(p) == list(range(k)) and all(p[i] != i for i in range(k))
            seen, i = set(), 0  # one cycle through every element
            while i not in seen:
                seen.add(i)
                i = p[i]
            assert len(seen) == k


def test_fraction_shuffled_recorded_and_test_untouched(tmp_path):
    src = _unique_manifest(tmp_path / "data")
    orig = {r["image"]: r for r in _rows(src)}
    out = tmp_path / "noisy" / "train.jsonl"  # another folder: image paths are re-based
    res = make_noisy(src, out, fraction=0.3, seed=1)
    rows = _rows(out)
    assert len(rows) == 30 and res["n_shuffled"] == res["n_changed"] == 9
    side = json.loads(side_file(out).read_text())
    assert side_file(out).name == "train.noisy.json" and sorted(side["shuffled"]) == sorted(res["shuffled"])
    noisy = {r["image"] for r in rows if r["noisy"]}
    assert noisy == set(side["shuffled"]) == set(side["changed"])
    for r in rows:
        key = r["image"].removeprefix("../data/")
        assert (out.parent / r["image"]).resolve() == (src.parent / key).resolve()
        assert r["label"] == orig[key]["label"] and r["extra_field"] == orig[key]["extra_field"]
        if r["noisy"]:
            donor = r["caption_from"].removeprefix("../data/")
            assert donor != key and r["caption"] == orig[donor]["caption"]
        else:
            assert r["caption"] == orig[key]["caption"] and r["caption_from"] is None
    # every caption list still appears exactly once: the captions were permuted, not resampled
    assert Counter(json.dumps(r["caption"]) for r in rows) == Counter(
        json.dumps(r["caption"]) for r in orig.values()
    )
    from xmodal.data import read_records

    assert len(read_records(str(out))) == 30  # readable as a manifest from its own folder


def test_same_seed_same_file_and_duplicates_counted(tmp_path):
    src = write_tiny_manifest(tmp_path / "data", n=40)  # 8 distinct caption sets: some swaps are no-ops
    a = make_noisy(src, tmp_path / "a.jsonl", fraction=0.5, seed=0)
    make_noisy(src, tmp_path / "b.jsonl", fraction=0.5, seed=0)
    c = make_noisy(src, tmp_path / "c.jsonl", fraction=0.5, seed=1)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert a["shuffled"] != c["shuffled"]
    assert a["n_shuffled"] == 20 and set(a["changed"]) <= set(a["shuffled"])
    orig = {r["image"]: r["caption"] for r in _rows(src)}
    for r in _rows(tmp_path / "a.jsonl"):
        own = orig[r["image"].removeprefix("data/")]
        assert (r["image"] in a["changed"]) == (sorted(r["caption"]) != sorted(own))


def test_zero_fraction_is_a_clean_copy(tmp_path):
    src = _unique_manifest(tmp_path / "data", n=10)
    res = make_noisy(src, tmp_path / "data" / "copy.jsonl", fraction=0)
    assert res["n_shuffled"] == 0 and not any(r["noisy"] for r in _rows(tmp_path / "data" / "copy.jsonl"))


@pytest.mark.parametrize(
    "args, needle",
    [(["--fraction", "1.5"], "--fraction"), (["--fraction", "0.01"], "--fraction"), ([], "--out")],
)
def test_bad_input_is_one_line_error(tmp_path, args, needle):
    src = _unique_manifest(tmp_path / "data", n=10)
    out = ["--out", str(tmp_path / "n.jsonl")] if needle != "--out" else ["--out", str(src)]
    p = run_cli("data", "noisy", str(src), *out, *args, check=False)
    assert_one_line_error(p, needle)


def test_data_noisy_command(tmp_path):
    src = _unique_manifest(tmp_path / "data", n=20)
    app = typer.Typer()
    app.command("noop", hidden=True)(lambda: None)
    register(app)
    out = tmp_path / "n" / "noisy.jsonl"
    res = CliRunner().invoke(app, ["data", "noisy", str(src), "--out", str(out), "--fraction", "0.3"])
    assert res.exit_code == 0, res.output
    assert "6 with shuffled captions" in res.output and "noisy.noisy.json" in res.output
    assert sum(r["noisy"] for r in _rows(out)) == 6
