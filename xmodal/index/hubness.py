"""Hubness correction for cross-modal retrieval, as pure numpy functions (used by the index and by eval).

A *hub* is a gallery item that is the nearest neighbour of many queries. The methods here re-score
query–gallery similarities with the help of *banks* — embeddings of sample queries (e.g. training
captions) and/or sample gallery items (e.g. training images):

- QB-Norm (Bogolin et al., CVPR 2022), inverted softmax (IS):
  ``IS(q, g) = exp(β s(q,g)) / Σ_{b∈B} exp(β s(b,g))`` with B a *query* bank.
- QB-Norm's dynamic inverted softmax (DIS): the activation set A holds the gallery items that are the
  top-k (k=1) result of some bank query; a query row is renormalised with IS only when the query's own
  top-1 gallery item is in A, otherwise it keeps ``exp(β s)`` (official code: ioanacroi/qb-norm).
- DBNorm (Wang, Jian & Xue, EMNLP 2023 "Balance Act"), dual inverted softmax:
  ``IS_Bq(q, g; β_q) · IS_Bg(q, g; β_g)`` where the second factor normalises by a *gallery* bank Bg
  (similarities between bank gallery items and the gallery item, intra-modal). Its dynamic form
  multiplies two DIS factors, each with its own activation set.
- InvGC / LocalAdj (Jian & Wang, Findings of EMNLP 2023): moves each gallery vector away from its
  neighbours in the banks (inverse graph convolution) and re-normalises; a transform of the gallery
  vectors, so any index can store its output.

All functions take similarity matrices (rows = queries, columns = gallery items) unless named for
embeddings, and return the paper's values (``log=True``: their natural log, which is what the index
uses because it stays in range for any β).

Folding: the non-dynamic forms are ``β s(q,g) − c(g)`` in log space with an offset c(g) that depends
only on the gallery item, so an index can fold c(g) into one extra vector dimension and search the
corrected scores at plain-search speed (see ``bank_offsets`` and docs/search.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

METHODS = ("none", "qbnorm", "qbnorm-dynamic", "dbnorm", "dbnorm-dynamic", "invgc", "localadj")
INVGC_CHUNK = 4096  # gallery rows per InvGC block (memory only: results are the same for any value)


# -- building blocks ---------------------------------------------------------------------------------


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _chunked_columns(n: int, f: Callable[[slice], np.ndarray], chunk: int = 8192) -> np.ndarray:
    return np.concatenate([f(slice(i, min(i + chunk, n))) for i in range(0, n, chunk)]) if n else np.zeros(0)


def bank_offsets(bank: np.ndarray, gallery: np.ndarray, beta: float = 20.0, chunk: int = 8192) -> np.ndarray:
    """Per gallery item g: ``log Σ_b exp(β ⟨b, g⟩)`` (float64, shape G) — the inverted-softmax denominator
    in log space. Computed in column chunks so a large gallery never needs the whole B×G matrix."""
    bank = np.asarray(bank, dtype=np.float64)
    gallery = np.asarray(gallery, dtype=np.float64)
    if len(bank) == 0:
        raise ValueError("empty bank")
    return _chunked_columns(len(gallery), lambda s: _logsumexp(beta * (bank @ gallery[s].T), axis=0), chunk)


def activation_set(bank_sims: np.ndarray, k: int = 1) -> np.ndarray:
    """Boolean mask over gallery columns: True where the item is in the top-k of at least one bank row."""
    bank_sims = np.asarray(bank_sims)
    n = bank_sims.shape[1]
    k = max(1, min(int(k), n))
    mask = np.zeros(n, dtype=bool)
    if k == n:
        mask[:] = len(bank_sims) > 0
        return mask
    top = np.argmax(bank_sims, axis=1) if k == 1 else np.argpartition(-bank_sims, k - 1, axis=1)[:, :k]
    mask[np.ravel(top)] = True
    return mask


def hub_mask(bank: np.ndarray, gallery: np.ndarray, k: int = 1, chunk: int = 4096) -> np.ndarray:
    """The DIS activation set from embeddings: gallery items that are a top-k neighbour of some bank item."""
    bank = np.asarray(bank, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    mask = np.zeros(len(gallery), dtype=bool)
    k = max(1, min(int(k), len(gallery)))
    for i in range(0, len(bank), chunk):
        s = bank[i : i + chunk] @ gallery.T
        top = np.argmax(s, axis=1)[:, None] if k == 1 else np.argpartition(-s, k - 1, axis=1)[:, :k]
        mask[top.ravel()] = True
    return mask


# -- similarity normalisations (matrices) -----------------------------------------------------------


def inverted_softmax(
    sims: np.ndarray, bank_sims: np.ndarray, beta: float = 20.0, log: bool = False
) -> np.ndarray:
    """IS: ``exp(β S[q,g]) / Σ_b exp(β Bank[b,g])``. sims: Q×G, bank_sims: B×G."""
    sims = np.asarray(sims, dtype=np.float64)
    out = beta * sims - _logsumexp(beta * np.asarray(bank_sims, dtype=np.float64), axis=0)[None, :]
    return out if log else np.exp(out)


def dynamic_inverted_softmax(
    sims: np.ndarray, bank_sims: np.ndarray, beta: float = 20.0, k: int = 1, log: bool = False
) -> np.ndarray:
    """DIS: rows whose top-1 gallery item is in the bank's activation set get IS, the rest ``exp(β S)``."""
    sims = np.asarray(sims, dtype=np.float64)
    active = activation_set(bank_sims, k)
    rows = active[np.argmax(sims, axis=1)]
    offset = _logsumexp(beta * np.asarray(bank_sims, dtype=np.float64), axis=0)
    out = beta * sims - np.where(rows[:, None], offset[None, :], 0.0)
    return out if log else np.exp(out)


