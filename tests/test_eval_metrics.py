"""Every evaluation metric against hand-computed values on tiny matrices and brute-force references."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from xmodal.eval.metrics import (
    alignment,
    average_precision_at_k,
    first_positive_rank,
    hubness_stats,
    k_occurrence,
    mean_per_class_recall,
    modality_gap,
    retrieval_metrics,
    skewness,
    topk_accuracy,
    topk_hits,
    uniformity,
)
from xmodal.eval.retrieval import build_positives


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# -- retrieval ---------------------------------------------------------------------------------------
def test_single_positive_hand_computed():
    scores = t(
        [
            [0.9, 0.1, 0.5],  # positive 0 → rank 1
            [0.8, 0.3, 0.7],  # positive 1 → rank 3
            [0.2, 0.6, 0.4],
        ]
    )  # positive 2 → rank 2
    pos = torch.eye(3, dtype=torch.bool)
    m = retrieval_metrics(scores, pos, ks=(1, 2, 3), map_k=10)
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@3"] == pytest.approx(1.0)
    assert m["median_rank"] == 2.0
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert m["mAP@10"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)  # one positive: AP = 1/rank
    assert retrieval_metrics(scores, pos, ks=(1,), map_k=2)["mAP@2"] == pytest.approx((1 + 0 + 1 / 2) / 3)


def test_multi_caption_coco_style_hand_computed():
    # 2 images, 4 captions (0,1 → image 0; 2,3 → image 1). Rows = captions (t2i queries).
    scores = t([[0.9, 0.2], [0.1, 0.3], [0.4, 0.8], [0.7, 0.6]])
    pos = build_positives(["a", "b", "c", "d"], torch.tensor([0, 0, 1, 1]), 2)
    assert pos.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    t2i = retrieval_metrics(scores, pos, ks=(1, 2))
    assert t2i["R@1"] == 0.5 and t2i["R@2"] == 1.0
    assert t2i["median_rank"] == 1.5
    assert t2i["MRR"] == pytest.approx(0.75)
    # i2t: image 0 ranks captions 0 (P), 3, 2, 1 (P) → correct at 1 because ANY of its captions counts
    i2t = retrieval_metrics(scores.T, pos.T, ks=(1,))
    assert i2t["R@1"] == 1.0 and i2t["median_rank"] == 1.0
    # AP: image 0 hits at ranks 1 and 4 → (1 + 2/4) / 2; image 1 hits at 1, 2 → 1
    assert i2t["mAP@10"] == pytest.approx((0.75 + 1.0) / 2)


def test_multi_positive_map_hand_computed():
    scores = t([[0.9, 0.8, 0.7, 0.6, 0.5]])
    pos = t([[1, 0, 1, 0, 1]], torch.bool)
    assert float(average_precision_at_k(scores, pos, 10)[0]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert float(average_precision_at_k(scores, pos, 3)[0]) == pytest.approx((1 + 2 / 3) / 3)
    assert float(average_precision_at_k(scores, pos, 2)[0]) == pytest.approx(
        1 / 2
    )  # divides by min(k, n_pos)


def test_ties_each_rule_hand_computed():
    scores = t(
        [
            [0.5, 0.5, 0.5, 0.1],  # positive at 2, tied with 0 and 1
            [0.5, 0.5, 0.2, 0.1],  # positive at 0, tied with 1
            [0.5, 0.5, 0.2, 0.1],
        ]
    )  # positive at 1, tied with 0
    pos = t([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], torch.bool)
    assert first_positive_rank(scores, pos, "index").tolist() == [3, 1, 2]
    assert first_positive_rank(scores, pos, "pessimistic").tolist() == [3, 2, 2]
    assert first_positive_rank(scores, pos, "optimistic").tolist() == [1, 1, 1]
    assert topk_hits(scores, pos, 1, "index").tolist() == [False, True, False]
    assert topk_hits(scores, pos, 1, "pessimistic").tolist() == [False, False, False]
    assert topk_hits(scores, pos, 1, "optimistic").tolist() == [True, True, True]


def test_topk_rule_equals_clip_benchmark_recall_under_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 37), generator=gen).float()  # many exact ties
    pos = torch.zeros(50, 37, dtype=torch.bool)
    pos[torch.arange(50), torch.randint(0, 37, (50,), generator=gen)] = True
    pos[torch.arange(0, 50, 3), torch.randint(0, 37, (17,), generator=gen)] = True

    def cb_recall_at_k(scores, positive_pairs, k):  # CLIP_benchmark's recall_at_k, verbatim logic
        nb_texts, nb_images = scores.shape
        topk_indices = torch.topk(scores, k, dim=1)[1]
        nb_positive = positive_pairs.sum(dim=1)
        onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
        nb_true_positive = (onehot * positive_pairs.view(nb_texts, 1, nb_images)).sum(dim=(1, 2))
        return nb_true_positive / nb_positive

    try:
        from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as cb_recall_at_k  # noqa: F811
    except ImportError:
        pass
    for k in (1, 5, 10):
        ref = (cb_recall_at_k(scores, pos, k) > 0).float().mean().item()
        assert retrieval_metrics(scores, pos, ks=(k,), ties="topk")[f"R@{k}"] == pytest.approx(
            ref, abs=1e-6
        )  # CB averages in fp32


def _brute_ranking(row, posrow, ties):
    idx = list(range(len(row)))
    if ties == "pessimistic":
        key = lambda j: (-row[j], posrow[j], j)  # noqa: E731
    elif ties == "optimistic":
        key = lambda j: (-row[j], not posrow[j], j)  # noqa: E731
    else:
        key = lambda j: (-row[j], j)  # noqa: E731
    return sorted(idx, key=key)


@pytest.mark.parametrize("ties", ["index", "pessimistic", "optimistic"])
def test_rank_metrics_match_brute_force(ties):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=(40, 23)).astype(np.float32)  # integer scores: many ties
    pos = rng.random((40, 23)) < 0.15
    pos[np.arange(40), rng.integers(0, 23, 40)] = True
    first, r_at, aps = [], {k: [] for k in (1, 5, 10)}, []
    for row, prow in zip(scores, pos, strict=True):
        order = _brute_ranking(list(row), list(prow), ties)
        rel = [bool(prow[j]) for j in order]
        r = rel.index(True) + 1
        first.append(r)
        for k in r_at:
            r_at[k].append(r <= k)
        hits, s = 0, 0.0
        for i, x in enumerate(rel[:10], 1):
            if x:
                hits += 1
                s += hits / i
        aps.append(s / min(10, sum(rel)))
    m = retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(pos), ties=ties)
    for k in (1, 5, 10):
        assert m[f"R@{k}"] == pytest.approx(np.mean(r_at[k]), abs=1e-12)
    assert m["median_rank"] == pytest.approx(np.median(first))
    assert m["MRR"] == pytest.approx(np.mean(1 / np.array(first)))
    assert m["mAP@10"] == pytest.approx(np.mean(aps))


def test_default_rank_metrics_use_index_order_and_r_at_k_uses_topk():
    scores = t([[0.5, 0.5]])
    pos = t([[0, 1]], torch.bool)
    m = retrieval_metrics(scores, pos, ks=(1,))
    assert m["median_rank"] == 2.0 and m["MRR"] == 0.5
    assert m["R@1"] == float(pos[0, torch.topk(scores, 1)[1][0, 0]])


def test_positives_caption_and_label_modes():
    caps = ["a dog", "a cat", "a dog", "a cow"]
    owner = torch.tensor([0, 1, 2, 3])
    p = build_positives(caps, owner, 4, mode="caption")
    assert p.int().tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    p = build_positives(caps, owner, 4, labels=["x", "y", "y", None], mode="label")
    assert p.int().tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
    # caption mode widens R@1: the query "a dog" of image 0 ranking image 2 first is now correct
    scores = t([[0.1, 0.0, 0.9, 0.0], [0.0, 1.0, 0.0, 0.0], [0.9, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 1.0]])
    base = build_positives(caps, owner, 4)
    assert retrieval_metrics(scores, base, ks=(1,))["R@1"] == 0.5
    assert retrieval_metrics(scores, build_positives(caps, owner, 4, mode="caption"), ks=(1,))["R@1"] == 1.0


def test_label_positives_without_labels_is_user_error():
    from xmodal.errors import UserError

    with pytest.raises(UserError, match="--positives label"):
        build_positives(["a"], torch.tensor([0]), 1, labels=[None], mode="label")


# -- zero-shot ---------------------------------------------------------------------------------------
def test_topk_accuracy_and_mean_per_class_recall():
    from sklearn.metrics import balanced_accuracy_score

    logits = t([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 1, 2, 2])
    acc = topk_accuracy(logits, target, (1, 2))
    assert acc[1] == 0.75  # rows 0, 1, 3 correct; row 2 has class 2 second
    assert acc[2] == 1.0
    pred = logits.argmax(1).numpy()
    assert mean_per_class_recall(pred, target.numpy()) == pytest.approx((1 + 1 + 0.5) / 3)
    assert mean_per_class_recall(pred, target.numpy()) == pytest.approx(balanced_accuracy_score(target, pred))


# -- hubness -----------------------------------------------------------------------------------------
def test_hubness_hand_computed():
    scores = t([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.7, 0.6, 0.0], [0.1, 0.9, 0.3]])  # top-1: 0, 0, 0, 1
    nk = k_occurrence(scores, k=1)
    assert nk.tolist() == [3, 1, 0]
    h = hubness_stats(scores, k=1)
    d = np.array([5 / 3, -1 / 3, -4 / 3])
    assert h["skewness"] == pytest.approx(np.mean(d**3) / np.mean(d**2) ** 1.5)
    assert h["antihub_share"] == pytest.approx(1 / 3)
    assert h["max_occurrence"] == 3


@pytest.mark.parametrize("k", [1, 3, 10])
def test_hubness_matches_brute_force_and_scipy(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(60, 8))
    y = rng.normal(size=(45, 8))
    scores = x @ y.T
    nk = np.zeros(45, dtype=int)
    for row in scores:
        for j in sorted(range(45), key=lambda j, row=row: (-row[j], j))[:k]:
            nk[j] += 1
    got = k_occurrence(torch.from_numpy(scores).float(), k)
    assert got.tolist() == nk.tolist()
    assert got.sum() == 60 * k
    h = hubness_stats(torch.from_numpy(scores).float(), k)
    assert h["skewness"] == pytest.approx(scipy.stats.skew(nk), abs=1e-12)
    assert h["antihub_share"] == pytest.approx(np.mean(nk == 0))


def test_skewness_constant_is_zero():
    assert skewness(np.array([2, 2, 2])) == 0.0


# -- geometry ----------------------------------------------------------------------------------------
def test_gap_alignment_uniformity_hand_computed():
    x = t([[1.0, 0.0], [0.0, 1.0]])
    y = t([[1.0, 0.0], [1.0, 0.0]])
    assert modality_gap(x, y) == pytest.approx(math.sqrt(0.5))
    assert alignment(x, y) == pytest.approx((0 + 2) / 2)
    assert uniformity(x) == pytest.approx(-4.0)  # one pair, ‖x0 − x1‖² = 2 → log exp(−4)


def test_alignment_uniformity_match_direct_formulas():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.normal(size=(20, 5))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    ref_align = np.mean([np.sum((x[i] - y[i]) ** 2) for i in range(20)])
    ref_unif = np.log(
        np.mean([np.exp(-2 * np.sum((x[i] - x[j]) ** 2)) for i in range(20) for j in range(i + 1, 20)])
    )
    ref_gap = np.linalg.norm(x.mean(0) - y.mean(0))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    assert alignment(xt, yt) == pytest.approx(ref_align, rel=1e-12)
    assert uniformity(xt) == pytest.approx(ref_unif, rel=1e-12)
    assert modality_gap(xt, yt) == pytest.approx(ref_gap, rel=1e-12)
