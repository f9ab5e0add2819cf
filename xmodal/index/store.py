"""`SearchIndex`: an index directory (DESIGN.md "Index directory") loaded for search, update and saving.

Layout of INDEX/ (everything row-aligned with meta.parquet):

    index.json         model, dim, kind, normalisation, created, count, image_size, params, banks, files
    meta.parquet       one row per item: id, path, caption, captions, label, lang, extra columns
    vectors.npy        float32 N×D L2-normalised embeddings (exact re-ranking, add, delete, rebuilds)
    ann.faiss          the FAISS index (float kinds) — or ann.faissb + binary.npz for binary codes
    thumbs.bin/.npy    JPEG thumbnails (one blob + offsets), served by /thumb/{id}
    captions.npy/.parquet   optional caption gallery (text embeddings) for image→text search
    bank_text.npy, bank_image.npy    query/gallery banks for hubness correction
    bank_lse.npy, bank_hubs.npy      per item: log Σ_b exp(β⟨b,g⟩) and "is a bank top-1" per bank
    vectors_invgc.npy  gallery vectors after InvGC/LocalAdj, when enabled

The class is composed from one mixin per concern, each in its own module: `ann` (FAISS construction and
parameters), `folding` (banks, InvGC, the folded hubness columns), `search`, `mutation` (add/delete) and
`persist` (save, `open_index`), `upgrade` (a new model's queries on the old gallery, backfill);
`meta` and `thumbs` hold the metadata table and thumbnail helpers.
None of them imports torch: only the model (`xmodal.index.model`, for text/image queries) does, lazily.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from xmodal.errors import UserError
from xmodal.index.ann import (
    KINDS,
    PAD,
    AnnMixin,
    auto_params,
    effective_kind,
    is_exact,
    l2n,
    new_float_index,
    set_search_params,
)
from xmodal.index.binary import BinaryCoder
from xmodal.index.folding import BANKS, DEFAULT_BETA, NORMS, FoldingMixin
from xmodal.index.meta import FORMAT, concat_meta, jsonable, new_info, now, row_dict, rows_to_table
from xmodal.index.mutation import MutationMixin
from xmodal.index.persist import PersistMixin, open_index
from xmodal.index.search import SearchMixin
from xmodal.index.thumbs import Thumbs
from xmodal.index.upgrade import UpgradeMixin

__all__ = [
    "BANKS",
    "DEFAULT_BETA",
    "FORMAT",
    "KINDS",
    "NORMS",
    "PAD",
    "SearchIndex",
    "Thumbs",
    "auto_params",
    "concat_meta",
    "effective_kind",
    "is_exact",
    "jsonable",
    "l2n",
    "new_float_index",
    "new_info",
    "now",
    "open_index",
    "rows_to_table",
    "set_search_params",
]


class SearchIndex(SearchMixin, UpgradeMixin, MutationMixin, FoldingMixin, AnnMixin, PersistMixin):
    """An index directory in memory. Construct with `open_index(path)` or `build_index(...)`."""

    def __init__(
        self,
        info: dict[str, Any],
        meta: pa.Table,
        vectors: np.ndarray,
        *,
        path: Path | None = None,
        ann: Any = None,
        coder: BinaryCoder | None = None,
        thumbs: Thumbs | None = None,
        caption_vectors: np.ndarray | None = None,
        caption_meta: pa.Table | None = None,
        banks: dict[str, np.ndarray] | None = None,
        bank_lse: np.ndarray | None = None,
        bank_hubs: np.ndarray | None = None,
        invgc_vectors: np.ndarray | None = None,
        encoder: Any = None,
    ) -> None:
        self.info = info
        self.path = path
        self._meta = meta
        self.vectors = vectors
        self.ann = ann
        self.coder = coder
        self.thumbs = thumbs if thumbs is not None else Thumbs()
        self.caption_vectors = caption_vectors
        self.caption_meta = caption_meta
        self.banks: dict[str, np.ndarray] = banks or {}
        self.bank_lse = bank_lse
        self.bank_hubs = bank_hubs
        self.invgc_vectors = invgc_vectors
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        self._cap_index: faiss.Index | None = None
        self._reindex_ids()

    @classmethod
    def from_vectors(
        cls,
        vectors: np.ndarray,
        ids: Sequence[str] | None = None,
        rows: Sequence[dict[str, Any]] | None = None,
        kind: str = "flat",
        *,
        encoder: Any = None,
        coder: Any = None,
        **options: Any,
    ) -> SearchIndex:
        """An in-memory index over precomputed embeddings (N×D); `rows` adds metadata per item.
        options: rerank, bits, binary_method, binary_index, hnsw_m, ef_search, nlist, nprobe, seed;
        `coder`: a `LearnedCoder` for kind learned-binary. `.save(path)` persists it."""
        vectors = l2n(vectors)
        n = len(vectors)
        ids = [str(i) for i in (ids if ids is not None else range(n))]
        if len(set(ids)) != n:
            raise UserError("ids must be unique")
        meta_rows = [
            {"id": i, **{k: v for k, v in (rows[j] if rows else {}).items() if k != "id"}}
            for j, i in enumerate(ids)
        ]
        info = new_info(kind, vectors.shape[1], options, image_size=getattr(encoder, "image_size", None))
        info["count"] = n
        idx = cls(info, rows_to_table(meta_rows), vectors, coder=coder, encoder=encoder)
        idx.thumbs.extend([None] * n)
        idx.rebuild_ann()
        return idx

    # -- basic properties ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._meta.num_rows

    @property
    def meta(self) -> pa.Table:
        return self._meta

    @property
    def ids(self) -> list[str]:
        return self._ids

    @property
    def kind(self) -> str:
        return self.info["effective_kind"]

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def gallery(self) -> np.ndarray:
        """The vectors searched: InvGC-adjusted ones when InvGC is on, else the plain embeddings."""
        return self.invgc_vectors if self.invgc_vectors is not None else self.vectors

    def _reindex_ids(self) -> None:
        self._ids = [str(x) for x in self._meta.column("id").to_pylist()] if self._meta.num_rows else []
        self._row = {k: i for i, k in enumerate(self._ids)}

    def row_of(self, item_id: str) -> int | None:
        return self._row.get(item_id)

    def item(self, item_id: str) -> dict[str, Any] | None:
        """The metadata row of an indexed item, or None for an unknown id."""
        i = self._row.get(item_id)
        return None if i is None else row_dict(self._meta, i)

    def thumbnail(self, item_id: str) -> bytes | None:
        i = self._row.get(item_id)
        return None if i is None or i >= len(self.thumbs) else self.thumbs.get(i)

    # -- the model ----------------------------------------------------------------------------------
    @property
    def encoder(self) -> Any:
        """The embedding model recorded in index.json, loaded on first use (text/image queries need it)
        and only through the safe loaders of `xmodal.index.model`."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    from xmodal.index.model import load_recorded_encoder

                    where = (self.path / "index.json") if self.path is not None else "the index"
                    self._encoder = load_recorded_encoder(self.info, where)
        return self._encoder

    @encoder.setter
    def encoder(self, enc: Any) -> None:
        self._encoder = enc