def qb_norm(
    sims: np.ndarray,
    bank_sims: np.ndarray,
    beta: float = 20.0,
    dynamic: bool = True,
    k: int = 1,
    log: bool = False,
) -> np.ndarray:
    """QB-Norm with a query bank: DIS (the paper's default) or plain IS (``dynamic=False``)."""
    if dynamic:
        return dynamic_inverted_softmax(sims, bank_sims, beta=beta, k=k, log=log)
    return inverted_softmax(sims, bank_sims, beta=beta, log=log)


def db_norm(
    sims: np.ndarray,
    query_bank_sims: np.ndarray,
    gallery_bank_sims: np.ndarray,
    beta_q: float = 20.0,
    beta_g: float = 20.0,
    dynamic: bool = False,
    k: int = 1,
    log: bool = False,
) -> np.ndarray:
    """DBNorm: product of a query-bank factor and a gallery-bank factor (dual IS, or dual DIS when dynamic).

    query_bank_sims: Bq×G similarities of bank *queries* to the gallery (cross-modal);
    gallery_bank_sims: Bg×G similarities of bank *gallery items* to the gallery (same modality)."""
    f = dynamic_inverted_softmax if dynamic else inverted_softmax
    kw = {"k": k} if dynamic else {}
    out = f(sims, query_bank_sims, beta=beta_q, log=True, **kw) + f(
        sims, gallery_bank_sims, beta=beta_g, log=True, **kw
    )
    return out if log else np.exp(out)


# -- gallery transforms (embeddings) ----------------------------------------------------------------


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _invgc_message(
    gallery: np.ndarray, bank: np.ndarray, r: float, local_adj: bool, pool_rate: float, mean_w: float
) -> np.ndarray:
    """One bank's InvGC message for a chunk of gallery rows. `mean_w` is the mean similarity over the whole
    gallery × bank (full InvGC centres its weights on it), so the result never depends on the chunk."""
    w = gallery @ bank.T  # G×B
    if local_adj:
        p = max(1, int(pool_rate * len(bank)))
        idx = (
            np.argpartition(-w, p - 1, axis=1)[:, :p]
            if p < len(bank)
            else np.tile(np.arange(len(bank)), (len(w), 1))
        )
        sparse = np.zeros_like(w)
        np.put_along_axis(sparse, idx, np.take_along_axis(w, idx, axis=1), axis=1)
        delta = -(sparse @ bank) / p * r
    else:
        delta = -((w - mean_w) @ bank) / len(bank) * r
    return _l2n(gallery + delta)


