"""Hash-code retrieval metrics, as the deep-hashing literature computes them.

Codes are ±1 matrices (n×c); the Hamming distance of two codes is (c − ⟨a, b⟩) / 2. An item is relevant to
a query when they share at least one label (single-label data: the same label).

* **mAP@K** (DeepHash's `CalcTopMap`, used by DCMH, DPSH, HashNet and most later papers): rank the database
  by Hamming distance (ties by database order: a stable sort); for query q with R_q relevant items among its
  top K at ranks r_1 < … < r_R, AP@K(q) = (1/R_q) Σ_m m / r_m, and AP@K(q) = 0 when R_q = 0; mAP@K is the
  mean over all queries (those without a relevant item in the top K count as 0).
* **Precision within Hamming radius r** (r = 2 by convention): the share of relevant items among those at
  distance ≤ r; a query that retrieves nothing scores 0.
* **Precision–recall by radius**: for each r = 0 … c, precision and recall of the items within distance r,
  both averaged over queries (a query with nothing retrieved has precision 0; recall counts every relevant
  item of the database).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def hamming(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Hamming distances (nq × nd, int) between ±1 code matrices."""
    q, d = np.asarray(queries, np.float32), np.asarray(database, np.float32)
    return np.rint((q.shape[1] - q @ d.T) / 2).astype(np.int64)


def relevance(query_labels: Sequence, db_labels: Sequence) -> np.ndarray:
    """nq × nd bool: the items sharing at least one label. A label is a value or a collection of values."""

    def as_set(x) -> frozenset:
        return frozenset(x) if isinstance(x, (list, tuple, set, frozenset)) else frozenset([x])

    db = [as_set(x) for x in db_labels]
    return np.array([[bool(as_set(q) & d) for d in db] for q in query_labels], dtype=bool)


def map_at_k(dist: np.ndarray, rel: np.ndarray, k: int | None = None) -> float:
    """DeepHash's mAP@K from the distances and the relevance matrix (k None: the whole database)."""
    nq, nd = dist.shape
    k = nd if k is None else min(k, nd)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(rel, order, axis=1)  # nq × k
    ranks = np.arange(1, k + 1)
    found = hits.cumsum(axis=1)
    n_rel = hits.sum(axis=1)
    ap = np.where(n_rel > 0, (hits * found / ranks).sum(axis=1) / np.maximum(n_rel, 1), 0.0)
    return float(ap.mean()) if nq else 0.0


def precision_within(dist: np.ndarray, rel: np.ndarray, radius: int = 2) -> float:
    """Mean over queries of the relevant share of the items within `radius` (0 when none)."""
    inside = dist <= radius
    n = inside.sum(axis=1)
    prec = np.where(n > 0, (inside & rel).sum(axis=1) / np.maximum(n, 1), 0.0)
    return float(prec.mean()) if len(prec) else 0.0


def pr_by_radius(dist: np.ndarray, rel: np.ndarray, bits: int) -> dict[str, list[float]]:
    """Precision and recall of the items within each radius 0…bits, averaged over queries."""
    total_rel = np.maximum(rel.sum(axis=1), 1)
    precision, recall = [], []
    for r in range(bits + 1):
        inside = dist <= r
        n = inside.sum(axis=1)
        good = (inside & rel).sum(axis=1)
        precision.append(float(np.where(n > 0, good / np.maximum(n, 1), 0.0).mean()))
        recall.append(float((good / total_rel).mean()))
    return {"radius": list(range(bits + 1)), "precision": precision, "recall": recall}


def hashing_metrics(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: Sequence,
    db_labels: Sequence,
    ks: Sequence[int] = (100,),
    radius: int = 2,
) -> dict:
    """mAP@K for each K, precision within `radius` and the precision–recall curve by radius."""
    dist = hamming(query_codes, db_codes)
    rel = relevance(query_labels, db_labels)
    bits = int(np.asarray(query_codes).shape[1])
    out = {f"mAP@{k}": map_at_k(dist, rel, k) for k in ks}
    out[f"P@H<={radius}"] = precision_within(dist, rel, radius)
    out["pr_curve"] = pr_by_radius(dist, rel, bits)
    out["bits"] = bits
    return out


# -- the `hashing` task of `xmodal eval` ----------------------------------------------------------------


def unavailable(ctx: Any) -> str | None:
    if not any(x is not None for x in ctx.labels):
        return "hash retrieval is scored by shared labels (mAP@K); the data has none (--label-key)"
    if ctx.cache.n_images < 2:
        return "hashing needs at least 2 images"
    return None


def run(ctx: Any) -> dict:
    """Text → image and image → text retrieval by Hamming distance, relevance = shared label: the model's
    hash heads (a run of `xmodal hash train`) when it has them, and ITQ / LSH codes of the same embeddings
    at each of `hash_bits` (fitted on this test set's images, as `index build --kind binary` fits on its
    gallery), with the memory per item."""
    import torch

    from xmodal.index.binary import fit_binary

    opts = ctx.options
    img = ctx.cache.images.numpy()
    txt = ctx.cache.caption_embs.numpy()
    owner = ctx.cache.caption_image.numpy()
    labels = ctx.labels
    keep = np.array([x is not None for x in labels])
    img_l = [labels[i] for i in np.flatnonzero(keep)]
    t_keep = keep[owner]
    txt_l = [labels[i] for i in owner[t_keep]]

    def score(img_codes: np.ndarray, txt_codes: np.ndarray, bits: int) -> dict:
        t2i = hashing_metrics(txt_codes[t_keep], img_codes[keep], txt_l, img_l, (opts.hash_k,))
        i2t = hashing_metrics(img_codes[keep], txt_codes[t_keep], img_l, txt_l, (opts.hash_k,))
        for d in (t2i, i2t):
            d.pop("bits")
        return {"t2i": t2i, "i2t": i2t, "bits": bits, "bytes_per_item": bits // 8}

    def pm1(packed_fn, x: np.ndarray, bits: int) -> np.ndarray:
        unpacked = np.unpackbits(packed_fn(x), axis=1, bitorder="little")[:, :bits]
        return unpacked.astype(np.float32) * 2 - 1

    out: dict[str, Any] = {"k": opts.hash_k, "float_bytes_per_item": int(img.shape[1]) * 4, "methods": {}}
    heads = getattr(getattr(ctx.encoder, "model", None), "hash_heads", None)
    if heads is not None:
        with torch.no_grad():
            ic = heads.codes(torch.from_numpy(img), "image").numpy()
            tc = heads.codes(torch.from_numpy(txt), "text").numpy()
        out["methods"]["learned"] = score(ic, tc, heads.total_bits)
    for method in ("itq", "lsh"):
        for bits in opts.hash_bits:
            coder = fit_binary(img, bits=bits, method=method, seed=opts.seed)
            out["methods"][f"{method}-{bits}"] = score(
                pm1(coder.encode, img, bits), pm1(coder.encode, txt, bits), bits
            )
    return out
