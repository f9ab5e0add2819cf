"""Hash-retrieval metrics against brute-force loops written from their definitions (DeepHash's CalcTopMap)."""

import numpy as np
import pytest

from xmodal.eval.hashing import hamming, hashing_metrics, map_at_k, pr_by_radius, precision_within, relevance


def codes(n, c, seed):
    return np.where(np.random.default_rng(seed).random((n, c)) < 0.5, -1.0, 1.0)


def brute_ap(q, db, ql, dbl, k):
    """One query's AP@K: rank by Hamming distance (ties by database order), precision at each hit."""
    dist = [sum(a != b for a, b in zip(q, d, strict=True)) for d in db]
    order = sorted(range(len(db)), key=lambda j: (dist[j], j))[:k]
    hits, total = 0, 0.0
    for rank, j in enumerate(order, start=1):
        if set(ql) & set(dbl[j]):
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


@pytest.mark.parametrize("k", [1, 5, 30, None])
def test_map_at_k_matches_a_loop_with_multi_labels_and_ties(k):
    q, db = codes(7, 8, 0), codes(30, 8, 1)  # 8 bits, 30 items: many distance ties
    rng = np.random.default_rng(2)
    ql = [list(rng.choice(4, size=rng.integers(1, 3), replace=False)) for _ in range(7)]
    dbl = [list(rng.choice(4, size=rng.integers(1, 3), replace=False)) for _ in range(30)]
    want = np.mean([brute_ap(q[i], db, ql[i], dbl, k or 30) for i in range(7)])
    got = map_at_k(hamming(q, db), relevance(ql, dbl), k)
    assert abs(got - want) < 1e-12


def test_a_query_without_relevant_items_counts_as_zero():
    q, db = codes(2, 16, 3), codes(5, 16, 4)
    rel = relevance(["a", "z"], ["a", "b", "a", "c", "b"])  # query "z" has no relevant item
    got = map_at_k(hamming(q, db), rel, None)
    want = (brute_ap(q[0], db, ["a"], [["a"], ["b"], ["a"], ["c"], ["b"]], 5) + 0.0) / 2
    assert abs(got - want) < 1e-12 and got > 0


def test_hamming_radius_precision_and_pr_curve_match_loops():
    q, db = codes(6, 8, 5), codes(40, 8, 6)
    ql, dbl = (
        list(np.random.default_rng(7).integers(0, 3, 6)),
        list(np.random.default_rng(8).integers(0, 3, 40)),
    )
    dist = [[sum(a != b for a, b in zip(x, y, strict=True)) for y in db] for x in q]
    rel = [[ql[i] == dbl[j] for j in range(40)] for i in range(6)]
    D, R = hamming(q, db), relevance(ql, dbl)
    assert D.tolist() == dist and R.tolist() == rel
    for r in (0, 2, 4):
        precs = []
        for i in range(6):
            inside = [j for j in range(40) if dist[i][j] <= r]
            precs.append(sum(rel[i][j] for j in inside) / len(inside) if inside else 0.0)
        assert abs(precision_within(D, R, r) - np.mean(precs)) < 1e-12
    curve = pr_by_radius(D, R, 8)
    assert curve["recall"][-1] == 1.0 and len(curve["precision"]) == 9
    assert all(a <= b + 1e-12 for a, b in zip(curve["recall"], curve["recall"][1:], strict=False))
    recall2 = np.mean(
        [sum(rel[i][j] for j in range(40) if dist[i][j] <= 2) / max(1, sum(rel[i])) for i in range(6)]
    )
    assert abs(curve["recall"][2] - recall2) < 1e-12


def test_identical_codes_of_one_class_are_perfect():
    base = codes(3, 32, 9)
    db = np.repeat(base, 10, axis=0)
    labels = [i // 10 for i in range(30)]
    m = hashing_metrics(base, db, [0, 1, 2], labels, ks=(10, 30))
    assert m["mAP@10"] == 1.0 and m["P@H<=2"] == 1.0 and m["bits"] == 32


def test_pr_plot_is_a_png_with_a_curve_per_method():
    import io

    from PIL import Image

    from xmodal.eval.report import plot_hashing_pr

    q, db = codes(6, 16, 10), codes(30, 16, 11)
    ql, dbl = [i % 3 for i in range(6)], [i % 3 for i in range(30)]
    m = hashing_metrics(q, db, ql, dbl)
    res = {"methods": {n: {"t2i": m, "i2t": m, "bits": 16} for n in ("learned", "itq-16", "lsh-16")}}
    for d in ("t2i", "i2t"):
        png = plot_hashing_pr(res, d)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        im = Image.open(io.BytesIO(png))
        im.verify()
        assert im.format == "PNG" and im.size[0] > 200