def invgc(
    gallery: np.ndarray,
    query_bank: np.ndarray | None = None,
    gallery_bank: np.ndarray | None = None,
    r_q: float = 0.1,
    r_g: float = 0.1,
    local_adj: bool = True,
    pool_rate: float = 0.01,
    chunk: int | None = None,
) -> np.ndarray:
    """InvGC (``local_adj=False``) or InvGC with LocalAdj on gallery embeddings (G×D) → new G×D,
    L2-normalised.

    Each gallery vector moves away from the (top ``pool_rate`` fraction of, with LocalAdj) bank vectors it
    is similar to, with rate r_q for the query bank and r_g for the gallery bank; with both banks the two
    messages are averaged, as in the official implementation. Full InvGC centres the weights on the mean
    similarity over the whole gallery and bank; `chunk` (default INVGC_CHUNK) only bounds memory."""
    if query_bank is None and gallery_bank is None:
        raise ValueError("invgc needs a query bank, a gallery bank, or both")
    gallery = np.asarray(gallery, dtype=np.float64)
    chunk = int(chunk or INVGC_CHUNK)
    banks = [
        (np.asarray(b, np.float64), r) for b, r in ((gallery_bank, r_g), (query_bank, r_q)) if b is not None
    ]
    # mean over all G×B similarities without the G×B matrix: mean⟨g,b⟩ = ⟨Σg, Σb⟩ / (G·B)
    means = [float(gallery.sum(0) @ b.sum(0)) / max(len(gallery) * len(b), 1) for b, _ in banks]
    out = np.empty_like(gallery)
    for i in range(0, len(gallery), chunk):
        g = gallery[i : i + chunk]
        msgs = [
            _invgc_message(g, b, r, local_adj, pool_rate, m) for (b, r), m in zip(banks, means, strict=True)
        ]
        out[i : i + chunk] = _l2n(sum(msgs) / len(msgs))
    return out.astype(np.float32)


# -- one entry point for eval -----------------------------------------------------------------------


def corrected_similarities(
    queries: np.ndarray,
    gallery: np.ndarray,
    method: str = "none",
    *,
    query_bank: np.ndarray | None = None,
    gallery_bank: np.ndarray | None = None,
    beta: float = 20.0,
    beta_g: float = 20.0,
    k: int = 1,
    r_q: float = 0.1,
    r_g: float = 0.1,
    pool_rate: float = 0.01,
    log: bool = True,
) -> np.ndarray:
    """Q×G similarity matrix after hubness correction `method` (one of METHODS), from L2-normalised
    embeddings.

    query_bank: embeddings in the *query* modality (e.g. training captions for text→image);
    gallery_bank: embeddings in the *gallery* modality (e.g. training images), needed by DBNorm;
    InvGC/LocalAdj use whichever banks are given. Rankings are what matter; scores are log-space by
    default."""
    queries = np.asarray(queries, dtype=np.float64)
    gallery = np.asarray(gallery, dtype=np.float64)
    if method not in METHODS:
        raise ValueError(f"unknown hubness method {method!r}; use one of {', '.join(METHODS)}")
    if method == "none":
        return queries @ gallery.T
    if method in ("invgc", "localadj"):
        g2 = invgc(
            gallery,
            query_bank,
            gallery_bank,
            r_q=r_q,
            r_g=r_g,
            local_adj=method == "localadj",
            pool_rate=pool_rate,
        )
        return queries @ g2.astype(np.float64).T
    if query_bank is None:
        raise ValueError(f"{method} needs a query bank")
    sims = queries @ gallery.T
    qb = np.asarray(query_bank, np.float64) @ gallery.T
    if method.startswith("qbnorm"):
        return qb_norm(sims, qb, beta=beta, dynamic=method.endswith("dynamic"), k=k, log=log)
    if gallery_bank is None:
        raise ValueError(f"{method} needs a gallery bank too")
    gb = np.asarray(gallery_bank, np.float64) @ gallery.T
    return db_norm(sims, qb, gb, beta_q=beta, beta_g=beta_g, dynamic=method.endswith("dynamic"), k=k, log=log)
