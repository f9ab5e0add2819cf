"""Pure metric functions on score matrices and embeddings (torch/numpy, no model, no data layer).

Conventions: a score matrix is queries × gallery (higher = more similar); `positives` is a boolean
matrix of the same shape. Ranks are 1-based. Every function here is checked against a brute-force
reference in tests/test_eval_metrics.py; docs/eval.md gives the exact definitions.

Ties (exactly equal scores) are resolved by the `ties` rule:
- "topk" (default): R@K is membership in `torch.topk(scores, K)`, exactly as CLIP_benchmark computes
  it (torch.topk's own order among equal scores, which torch does not specify). Rank-based metrics
  (median rank, MRR, mAP@K) use the "index" order, which agrees with topk whenever no exact tie straddles
  the cut-off.
- "index": stable sort, among equal scores the lower gallery index ranks first.
- "pessimistic": among equal scores, non-positives rank before positives (then by index).
- "optimistic": among equal scores, positives rank before non-positives (then by index).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

TIES = ("topk", "index", "pessimistic", "optimistic")
_CHUNK = 1024  # query rows per chunk: bounds memory of the sorts to _CHUNK × gallery


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def rank_order(
    scores: torch.Tensor, positives: torch.Tensor | None = None, ties: str = "index"
) -> torch.Tensor:
    """Gallery indices of each query sorted best-first under the tie rule (Q×G long)."""
    _check_ties(ties)
    scores = torch.as_tensor(scores)
    if ties in ("index", "topk") or positives is None:
        return torch.sort(scores, dim=1, descending=True, stable=True)[1]
    pos = torch.as_tensor(positives).to(torch.int8)
    # secondary key first (stable), then a stable sort by score keeps that order among equal scores
    key = pos if ties == "pessimistic" else -pos
    perm1 = torch.sort(key, dim=1, stable=True)[1]
    s1 = scores.gather(1, perm1)
    perm2 = torch.sort(s1, dim=1, descending=True, stable=True)[1]
    return perm1.gather(1, perm2)


def relevance_in_rank_order(
    scores: torch.Tensor, positives: torch.Tensor, ties: str = "index"
) -> torch.Tensor:
    """Q×G bool: positives[q, order[q, r]], i.e. whether the item at rank r+1 is a positive."""
    positives = torch.as_tensor(positives, dtype=torch.bool)
    order = rank_order(scores, positives, ties)
    return positives.gather(1, order)


def first_positive_rank(scores: torch.Tensor, positives: torch.Tensor, ties: str = "index") -> torch.Tensor:
    """1-based rank of the best-ranked positive of each query (Q long). Every query needs ≥ 1 positive."""
    positives = torch.as_tensor(positives, dtype=torch.bool)
    if not bool(positives.any(1).all()):
        raise ValueError("every query needs at least one positive")
    out = []
    for s in range(0, len(scores), _CHUNK):
        rel = relevance_in_rank_order(scores[s : s + _CHUNK], positives[s : s + _CHUNK], ties)
        out.append(rel.to(torch.uint8).argmax(1) + 1)  # argmax returns the first maximum
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def topk_hits(scores: torch.Tensor, positives: torch.Tensor, k: int, ties: str = "topk") -> torch.Tensor:
    """Q bool: whether any positive is among the query's top-k under the tie rule."""
    _check_ties(ties)
    positives = torch.as_tensor(positives, dtype=torch.bool)
    k = min(k, scores.shape[1])
    out = []
    for s in range(0, len(scores), _CHUNK):
        sc, pos = scores[s : s + _CHUNK], positives[s : s + _CHUNK]
        if ties == "topk":  # CLIP_benchmark: recall_at_k(...) > 0 with torch.topk
            idx = torch.topk(sc, k, dim=1)[1]
            out.append(pos.gather(1, idx).any(1))
        else:
            out.append(relevance_in_rank_order(sc, pos, ties)[:, :k].any(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.bool)


def average_precision_at_k(
    scores: torch.Tensor, positives: torch.Tensor, k: int = 10, ties: str = "index"
) -> torch.Tensor:
    """Q float64: AP@k = (1 / min(k, n_pos)) · Σ_{r ≤ k, item r positive} precision@r."""
    positives = torch.as_tensor(positives, dtype=torch.bool)
    rank_ties = "index" if ties == "topk" else ties
    out = []
    for s in range(0, len(scores), _CHUNK):
        pos = positives[s : s + _CHUNK]
        rel = relevance_in_rank_order(scores[s : s + _CHUNK], pos, rank_ties)[:, :k].double()
        prec = rel.cumsum(1) / torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
        n_pos = pos.sum(1).clamp(max=k).double()
        out.append((prec * rel).sum(1) / n_pos.clamp(min=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def retrieval_metrics(
    scores: torch.Tensor,
    positives: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    ties: str = "topk",
) -> dict[str, float]:
    """R@K for each K, median rank, MRR and mAP@map_k of one retrieval direction (queries = rows)."""
    scores = torch.as_tensor(scores).float()
    positives = torch.as_tensor(positives, dtype=torch.bool)
    rank_ties = "index" if ties == "topk" else ties
    ranks = first_positive_rank(scores, positives, rank_ties)
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = float(topk_hits(scores, positives, k, ties).double().mean())
    r = ranks.double().numpy()
    out["median_rank"] = float(np.median(r))
    out["MRR"] = float(np.mean(1.0 / r))
    out[f"mAP@{map_k}"] = float(average_precision_at_k(scores, positives, map_k, rank_ties).mean())
    return out


def topk_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5), ties: str = "topk"
) -> dict[int, float]:
    """Share of rows whose target class is in the top-k logits (CLIP_benchmark's `accuracy` for "topk")."""
    logits = torch.as_tensor(logits).float()
    targets = torch.as_tensor(targets, dtype=torch.long)
    pos = torch.zeros_like(logits, dtype=torch.bool)
    pos[torch.arange(len(targets)), targets] = True
    return {k: float(topk_hits(logits, pos, k, ties).double().mean()) for k in ks}


def mean_per_class_recall(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over classes present in `target` of the share of that class's items predicted correctly
    (= sklearn's balanced_accuracy_score)."""
    pred, target = np.asarray(pred), np.asarray(target)
    recalls = [float(np.mean(pred[target == c] == c)) for c in np.unique(target)]
    return float(np.mean(recalls)) if recalls else float("nan")


# -- hubness ---------------------------------------------------------------------------------------
def topk_indices(scores: torch.Tensor, k: int, ties: str = "index") -> torch.Tensor:
    """Q×k gallery indices of each query's top-k ("topk": torch.topk; otherwise stable index order)."""
    _check_ties(ties)
    k = min(k, scores.shape[1])
    out = []
    for s in range(0, len(scores), _CHUNK):
        sc = scores[s : s + _CHUNK]
        if ties == "topk":
            out.append(torch.topk(sc, k, dim=1)[1])
        else:
            out.append(torch.sort(sc, dim=1, descending=True, stable=True)[1][:, :k])
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def k_occurrence(scores: torch.Tensor, k: int = 10, ties: str = "index") -> np.ndarray:
    """N_k: for each gallery item (column), how many queries (rows) have it among their top-k."""
    idx = topk_indices(torch.as_tensor(scores).float(), k, ties)
    return np.bincount(idx.reshape(-1).numpy(), minlength=scores.shape[1])


def skewness(x: np.ndarray) -> float:
    """Sample skewness m3 / m2^1.5 (biased; = scipy.stats.skew(x)); 0.0 when x is constant."""
    x = np.asarray(x, dtype=np.float64)
    d = x - x.mean()
    m2 = np.mean(d**2)
    if m2 <= 1e-300:
        return 0.0
    return float(np.mean(d**3) / m2**1.5)


def hubness_stats(scores: torch.Tensor, k: int = 10, ties: str = "index") -> dict[str, float]:
    """k-occurrence skewness, anti-hub share (N_k = 0) and the largest N_k over the gallery (columns)."""
    nk = k_occurrence(scores, k, ties)
    return {
        "skewness": skewness(nk),
        "antihub_share": float(np.mean(nk == 0)),
        "max_occurrence": int(nk.max()) if len(nk) else 0,
    }


# -- geometry ---------------------------------------------------------------------------------------
def modality_gap(img: torch.Tensor, txt: torch.Tensor) -> float:
    """‖mean(img) − mean(txt)‖₂ (Liang et al. 2022)."""
    return float((img.double().mean(0) - txt.double().mean(0)).norm())


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola: E over positive pairs (x_i, y_i) of ‖x_i − y_i‖₂^alpha."""
    return float((x.double() - y.double()).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola: log of the mean over distinct pairs i < j of exp(−t ‖x_i − x_j‖₂²)."""
    x = x.double()
    if len(x) < 2:
        return float("nan")
    return float(torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log())
