"""Search: the `SearchMixin` part of `SearchIndex` — ANN candidates, exact re-ranking, hubness-corrected
scores, text/image/caption queries (the model loads lazily, only for text or image queries), and their
optional ITM re-ranking (`xmodal.index.rerank`, imported only when asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from xmodal.errors import UserError
from xmodal.index.ann import BINARY_KINDS, is_exact, l2n, set_search_params
from xmodal.index.meta import row_dict

IMAGE_TO_IMAGE_RERANK = (
    "--rerank: image → image search cannot be ITM re-ranked (the ITM head scores a caption against an "
    "image); use a text query, or --captions to re-rank the caption gallery"
)


def _check_depth(rerank: int) -> None:
    if rerank < 0:
        raise UserError(f"--rerank {rerank}: must be 0 (off) or more")


class SearchMixin:
    """Queries against a `SearchIndex`."""

    def _score(self, q: np.ndarray, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Exact corrected scores ⟨q,g⟩ + Σ_j w_j u_j(g) for candidate rows (Q×n; −1 = none)."""
        safe = np.maximum(rows, 0)
        g = self.gallery[safe.ravel()].reshape(*rows.shape, self.dim)
        s = np.einsum("qnd,qd->qn", g, q, optimize=True)
        if w.shape[1] and w.any():
            cols = self._columns()[safe.ravel()].reshape(*rows.shape, -1)
            s = s + np.einsum("qne,qe->qn", cols, w)
        return np.where(rows >= 0, s, -np.inf).astype(np.float32)

    def _search_raw(
        self, q: np.ndarray, k: int, w: np.ndarray, modality: str = "text"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by ⟨q,g⟩ + Σ w_j u_j(g): ANN candidates, then exact re-ranking by the float vectors."""
        n_items = len(self)
        k = min(k, n_items)
        kind, params = self.kind, self.info["params"]
        rerank = int(params.get("rerank", 0))
        exact = is_exact(kind)
        cand = k if exact or rerank <= 0 else min(n_items, max(k, rerank))
        binary = kind in BINARY_KINDS
        if binary and rerank > 0 and w.any():
            # Hamming codes cannot carry the hubness offset, so candidates come from the plain ranking and
            # only the re-ranking is corrected; a wider pool lets promoted non-hubs in.
            cand = min(n_items, 2 * cand)
        set_search_params(self.ann, kind, params, cand)
        if binary:  # learned codes: the query's own modality head (text → the text head)
            codes = self.coder.encode(q, modality) if kind == "learned-binary" else self.coder.encode(q)
            dist, rows = self.ann.search(codes, cand)
            rows = rows.astype(np.int64)
            if rerank > 0:
                scores = self._score(q, rows, w)
            else:  # Hamming estimate of the cosine, corrected by the bank columns
                est = 1.0 - 2.0 * dist.astype(np.float32) / params["bits"]
                if w.shape[1] and w.any():
                    cols = self._columns()[np.maximum(rows, 0).ravel()].reshape(*rows.shape, -1)
                    est = est + np.einsum("qne,qe->qn", cols, w)
                scores = np.where(rows >= 0, est, -np.inf).astype(np.float32)
        else:
            qx = np.zeros((len(q), self.ann_dim()), np.float32)
            qx[:, : self.dim] = q
            qx[:, self.dim : self.dim + w.shape[1]] = w
            scores, rows = self.ann.search(qx, cand)
            rows = rows.astype(np.int64)
            if not exact and rerank > 0:
                scores = self._score(q, rows, w)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)

    def search_rows(
        self, q: np.ndarray, k: int = 10, norm: str | None = None, modality: str = "text"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like `search_vectors` but returns row numbers (−1 where fewer than k items exist)."""
        q = l2n(q)
        if q.shape[1] != self.query_dim:
            what = "the query model gives" if self.query_model else "the index holds"
            raise UserError(f"query vectors are {q.shape[1]}-d but {what} {self.query_dim}-d vectors")
        if k < 1:
            raise UserError(f"k={k}: must be at least 1")
        if len(self) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.query_model:  # after `index upgrade`: the new model's queries (see xmodal.index.upgrade)
            view = self.backfill_view()
            if view is not None and view.count:
                if (norm or "none") != "none":
                    raise UserError(
                        f"--norm {norm}: the index is part-way through `xmodal index backfill` "
                        f"({view.count} of {len(self)} items re-embedded) and its hubness banks are the old "
                        "model's; search with --norm none until the backfill finishes"
                    )
                return self._merged_rows(q, k, modality, view)
            q = self.to_gallery(q, modality)
        factors = self._factors(norm or "none", modality)
        e = len(self.bank_names)
        zero = np.zeros((len(q), e), np.float32)
        if not factors:
            return self._search_raw(q, k, zero, modality)
        beta_tot = sum(b for _, b in factors)
        means = np.array([self.info["banks"][b]["offset_mean"] for b in self.bank_names])
        active = np.ones((len(q), len(factors)), dtype=bool)
        if norm.endswith("dynamic"):
            # DIS: a factor applies to a query only if the query's plain top-1 is in that bank's
            # activation set.
            s0, r0 = self._search_raw(q, k, zero, modality)
            top1 = r0[:, 0]
            for f, (col, _) in enumerate(factors):
                active[:, f] = self.bank_hubs[top1, col]
        w = np.zeros((len(q), e), np.float32)
        shift = np.zeros(len(q))
        for f, (col, beta) in enumerate(factors):
            w[:, col] += active[:, f] * (beta / beta_tot)
            shift += active[:, f] * means[col]
        scores = np.zeros((len(q), min(k, len(self))), np.float32)
        rows = np.zeros(scores.shape, np.int64)
        need = active.any(axis=1)
        if norm.endswith("dynamic") and (~need).any():
            scores[~need], rows[~need] = s0[~need], r0[~need]
        if need.any():
            scores[need], rows[need] = self._search_raw(q[need], k, w[need], modality)
        # Back to the log-space value of the (dual/dynamic) inverted softmax.
        out = beta_tot * scores.astype(np.float64) - shift[:, None]
        return np.where(rows >= 0, out, -np.inf).astype(np.float32), rows

    def search_vectors(
        self, q: np.ndarray, k: int = 10, norm: str | None = None, modality: str = "text"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search with query embeddings q (Q×D, or D). Returns (scores Q×k float32, ids Q×k object array).

        norm: none | qbnorm | qbnorm-dynamic | dbnorm | dbnorm-dynamic; modality: the query's modality
        ("text" or "image"), which picks the query bank. Scores are cosine similarities without a norm,
        else the log of the normalised score (β·s − log Σ_b exp(β⟨b,g⟩) …)."""
        scores, rows = self.search_rows(q, k, norm, modality)
        ids = np.empty(rows.shape, dtype=object)
        for (i, j), r in np.ndenumerate(rows):
            ids[i, j] = self._ids[r] if r >= 0 else None
        return scores, ids

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """One query's results as dicts: rank, id, score and the item's metadata."""
        out = []
        for rank, (s, r) in enumerate(zip(scores, rows, strict=True), start=1):
            if r < 0:
                continue
            hit = {"rank": rank, "score": float(s), **row_dict(self._meta, r)}
            if (by := self.embedded_by(r)) is not None:
                hit["embedded_by"] = by
            out.append(hit)
        return out

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Query embeddings by the query model (after `index upgrade` the new one; `search_rows` maps them
        onto the gallery)."""
        return self.query_encoder.encode_texts(list(texts)).numpy()

    def embed_image(self, image: Any) -> np.ndarray:
        """PIL image (or uint8 3×S×S tensor) → 1×D embedding, preprocessed like the indexed items."""
        import torch

        from xmodal.data import resize_center_crop

        enc = self.query_encoder
        if isinstance(image, torch.Tensor):
            x = image if image.ndim == 4 else image[None]
        else:
            x = resize_center_crop(image.convert("RGB"), enc.image_size)[None]
        return enc.encode_images(x).numpy()

    def search_text(
        self, text: str, k: int = 10, norm: str | None = None, rerank: int = 0
    ) -> list[dict[str, Any]]:
        """Text → images. rerank=N re-scores the top N candidates with the model's ITM (fusion) head and
        orders them by its match log-odds (`itm`; see `xmodal.index.rerank`)."""
        if not text or not text.strip():
            raise UserError("empty query")
        _check_depth(rerank)
        self._factors(norm or "none", "text")  # a bad --norm fails before the model loads
        if rerank:
            from xmodal.index.rerank import check_fusion

            check_fusion(self.encoder)  # before any search: a model without the head is one clear line
        s, r = self.search_rows(self.embed_text([text]), max(k, rerank), norm, "text")
        hits = self.hits(s[0], r[0])
        if not rerank:
            return hits
        return self.rerank_images(text, hits, rerank, k)[0]

    def rerank_images(
        self, text: str, hits: list[dict[str, Any]], depth: int, k: int, log: Any = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Re-rank text → image `hits` (at least min(depth, k) of them, from `hits`/`search_text`) by ITM:
        (top k hits, {"depth", "scored", "skipped": [ids]}). Unreadable images are skipped with a warning
        through `log` (default: a line on stderr)."""
        from xmodal.index import rerank as rr

        return rr.rerank_images(self, text, hits, depth, k, **({"log": log} if log else {}))

    def search_image(
        self, image: Any, k: int = 10, norm: str | None = None, rerank: int = 0
    ) -> list[dict[str, Any]]:
        """Image → images (a PIL image, or a uint8 tensor at the model's size)."""
        if rerank:
            raise UserError(IMAGE_TO_IMAGE_RERANK)
        self._factors(norm or "none", "image")
        s, r = self.search_rows(self.embed_image(image), k, norm, "image")
        return self.hits(s[0], r[0])

    @property
    def has_captions(self) -> bool:
        return self.caption_vectors is not None and len(self.caption_vectors) > 0

    def search_captions(self, query: Any, k: int = 10, rerank: int = 0) -> list[dict[str, Any]]:
        """Image → text over the caption gallery (exact inner product). query: PIL image or D-vector(s).
        rerank=N (image queries only) re-scores the top N captions with the model's ITM head."""
        if not self.has_captions:
            raise UserError(f"{self.path}: the index has no caption gallery; build it with --caption-gallery")
        _check_depth(rerank)
        if rerank:
            if isinstance(query, np.ndarray):
                raise UserError("--rerank: ITM re-ranking needs the query image, not its embedding")
            from xmodal.index.rerank import check_fusion

            check_fusion(self.encoder)
        hits = self._caption_hits(query, max(k, rerank))
        if not rerank:
            return hits
        return self.rerank_captions(query, hits, rerank, k)[0]

    def rerank_captions(
        self, image: Any, hits: list[dict[str, Any]], depth: int, k: int
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Re-rank image → caption `hits` by ITM against the query image (PIL or uint8 tensor)."""
        from xmodal.index import rerank as rr

        return rr.rerank_captions(self, image, hits, depth, k)

    def _caption_hits(self, query: Any, k: int) -> list[dict[str, Any]]:
        q = query if isinstance(query, np.ndarray) else self.embed_image(query)
        q = self.to_gallery(q, "image")  # the caption gallery stays the old model's until a backfill ends
        if self._cap_index is None:
            idx = faiss.IndexFlatIP(self.dim)
            idx.add(np.ascontiguousarray(self.caption_vectors, dtype=np.float32))
            self._cap_index = idx
        scores, rows = self._cap_index.search(q[:1], min(k, len(self.caption_vectors)))
        out = []
        ids = self.caption_meta.column("id").to_pylist()
        texts = self.caption_meta.column("caption").to_pylist()
        # `index build --captions generate`: an item whose caption the model made has only that caption
        flags = (
            self._meta.column("caption_generated").to_pylist()
            if "caption_generated" in self._meta.schema.names
            else None
        )
        for rank, (s, r) in enumerate(zip(scores[0], rows[0], strict=True), start=1):
            if r >= 0:
                hit = {"rank": rank, "score": float(s), "id": ids[r], "caption": texts[r]}
                if flags is not None:
                    row = self.row_of(ids[r])
                    hit["caption_generated"] = bool(row is not None and flags[row])
                out.append(hit)
        return out
