"""benchmarks/continual.py: its pure rules by hand — average R@K, backward transfer and forgetting of a
hand-made forgetting matrix, and the stage split. No training here; results are measured by the script."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import continual as K  # noqa: E402

while str(REPO / "benchmarks") in sys.path:  # keep benchmarks/search.py etc. off the import path
    sys.path.remove(str(REPO / "benchmarks"))

# rows: after stage t; columns: stage j's test split
R = [
    [0.50, 0.10, 0.05],
    [0.30, 0.60, 0.10],
    [0.20, 0.40, 0.70],
]


def test_average_bwt_and_forgetting_by_hand():
    assert K.average_last(R) == pytest.approx((0.20 + 0.40 + 0.70) / 3)  # 0.4333
    # BWT = mean_j<T (R[T,j] − R[j,j]) = ((0.20 − 0.50) + (0.40 − 0.60)) / 2 = −0.25
    assert K.backward_transfer(R) == pytest.approx(-0.25)
    # forgetting = mean_j<T max_t<T (R[t,j] − R[T,j]):
    #   j=1: max(0.50, 0.30) − 0.20 = 0.30;  j=2: max(0.10, 0.60) − 0.40 = 0.20  → 0.25
    assert K.forgetting(R) == pytest.approx(0.25)
    assert K.stream_metrics(R) == pytest.approx({"avg": 1.3 / 3, "bwt": -0.25, "forgetting": 0.25})


def test_forgetting_takes_the_best_earlier_row_not_the_diagonal():
    # stage 1's test rises after stage 2 (positive transfer), then drops: forgetting counts from the peak,
    # BWT from the diagonal
    M = [[0.40, 0.10, 0.0], [0.55, 0.50, 0.0], [0.45, 0.50, 0.60]]
    assert K.backward_transfer(M) == pytest.approx(((0.45 - 0.40) + (0.50 - 0.50)) / 2)  # +0.025
    assert K.forgetting(M) == pytest.approx(((0.55 - 0.45) + (0.50 - 0.50)) / 2)  # 0.05
    # no forgetting at all: later rows improve every column → forgetting is negative, not clipped
    up = [[0.2, 0.0], [0.3, 0.5]]
    assert K.backward_transfer(up) == pytest.approx(0.1) and K.forgetting(up) == pytest.approx(-0.1)


def test_metrics_edge_cases():
    assert K.average_last([[0.7]]) == 0.7
    assert math.isnan(K.backward_transfer([[0.7]])) and math.isnan(K.forgetting([[0.7]]))
    with pytest.raises(ValueError):
        K.backward_transfer([[0.1, 0.2]])  # not square
    assert K.mean_matrix([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [0.0, 1.0]]]) == [[0.5, 1.0], [1.0, 2.0]]


def test_stage_split_keeps_order_and_balances():
    counts = [("A", None, 10), ("B", None, 30), ("C", None, 20), ("D", None, 40)]  # total 100, share 33.3
    # middles of the cumulative ranges: A 5, B 25, C 50, D 80 → stages 0, 0, 1, 2
    assert K.plan_stages(counts, 3) == [[("A", None), ("B", None)], [("C", None)], [("D", None)]]
    assert K.plan_stages(counts, 2) == [[("A", None), ("B", None)], [("C", None), ("D", None)]]


def test_stage_split_cuts_an_oversized_group_at_subgroups():
    counts = [("S", "s1", 10), ("P", "hand", 30), ("P", "person", 30), ("P", "family", 20), ("F", "f1", 10)]
    # total 100, share 50: P (80) is split into its subgroups; S (10) and F (10) stay whole
    # middles: S 5, hand 25, person 55, family 80, F 95 → stages 0, 0, 1, 1, 1
    plan = K.plan_stages(counts, 2)
    assert plan == [[("S", None), ("P", "hand")], [("P", "person"), ("P", "family"), ("F", None)]]
    assert K.stage_of("P", "person", plan) == 1 and K.stage_of("S", "s1", plan) == 0
    assert K.stage_of("F", "anything", plan) == 1  # a whole group takes every subgroup
    assert K.stage_of("X", None, plan) is None
    assert K.stage_name(plan[0]) == "S; P (hand)"
    assert K.stage_name(plan[1]) == "P (person, family); F"


def test_stage_split_refuses_an_empty_stage():
    with pytest.raises(ValueError, match="without training rows"):
        K.plan_stages([("A", None, 90), ("B", None, 10)], 3)  # A's middle 45 → stage 1; B 95 → 2; 0 empty
    with pytest.raises(ValueError):
        K.plan_stages([], 2)


def test_unit_counts_and_manifest_rows():
    rows = [
        {"label": "Smileys", "subgroup": "face"},
        {"label": "People", "subgroup": "hand"},
        {"label": "Smileys", "subgroup": "face"},
    ]
    assert K.unit_counts("emoji", rows) == [("Smileys", "face", 2), ("People", "hand", 1)]
    shapes = [{"label": "star"}, {"label": "circle"}, {"label": "star"}]
    assert K.unit_counts("shapes", shapes) == [("circle", None, 1), ("star", None, 2)]  # KINDS order


def test_stage_argv_equal_compute(tmp_path):
    a = K.parse_args(["--steps", "300", "--batch-size", "64", "--work-dir", str(tmp_path)])
    table = K.methods(a)
    s = K.StageData(1, "B", tmp_path / "s2.jsonl", tmp_path / "t2.jsonl", tmp_path / "u2.jsonl",
                    tmp_path / "b2.jsonl", 10, 5)  # fmt: skip
    prev = tmp_path / "prev"
    argvs = {n: K.stage_run(a, m, s, prev, 0, tmp_path / n) for n, m in table.items()}
    for n, argv in argvs.items():  # the same steps and batch for every method
        assert argv[argv.index("--steps") + 1] == "300" and argv[argv.index("--batch-size") + 1] == "64", n
        assert argv[argv.index("--init-from") + 1] == str(prev), n
    assert argvs["replay"][argvs["replay"].index("--replay") + 1] == str(s.before)
    assert argvs["ctp"][argvs["ctp"].index("--replay") + 1] == str(s.before)
    assert "--replay" not in argvs["finetune"] and "--replay" not in argvs["modx"]
    assert argvs["joint"][argvs["joint"].index("--data") + 1] == str(s.upto)
    assert argvs["modx"][argvs["modx"].index("--objective") + 1] == "clip+modx:1"
    scratch = K.parse_args(["--joint-from", "scratch", "--work-dir", str(tmp_path)])
    assert "--init-from" not in K.stage_run(scratch, K.methods(scratch)["joint"], s, prev, 0, tmp_path / "j")
