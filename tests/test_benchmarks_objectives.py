"""benchmarks/objectives.py: its rules by hand (median/spread, "beats clip by more than the spread",
calibration → steps), its data checks, and a quick end-to-end run. Results themselves are measured by the
script, never asserted here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import objectives as O  # noqa: E402

while str(REPO / "benchmarks") in sys.path:  # keep benchmarks/search.py etc. off the import path
    sys.path.remove(str(REPO / "benchmarks"))


# -- aggregation -----------------------------------------------------------------------------------------


def test_summarize_median_and_min_max_spread():
    s = O.summarize([0.5, 0.3, 0.4])
    assert s == {"median": 0.4, "min": 0.3, "max": 0.5, "spread": pytest.approx(0.2), "n": 3}
    assert O.summarize([0.1, 0.4]) == {"median": 0.25, "min": 0.1, "max": 0.4, "spread": 0.30000000000000004,
                                       "n": 2}  # fmt: skip
    one = O.summarize([None, float("nan"), 0.7])  # failed runs are left out
    assert one["n"] == 1 and one["median"] == 0.7 and one["spread"] == 0
    assert O.summarize([None]) is None


def test_beats_clip_by_more_than_the_spread():
    clip = O.summarize([0.20, 0.25, 0.15])  # median 0.20, spread 0.10
    # median 0.40, spread 0.20: difference 0.20 is not MORE than the larger spread 0.20
    assert O.compare(O.summarize([0.5, 0.3, 0.4]), clip) == 0
    # median 0.50, spread 0.10: 0.30 > 0.10
    assert O.compare(O.summarize([0.5, 0.45, 0.55]), clip) == 1
    # the baseline's spread counts too: clip spread 0.10 > difference 0.08 (candidate spread 0.02)
    assert O.compare(O.summarize([0.28, 0.27, 0.29]), clip) == 0
    assert O.compare(O.summarize([0.05, 0.06, 0.04]), clip) == -1  # 0.15 below, spread 0.10
    assert O.compare(O.summarize([0.05, 0.06, 0.04]), clip, higher_is_better=False) == 1
    assert O.compare(O.summarize([9.0]), clip, higher_is_better=None) == 0  # descriptive column
    assert O.compare(None, clip) == 0 and O.compare(clip, None) == 0
    # one seed each: no spread, so any difference counts
    assert O.compare(O.summarize([0.21]), O.summarize([0.20])) == 1


def _run(r1: float, zs: float | None, steps: int = 40, train_s: float = 12.0) -> dict:
    ev = {"retrieval": {"t2i": {"R@1": r1, "R@5": 0.5, "R@10": 0.7}, "i2t": {"R@1": r1, "R@5": 0.5,
          "R@10": 0.7}}, "gap": {"gap": 0.8}}  # fmt: skip
    if zs is not None:
        ev["zeroshot"] = {"top1": zs}
    return {"steps": steps, "batch_size": 128, "train_s": train_s, "eval": ev}


def test_aggregate_and_table_marks():
    agg = {
        "clip": O.aggregate([_run(0.20, 0.5), _run(0.25, 0.6), _run(0.15, 0.55)]),
        "siglip": O.aggregate(
            [_run(0.50, 0.5, 30, 11.0), _run(0.45, 0.6, 30, 12.5), _run(0.55, 0.55, 30), {"error": "x"}]
        ),  # fmt: skip
    }
    s = agg["siglip"]
    assert s["steps"]["median"] == 30 and s["train s"] == {"median": 12.0, "min": 11.0, "max": 12.5,
                                                           "spread": 1.5, "n": 3}  # fmt: skip
    assert s["samples/s"]["median"] == pytest.approx(30 * 128 / 12.0)
    assert agg["clip"]["probe relation"] is None  # no probe on this data: the column is dropped
    table = O.dataset_table("x", agg)
    lines = table.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "probe relation" not in head and "zero-shot top-1" in head and head[-1].startswith("beats clip")
    clip_row = [c.strip() for c in lines[2].strip("|").split("|")]
    sig_row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert clip_row[-1] == "(baseline)" and "▲" not in lines[2]
    col = head.index("t2i R@1")
    assert sig_row[col] == "0.5 (0.45–0.55) ▲" and sig_row[head.index("steps")] == "30"
    assert sig_row[head.index("zero-shot top-1")] == "0.55 (0.5–0.6)"  # equal: no mark
    assert sig_row[-1] == "t2i R@1, i2t R@1"


# -- calibration → steps ---------------------------------------------------------------------------------


def test_steps_for_the_budget():
    assert O.steps_for_budget(12.0, 0.3) == 40
    assert O.steps_for_budget(10.0, 0.33) == 30  # 30.3
    assert O.steps_for_budget(10.0, 0.4) == 25
    assert O.steps_for_budget(1.0, 0.4) == 3  # 2.5 rounds half up
    assert O.steps_for_budget(1.0, 0.5, min_steps=5) == 5
    with pytest.raises(ValueError):
        O.steps_for_budget(1.0, 0.0)
    # the calibration's step time: median after the warm-up steps
    assert O.calibrated_step_s([1.0, 0.5, 0.3, 0.4, 10.0], warmup=1) == pytest.approx(0.45)
    assert O.calibrated_step_s([0.9, 0.2], warmup=5) == pytest.approx(0.55)  # too short: all steps
    # the same schedule shape: warm-up is the same share of every run
    assert (O.warmup_steps(40, 0.1), O.warmup_steps(25, 0.1), O.warmup_steps(3, 0.1)) == (4, 2, 1)
    # later seeds: the median over every step of the finished runs (their warm-up steps left out)
    a = O.parse_args(["--budget-s", "12", "--calib-warmup", "1"])
    calib = {"steps": 40}
    assert O.steps_now(a, calib, []) == 40
    runs = [{"step_s": [9.0, 0.4, 0.4, 0.5]}, {"step_s": [9.0, 0.4, 0.6]}]  # median of 0.4 0.4 0.5 0.4 0.6
    assert O.steps_now(a, calib, runs) == 30


def test_train_command_keeps_the_budget_and_lets_a_candidate_add_flags(tmp_path):
    a = O.parse_args(["--budget-s", "5"])
    ds = O.DataSet("d", tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    c = O.Candidate.parse("clip+uniformity:0.1(t=3) --aug-flip 0.5")
    argv = O.train_cmd(a, ds, c, seed=2, steps=37, out=tmp_path / "run")
    flag = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}
    assert (flag["--steps"], flag["--warmup"], flag["--seed"]) == ("37", "4", "2")
    assert flag["--objective"] == "clip+uniformity:0.1(t=3)" and argv[-2:] == ["--aug-flip", "0.5"]


# -- candidates ------------------------------------------------------------------------------------------


def test_candidates_parse_check_and_default():
    c = O.Candidate.parse("--recipe improved")
    assert c.objective is None and c.flags == ("--recipe", "improved")
    assert O.why_unavailable(O.Candidate.parse("clip")) is None
    assert "nosuch" in O.why_unavailable(O.Candidate.parse("nosuch+clip"))
    assert "set by the benchmark" in O.why_unavailable(O.Candidate.parse("clip --steps 3"))
    assert "no such" in O.why_unavailable(O.Candidate.parse("clip --no-such-flag 1"))
    names, notes = O.default_candidates()
    assert names[0] == "clip" and "siglip" in names and "clip+alignment:0.1+uniformity:0.1" in names
    assert "uniformity" not in names and "alignment" not in names  # regularisers only beside clip
    from xmodal.objectives import REGISTRY

    heads = {p.split(":")[0].split("(")[0] for n in names for p in n.split()[0].split("+")}
    for name in set(REGISTRY) - O.REGULARISERS:  # every registered objective runs, or a note says why not
        assert name in heads or any(f"`{name}`" in n for n in notes), (name, notes)
    a = O.parse_args(["--candidates", "siglip; nosuch ;siglip"])
    cands, notes = O.pick_candidates(a)
    assert [c.label for c in cands] == ["clip", "siglip"]  # baseline added, unknown skipped, deduplicated
    assert any("nosuch" in n for n in notes) and any("baseline" in n for n in notes)


# -- data ------------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_emoji_held_out_by_emoji(tmp_path):
    wave, dark = "\U0001f44b", "\U0001f44b\U0001f3ff"  # waving hand, and with a skin tone
    _write(tmp_path / "test.jsonl", [{"image": "a.png", "caption": "x", "emoji": wave}])
    _write(tmp_path / "train.jsonl", [{"image": "b.png", "caption": "y", "emoji": "\U0001f600"}])
    assert O.held_out_by_emoji(tmp_path) == (tmp_path / "train.jsonl", 0, 1)
    _write(tmp_path / "train.jsonl", [{"image": "b.png", "caption": "y", "emoji": "\U0001f600"},
                                      {"image": "c.png", "caption": "z", "emoji": dark}])  # fmt: skip
    train, dropped, n_test = O.held_out_by_emoji(tmp_path)
    assert (train.name, dropped, n_test) == ("train-heldout.jsonl", 1, 1)
    assert [r["image"] for r in O.C.manifest_rows(train)] == ["b.png"]


def test_builtin_emoji_split_holds_out_every_emoji(tmp_path):
    from xmodal.data.emoji import EMOJI_TEST, find_font

    find_font()  # the README's Debian packages (fonts-noto-color-emoji, unicode-data) are required
    assert EMOJI_TEST.is_file(), "apt-get install unicode-data (README, .ci/run)"
    from xmodal.data import make_emoji

    make_emoji(tmp_path, image_size=8, limit=300, test_frac=0.3)
    train, dropped, n_test = O.held_out_by_emoji(tmp_path)
    assert dropped == 0 and n_test > 0 and train == tmp_path / "train.jsonl"


def test_probe_negatives_ride_on_the_test_split(tmp_path):
    from xmodal.data import make_shapes

    make_shapes(tmp_path, n_train=0, n_val=0, n_test=20, image_size=16)
    merged = O.with_probe(tmp_path / "test.jsonl", tmp_path / "probe.jsonl")
    rows, probe = O.C.manifest_rows(merged), O.C.manifest_rows(tmp_path / "probe.jsonl")
    assert len(rows) == 20 and sum("negatives" in r for r in rows) == len(probe) > 0
    assert O.with_probe(tmp_path / "test.jsonl", tmp_path / "probe.jsonl") == merged  # up to date


# -- end to end ------------------------------------------------------------------------------------------


def test_quick_run_end_to_end(tmp_path, monkeypatch):
    """Tiny shapes with 30 % noisy captions, clip and siglip, 1 seed; nothing recorded."""
    md = tmp_path / "B.md"
    monkeypatch.setenv("XMODAL_BENCHMARKS_MD", str(md))
    raw = O.main(
        ["--quick", "--datasets", "shapes-noisy", "--candidates", "clip;siglip", "--budget-s", "1",
         "--work-dir", str(tmp_path / "work"), "--json", str(tmp_path / "raw.json"), "--no-record"]
    )  # fmt: skip
    assert not md.exists()  # --no-record
    saved = json.loads((tmp_path / "raw.json").read_text())
    ds = saved["datasets"]["shapes-noisy"]
    assert set(ds["runs"]) == {"clip", "siglip"} and ds["info"]["n_shuffled"] == 90
    for label, runs in ds["runs"].items():
        (r,) = runs
        assert "error" not in r, r
        assert r["steps"] == ds["calibration"][label]["steps"] >= 3 and len(r["step_s"]) == r["steps"]
        assert r["train_s"] == pytest.approx(sum(r["step_s"])) and r["wall_s"] > r["train_s"]
        assert set(r["eval"]["probe"]["by_type"]) == {"attribute", "relation", "object"}
        assert 0 <= r["eval"]["retrieval"]["t2i"]["R@10"] <= 1 and r["eval"]["gap"]["gap"] is not None
    assert "| candidate | steps | train s |" in raw["body"] and "probe relation" in raw["body"]
    assert "1 s of training per run" in raw["body"] and "shuffled" in raw["body"]
    assert not (tmp_path / "work" / "objectives" / f"run-{os.getpid()}").exists()
