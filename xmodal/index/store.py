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

Hubness folding: for each bank j the ANN vectors carry one extra column u_j(g) = −(lse_j(g) − m_j)/β_j
(m_j a constant: the centring keeps the column small so graph/cluster construction is unaffected). A query
[q, w] then scores ⟨q,g⟩ + Σ w_j u_j(g), which ranks exactly like the inverted softmax in log space when
w_j = β_j/Σβ; w = 0 gives plain search from the same index. See docs/search.md.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal import fsutil
from xmodal.errors import UserError
from xmodal.index import hubness
from xmodal.index.binary import BinaryCoder, fit_binary

FORMAT = 1
KINDS = ("flat", "hnsw", "ivfpq", "binary")
BANKS = ("text", "image")
NORMS = ("none", "qbnorm", "qbnorm-dynamic", "dbnorm", "dbnorm-dynamic")
DEFAULT_BETA = 20.0
PAD = 8  # ANN vector width is padded to a multiple of this (PQ sub-vectors of 8 dims)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- meta table helpers -------------------------------------------------------------------------------


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """List of dict rows → pyarrow table; columns whose values mix types are stored as strings."""
    if not rows:
        return pa.table({"id": pa.array([], pa.string())})
    cols: dict[str, list] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, [])
    for k in cols:
        cols[k] = [r.get(k) for r in rows]
    arrays = {}
    for k, vals in cols.items():
        if k == "captions":
            arrays[k] = pa.array([list(v) if v is not None else [] for v in vals], pa.list_(pa.string()))
            continue
        try:
            arrays[k] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[k] = pa.array(
                [
                    None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                    for v in vals
                ],
                pa.string(),
            )
        if pa.types.is_null(arrays[k].type):
            arrays[k] = arrays[k].cast(pa.string())
    return pa.table(arrays)


def concat_meta(a: pa.Table, b: pa.Table) -> pa.Table:
    if a.num_rows == 0:
        return b
    try:
        return pa.concat_tables([a, b], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return rows_to_table(a.to_pylist() + b.to_pylist())


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# -- thumbnails ---------------------------------------------------------------------------------------


class Thumbs:
    """Thumbnails as (offset, length) into one blob file, plus in-memory ones not yet saved."""

    def __init__(self, blob: Path | None = None, index: np.ndarray | None = None) -> None:
        self.blob = blob
        self.entries: list[tuple[int, int] | bytes | None] = []
        if index is not None:
            self.entries = [(int(o), int(n)) if n > 0 else None for o, n in index]
        self._lock = threading.Lock()
        # Opened now, so a reader keeps the blob it was loaded with even if a writer swaps the folder later.
        self._fh = open(blob, "rb") if blob is not None and blob.is_file() else None  # noqa: SIM115

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, i: int) -> bytes | None:
        e = self.entries[i]
        if e is None or isinstance(e, bytes):
            return e
        off, n = e
        with self._lock:
            if self._fh is None:
                self._fh = open(self.blob, "rb")  # noqa: SIM115 - kept open for the server's lifetime
            self._fh.seek(off)
            return self._fh.read(n)

    def extend(self, items: Sequence[bytes | None]) -> None:
        self.entries.extend(items)

    def keep(self, mask: np.ndarray) -> None:
        self.entries = [e for e, k in zip(self.entries, mask, strict=True) if k]

    def write(self, folder: Path) -> None:
        idx = np.zeros((len(self.entries), 2), dtype=np.int64)
        off = 0
        with open(folder / "thumbs.bin", "wb") as f:
            for i in range(len(self.entries)):
                data = self.get(i)
                if data:
                    f.write(data)
                    idx[i] = (off, len(data))
                    off += len(data)
        np.save(folder / "thumbs.npy", idx)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self) -> None:
        self.close()


# -- ANN construction -----------------------------------------------------------------------------------


def auto_params(kind: str, n: int, dim: int, options: dict[str, Any]) -> dict[str, Any]:
    """Concrete index parameters for `kind` and n items (user options win over the defaults)."""
    p: dict[str, Any] = {"rerank": int(options.get("rerank", 100))}
    if kind == "hnsw":
        p.update(
            hnsw_m=int(options.get("hnsw_m") or 32),
            ef_construction=int(options.get("ef_construction") or 40),
            ef_search=int(options.get("ef_search") or 128),
        )
    elif kind == "ivfpq":
        nlist = options.get("nlist") or int(round(math.sqrt(max(n, 1))))
        nlist = max(1, min(int(nlist), max(1, n // 39), 65536))
        nprobe = options.get("nprobe") or max(min(nlist, 8), min(nlist // 4, 256))
        # 2^nbits centroids per sub-quantizer; FAISS wants ≥ 39 training points per centroid.
        nbits = max(1, min(8, int(math.log2(max(n, 2)))))  # small sets: codebooks nearly memorise the items
        p.update(nlist=nlist, nprobe=min(int(nprobe), nlist), pq_m=max(1, dim // PAD), pq_nbits=nbits)
    elif kind == "binary":
        p.update(bits=int(options.get("bits") or 256), binary_method=options.get("binary_method") or "itq")
    elif kind not in ("flat",):  # factory string
        if options.get("nprobe"):
            p["nprobe"] = int(options["nprobe"])
        if options.get("ef_search"):
            p["ef_search"] = int(options["ef_search"])
    return p


def effective_kind(kind: str, n: int) -> str:
    """IVF-PQ needs enough items to train a codebook; tiny collections fall back to exact search."""
    if kind == "ivfpq" and n < 64:
        return "flat"
    if kind == "binary" and n < 2:
        return "flat"
    return kind


def new_float_index(kind: str, dim: int, params: dict[str, Any]) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(dim, params["hnsw_m"], ip)
        idx.hnsw.efConstruction = params["ef_construction"]
        idx.hnsw.efSearch = params["ef_search"]
        return idx
    if kind == "ivfpq":
        quantizer = faiss.IndexFlatIP(dim)
        idx = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["pq_nbits"], ip)
        idx.own_fields = True
        quantizer.this.disown()
        idx.nprobe = params["nprobe"]
        idx.pq.cp.min_points_per_centroid = (
            1  # fewer than 39 points per code is fine here: silence the warning
        )
        return idx
    try:
        return faiss.index_factory(dim, kind, ip)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise UserError(
            f"--kind {kind!r}: FAISS cannot build this factory string for {dim}-d vectors ({first})"
        ) from e


def set_search_params(index: faiss.Index, kind: str, params: dict[str, Any], candidates: int) -> None:
    """Apply nprobe / efSearch (efSearch is raised to the candidate count so HNSW can return that many)."""
    if kind == "hnsw":
        index.hnsw.efSearch = max(params["ef_search"], candidates)
        return
    if kind == "ivfpq":
        index.nprobe = params["nprobe"]
        return
    if kind in ("flat", "binary"):
        return
    ps = faiss.ParameterSpace()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf.nprobe = params.get("nprobe") or max(1, min(ivf.nlist, max(8, ivf.nlist // 4)))
    if "HNSW" in kind:
        try:
            ps.set_index_parameter(index, "efSearch", max(params.get("ef_search", 128), candidates))
        except RuntimeError:
            pass


def is_exact(kind: str) -> bool:
    return kind == "flat" or kind.replace(" ", "") in ("Flat", "IDMap,Flat")


def new_info(
    kind: str,
    dim: int,
    options: dict[str, Any],
    *,
    image_size: int | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh index.json dict (params and counts are filled in when the ANN is built)."""
    opts = {
        "rerank": 100,
        "bits": 256,
        "binary_method": "itq",
        "hnsw_m": 32,
        "ef_search": None,
        "nlist": None,
        "nprobe": None,
        "seed": 0,
    }
    unknown = set(options) - set(opts)
    if unknown:
        raise TypeError(f"unknown index option(s): {', '.join(sorted(unknown))}")
    opts.update({k: v for k, v in options.items() if v is not None or k in ("ef_search", "nlist", "nprobe")})
    return {
        "format": FORMAT,
        "created": now(),
        "updated": now(),
        "model": model or {"name": None, "source": None, "pretrained": None},
        "dim": int(dim),
        "image_size": image_size,
        "kind": kind,
        "effective_kind": kind,
        "normalisation": "l2",
        "metric": "inner_product",
        "count": 0,
        "options": opts,
        "caption_gallery": False,
        "thumb_size": 0,
        "banks": {},
        "invgc": None,
    }


# -- the index ----------------------------------------------------------------------------------------


class SearchIndex:
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
        **options: Any,
    ) -> SearchIndex:
        """An in-memory index over precomputed embeddings (N×D); `rows` adds metadata per item.
        options: rerank, bits, binary_method, hnsw_m, ef_search, nlist, nprobe, seed.
        `.save(path)` persists it."""
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
        idx = cls(info, rows_to_table(meta_rows), vectors, encoder=encoder)
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

    @property
    def bank_names(self) -> list[str]:
        return [b for b in BANKS if b in self.info.get("banks", {})]

    def _reindex_ids(self) -> None:
        self._ids = [str(x) for x in self._meta.column("id").to_pylist()] if self._meta.num_rows else []
        self._row = {k: i for i, k in enumerate(self._ids)}

    def row_of(self, item_id: str) -> int | None:
        return self._row.get(item_id)

    def item(self, item_id: str) -> dict[str, Any] | None:
        """The metadata row of an indexed item, or None for an unknown id."""
        i = self._row.get(item_id)
        if i is None:
            return None
        return {k: _jsonable(v) for k, v in self._meta.slice(i, 1).to_pylist()[0].items()}

    def thumbnail(self, item_id: str) -> bytes | None:
        i = self._row.get(item_id)
        return None if i is None or i >= len(self.thumbs) else self.thumbs.get(i)

    # -- the model ----------------------------------------------------------------------------------
    @property
    def encoder(self) -> Any:
        """The embedding model recorded in index.json, loaded on first use (text/image queries need it)."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    from xmodal.models import load_encoder

                    m = self.info.get("model") or {}
                    if not m.get("source"):
                        raise UserError(
                            f"{self.path}: index.json records no model; pass --model to search by "
                            "text or image"
                        )
                    self._encoder = load_encoder(m["source"], m.get("pretrained"))
                    if self._encoder.dim != self.dim:
                        raise UserError(
                            f"{self.path}: model {m['source']} gives {self._encoder.dim}-d vectors "
                            f"but the index holds {self.dim}-d ones"
                        )
        return self._encoder

    @encoder.setter
    def encoder(self, enc: Any) -> None:
        self._encoder = enc

    # -- ANN build ----------------------------------------------------------------------------------
    def _columns(self) -> np.ndarray:
        """Per item: the centred, β-scaled bank offsets u_j(g) (N×E float32; E = number of banks)."""
        names = self.bank_names
        if not names or self.bank_lse is None:
            return np.zeros((len(self), 0), np.float32)
        cols = []
        for j, b in enumerate(names):
            cfg = self.info["banks"][b]
            cols.append(-(self.bank_lse[:, j] - cfg["offset_mean"]) / cfg["beta"])
        return np.stack(cols, axis=1).astype(np.float32)

    def ann_dim(self) -> int:
        e = len(self.bank_names)
        if e == 0 or self.kind == "binary":
            return self.dim
        return int(math.ceil((self.dim + e) / PAD) * PAD)

    def _ann_vectors(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        g = self.gallery if rows is None else self.gallery[rows]
        if self.ann_dim() == self.dim:
            return np.ascontiguousarray(g, dtype=np.float32)
        cols = self._columns() if rows is None else self._columns()[rows]
        out = np.zeros((len(g), self.ann_dim()), np.float32)
        out[:, : self.dim] = g
        out[:, self.dim : self.dim + cols.shape[1]] = cols
        return out

    def rebuild_ann(self) -> None:
        """(Re)train and fill the ANN structure from the current vectors and banks."""
        n = len(self)
        kind = effective_kind(self.info["kind"], n)
        self.info["effective_kind"] = kind
        self.info["params"] = auto_params(kind, n, self.ann_dim(), self.info.get("options", {}))
        params = self.info["params"]
        if kind == "binary":
            self.coder = fit_binary(
                self.gallery,
                bits=params["bits"],
                method=params["binary_method"],
                seed=int(self.info.get("options", {}).get("seed", 0)),
            )
            self.ann = faiss.IndexBinaryFlat(params["bits"])
            if n:
                self.ann.add(self.coder.encode(self.gallery))
            return
        self.coder = None
        x = self._ann_vectors()
        idx = new_float_index(kind, x.shape[1], params)
        if not idx.is_trained:
            if n == 0:
                raise UserError("cannot train an index on an empty collection")
            try:
                idx.train(x)
            except RuntimeError as e:
                raise UserError(
                    f"--kind {self.info['kind']}: training failed on {n} items "
                    f"({str(e).strip().splitlines()[-1][:200]})"
                ) from e
        if n:
            idx.add(x)
        self.ann = idx

    def _ann_add(self, rows: slice) -> None:
        if self.kind == "binary":
            self.ann.add(self.coder.encode(self.gallery[rows]))
        else:
            self.ann.add(self._ann_vectors(rows))

    # -- search -------------------------------------------------------------------------------------
    def available_norms(self, modality: str = "text") -> list[str]:
        banks = set(self.bank_names)
        out = ["none"]
        qb = "text" if modality == "text" else "image"
        if qb in banks:
            out += ["qbnorm", "qbnorm-dynamic"]
            if "image" in banks:
                out += ["dbnorm", "dbnorm-dynamic"]
        return out

    def _factors(self, norm: str, modality: str) -> list[tuple[int, float]]:
        """(bank column, β) of each inverted-softmax factor that `norm` multiplies together."""
        names = self.bank_names
        if norm in (None, "", "none"):
            return []
        if norm not in NORMS:
            raise UserError(f"--norm {norm}: use one of {', '.join(NORMS)}")
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be text or image, not {modality!r}")
        qbank = "text" if modality == "text" else "image"
        need = [qbank] + (["image"] if norm.startswith("dbnorm") else [])
        for b in need:
            if b not in names:
                how = "--texts FILE or --data MANIFEST" if b == "text" else "--data MANIFEST"
                raise UserError(
                    f"--norm {norm}: the index has no {b} bank; add one with "
                    f"`xmodal index bank {self.path or 'INDEX'} {how}`"
                )
        return [(names.index(b), float(self.info["banks"][b]["beta"])) for b in need]

    def _score(self, q: np.ndarray, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Exact corrected scores ⟨q,g⟩ + Σ_j w_j u_j(g) for candidate rows (Q×n; −1 = none)."""
        safe = np.maximum(rows, 0)
        g = self.gallery[safe.ravel()].reshape(*rows.shape, self.dim)
        s = np.einsum("qnd,qd->qn", g, q, optimize=True)
        if w.shape[1] and w.any():
            cols = self._columns()[safe.ravel()].reshape(*rows.shape, -1)
            s = s + np.einsum("qne,qe->qn", cols, w)
        return np.where(rows >= 0, s, -np.inf).astype(np.float32)

    def _search_raw(self, q: np.ndarray, k: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by ⟨q,g⟩ + Σ w_j u_j(g): ANN candidates, then exact re-ranking by the float vectors."""
        n_items = len(self)
        k = min(k, n_items)
        kind, params = self.kind, self.info["params"]
        rerank = int(params.get("rerank", 0))
        exact = is_exact(kind)
        cand = k if exact or rerank <= 0 else min(n_items, max(k, rerank))
        if kind == "binary" and rerank > 0 and w.any():
            # Hamming codes cannot carry the hubness offset, so candidates come from the plain ranking and
            # only the re-ranking is corrected; a wider pool lets promoted non-hubs in.
            cand = min(n_items, 2 * cand)
        set_search_params(self.ann, kind, params, cand)
        if kind == "binary":
            dist, rows = self.ann.search(self.coder.encode(q), cand)
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
        if q.shape[1] != self.dim:
            raise UserError(f"query vectors are {q.shape[1]}-d but the index holds {self.dim}-d vectors")
        if k < 1:
            raise UserError(f"k={k}: must be at least 1")
        if len(self) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        factors = self._factors(norm or "none", modality)
        e = len(self.bank_names)
        zero = np.zeros((len(q), e), np.float32)
        if not factors:
            return self._search_raw(q, k, zero)
        beta_tot = sum(b for _, b in factors)
        means = np.array([self.info["banks"][b]["offset_mean"] for b in self.bank_names])
        active = np.ones((len(q), len(factors)), dtype=bool)
        if norm.endswith("dynamic"):
            # DIS: a factor applies to a query only if the query's plain top-1 is in that bank's
            # activation set.
            s0, r0 = self._search_raw(q, k, zero)
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
            scores[need], rows[need] = self._search_raw(q[need], k, w[need])
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
            row = {k: _jsonable(v) for k, v in self._meta.slice(int(r), 1).to_pylist()[0].items()}
            out.append({"rank": rank, "score": float(s), **row})
        return out

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_texts(list(texts)).numpy()

    def embed_image(self, image: Any) -> np.ndarray:
        """PIL image (or uint8 3×S×S tensor) → 1×D embedding, preprocessed like the indexed items."""
        import torch

        from xmodal.data import resize_center_crop

        enc = self.encoder
        if isinstance(image, torch.Tensor):
            x = image if image.ndim == 4 else image[None]
        else:
            x = resize_center_crop(image.convert("RGB"), enc.image_size)[None]
        return enc.encode_images(x).numpy()

    def search_text(self, text: str, k: int = 10, norm: str | None = None) -> list[dict[str, Any]]:
        """Text → images."""
        if not text or not text.strip():
            raise UserError("empty query")
        self._factors(norm or "none", "text")  # a bad --norm fails before the model loads
        s, r = self.search_rows(self.embed_text([text]), k, norm, "text")
        return self.hits(s[0], r[0])

    def search_image(self, image: Any, k: int = 10, norm: str | None = None) -> list[dict[str, Any]]:
        """Image → images (a PIL image, or a uint8 tensor at the model's size)."""
        self._factors(norm or "none", "image")
        s, r = self.search_rows(self.embed_image(image), k, norm, "image")
        return self.hits(s[0], r[0])

    @property
    def has_captions(self) -> bool:
        return self.caption_vectors is not None and len(self.caption_vectors) > 0

    def search_captions(self, query: Any, k: int = 10) -> list[dict[str, Any]]:
        """Image → text over the caption gallery (exact inner product). query: PIL image or D-vector(s)."""
        if not self.has_captions:
            raise UserError(f"{self.path}: the index has no caption gallery; build it with --caption-gallery")
        q = query if isinstance(query, np.ndarray) else self.embed_image(query)
        q = l2n(q)
        if self._cap_index is None:
            idx = faiss.IndexFlatIP(self.dim)
            idx.add(np.ascontiguousarray(self.caption_vectors, dtype=np.float32))
            self._cap_index = idx
        scores, rows = self._cap_index.search(q[:1], min(k, len(self.caption_vectors)))
        out = []
        ids = self.caption_meta.column("id").to_pylist()
        texts = self.caption_meta.column("caption").to_pylist()
        for rank, (s, r) in enumerate(zip(scores[0], rows[0], strict=True), start=1):
            if r >= 0:
                out.append({"rank": rank, "score": float(s), "id": ids[r], "caption": texts[r]})
        return out

    # -- updates ------------------------------------------------------------------------------------
    def add(
        self,
        data: Any,
        *,
        encoder: Any = None,
        chunk_size: int = 4096,
        progress: bool = False,
        log: Any = None,
    ) -> int:
        """Embed `data` (manifest path, ImageTextData or Records) with the index's model and append it in
        memory; `.save()` writes it. Returns the number of items added (undecodable images are skipped)."""
        import tempfile

        from xmodal.index.embed import embed_collection, to_collection

        if encoder is not None:
            self.encoder = encoder
        coll, _ = to_collection(data)
        dup = [i for i in coll.ids if i in self._row]
        if dup:
            raise UserError(f"{len(dup)} id(s) already in the index (e.g. {dup[0]!r}); delete them first")
        with tempfile.TemporaryDirectory(prefix="xmodal-add-") as work:
            emb = embed_collection(
                self.encoder,
                coll,
                Path(work) / "chunks",
                chunk_size=chunk_size,
                caption_gallery=bool(self.info.get("caption_gallery")),
                thumb_size=int(self.info.get("thumb_size") or 128),
                progress=progress,
                log=log or (lambda m: None),
            )
        return self.add_embedded(emb)

    def add_embedded(self, emb: Any) -> int:
        """Append already embedded items (an `embed.Embedded`). Ids must be new. Returns the count added."""
        if not emb.rows:
            return 0
        new_ids = [r["id"] for r in emb.rows]
        dup = [i for i in new_ids if i in self._row]
        if dup:
            raise UserError(
                f"{len(dup)} id(s) already in the index (e.g. {dup[0]!r}); delete them first "
                "(xmodal index delete) or index them under other names"
            )
        n0 = len(self)
        vecs = l2n(emb.vectors)
        self.vectors = np.concatenate([np.asarray(self.vectors, np.float32), vecs])
        self._meta = concat_meta(self._meta, rows_to_table(emb.rows))
        self.thumbs.extend(emb.thumbs)
        if self.info.get("caption_gallery"):
            cv = (
                emb.caption_vectors
                if emb.caption_vectors is not None
                else np.zeros((0, self.dim), np.float32)
            )
            cm = pa.table(
                {
                    "id": pa.array([new_ids[i] for i in emb.caption_items], pa.string()),
                    "caption": pa.array(emb.caption_texts, pa.string()),
                }
            )
            self.caption_vectors = (
                np.concatenate([self.caption_vectors, cv]) if self.caption_vectors is not None else cv
            )
            self.caption_meta = concat_meta(self.caption_meta, cm) if self.caption_meta is not None else cm
            self._cap_index = None
        self._reindex_ids()
        new = slice(n0, len(self))
        if self.info.get("invgc"):
            self.invgc_vectors = np.concatenate([self.invgc_vectors, self._invgc(vecs)])
        if self.bank_names:
            self.bank_lse = np.concatenate([self.bank_lse, self._lse(self.gallery[new])])
            self.bank_hubs = self._hubs()
        if self.info["effective_kind"] != effective_kind(self.info["kind"], len(self)) or self.ann is None:
            self.rebuild_ann()
        else:
            self._ann_add(new)
        self.info["count"] = len(self)
        self.info["updated"] = now()
        return len(emb.rows)

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items by id (unknown ids are ignored). Rebuilds the ANN contents from the kept vectors,
        keeping trained codebooks where the kind allows. Returns how many were removed."""
        rows = sorted({self._row[i] for i in ids if i in self._row})
        if not rows:
            return 0
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self.vectors = np.ascontiguousarray(np.asarray(self.vectors)[keep])
        self._meta = self._meta.filter(pa.array(keep))
        self.thumbs.keep(keep)
        if self.invgc_vectors is not None:
            self.invgc_vectors = np.ascontiguousarray(self.invgc_vectors[keep])
        if self.caption_meta is not None:
            gone = {self._ids[r] for r in rows}
            ck = np.array([i not in gone for i in self.caption_meta.column("id").to_pylist()], dtype=bool)
            self.caption_meta = self.caption_meta.filter(pa.array(ck))
            self.caption_vectors = self.caption_vectors[ck]
            self._cap_index = None
        if self.bank_lse is not None:
            self.bank_lse = self.bank_lse[keep]
        self._reindex_ids()
        if self.bank_names:
            self.bank_hubs = self._hubs()
        kind = effective_kind(self.info["kind"], len(self))
        if kind != self.info["effective_kind"] or len(self) == 0:
            self.rebuild_ann()
        elif kind == "binary":  # keep the learned code; only the stored codes change
            self.ann.reset()
            self.ann.add(self.coder.encode(self.gallery))
        else:
            try:  # reset() keeps IVF/PQ training; HNSW and flat simply start empty
                self.ann.reset()
                if len(self):
                    self.ann.add(self._ann_vectors())
            except RuntimeError:
                self.rebuild_ann()
        self.info["count"] = len(self)
        self.info["updated"] = now()
        return len(rows)

    # -- banks and hubness ------------------------------------------------------------------------------
    def _lse(self, gallery: np.ndarray) -> np.ndarray:
        cols = [
            hubness.bank_offsets(self.banks[b], gallery, self.info["banks"][b]["beta"])
            for b in self.bank_names
        ]
        return np.stack(cols, axis=1) if cols else np.zeros((len(gallery), 0))

    def _hubs(self) -> np.ndarray:
        cols = [
            hubness.hub_mask(self.banks[b], self.gallery, k=int(self.info["banks"][b].get("hub_k", 1)))
            if len(self)
            else np.zeros(0, bool)
            for b in self.bank_names
        ]
        return np.stack(cols, axis=1) if cols else np.zeros((len(self), 0), bool)

    def _invgc(self, vectors: np.ndarray) -> np.ndarray:
        cfg = self.info["invgc"]
        return hubness.invgc(
            vectors,
            self.banks.get("text"),
            self.banks.get("image"),
            r_q=cfg["r_q"],
            r_g=cfg["r_g"],
            local_adj=cfg["method"] == "localadj",
            pool_rate=cfg["pool_rate"],
        )

    def set_bank(
        self,
        name: str,
        vectors: np.ndarray | None,
        *,
        beta: float = DEFAULT_BETA,
        source: str = "",
        hub_k: int = 1,
        refresh: bool = True,
    ) -> None:
        """Add/replace (or with vectors=None remove) the text or image bank; recomputes offsets and the
        ANN unless refresh=False (then call refresh_hubness() once after several changes)."""
        if name not in BANKS:
            raise UserError(f"bank {name!r}: use text or image")
        banks = dict(self.info.get("banks", {}))
        if vectors is None:
            banks.pop(name, None)
            self.banks.pop(name, None)
        else:
            if len(vectors) == 0:
                raise UserError(f"the {name} bank is empty")
            self.banks[name] = l2n(vectors)
            banks[name] = {
                "count": len(vectors),
                "beta": float(beta),
                "source": source,
                "hub_k": int(hub_k),
                "offset_mean": 0.0,
            }
        self.info["banks"] = {b: banks[b] for b in BANKS if b in banks}
        if refresh:
            self.refresh_hubness()

    def set_invgc(
        self,
        method: str | None,
        *,
        r_q: float = 0.1,
        r_g: float = 0.1,
        pool_rate: float = 0.01,
        refresh: bool = True,
    ) -> None:
        """Turn InvGC ("invgc") / InvGC+LocalAdj ("localadj") on the gallery vectors on, or off (None)."""
        if method in (None, "none"):
            self.info["invgc"] = None
        elif method in ("invgc", "localadj"):
            if not self.banks:
                raise UserError(
                    "--invgc needs a bank: add one with `xmodal index bank INDEX --data MANIFEST`"
                )
            self.info["invgc"] = {
                "method": method,
                "r_q": float(r_q),
                "r_g": float(r_g),
                "pool_rate": float(pool_rate),
            }
        else:
            raise UserError(f"--invgc {method}: use none, invgc or localadj")
        if refresh:
            self.refresh_hubness()

    def refresh_hubness(self) -> None:
        """Recompute InvGC vectors, bank offsets and activation sets, then rebuild the ANN structure."""
        self.invgc_vectors = self._invgc(np.asarray(self.vectors)) if self.info.get("invgc") else None
        if self.bank_names:
            self.bank_lse = self._lse(self.gallery)
            for j, b in enumerate(self.bank_names):
                self.info["banks"][b]["offset_mean"] = float(self.bank_lse[:, j].mean()) if len(self) else 0.0
            self.bank_hubs = self._hubs()
        else:
            self.bank_lse = self.bank_hubs = None
        self.rebuild_ann()
        self.info["updated"] = now()

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path:
        """Write the whole index directory atomically (temp folder beside it, then swapped in)."""
        final = Path(path) if path is not None else self.path
        if final is None:
            raise UserError("save(): no path given")
        final = final.absolute()
        with fsutil.locked(final):
            tmp = fsutil.temp_dir_for(final)
            try:
                self._write(tmp)
                self.thumbs.close()
                fsutil.replace_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.path = final
        # Thumbnails now live in the new folder's blob.
        idx = np.load(final / "thumbs.npy")
        self.thumbs = Thumbs(final / "thumbs.bin", idx)
        return final

    def _write(self, d: Path) -> None:
        info = dict(self.info)
        info["count"] = len(self)
        files = {"meta": "meta.parquet", "vectors": "vectors.npy", "thumbs": "thumbs.bin"}
        pq.write_table(self._meta, d / "meta.parquet")
        np.save(d / "vectors.npy", np.ascontiguousarray(self.vectors, dtype=np.float32))
        self.thumbs.write(d)
        if self.kind == "binary":
            faiss.write_index_binary(self.ann, str(d / "ann.faissb"))
            self.coder.save(d / "binary.npz")
            files.update(ann="ann.faissb", binary="binary.npz")
        else:
            faiss.write_index(self.ann, str(d / "ann.faiss"))
            files["ann"] = "ann.faiss"
        if self.info.get("caption_gallery") and self.caption_vectors is not None:
            np.save(d / "captions.npy", np.ascontiguousarray(self.caption_vectors, dtype=np.float32))
            pq.write_table(self.caption_meta, d / "captions.parquet")
            files.update(captions="captions.npy", caption_meta="captions.parquet")
        for b in self.bank_names:
            np.save(d / f"bank_{b}.npy", self.banks[b])
            files[f"bank_{b}"] = f"bank_{b}.npy"
        if self.bank_names:
            np.save(d / "bank_lse.npy", self.bank_lse)
            np.save(d / "bank_hubs.npy", self.bank_hubs)
        if self.invgc_vectors is not None:
            np.save(d / "vectors_invgc.npy", self.invgc_vectors)
        info["files"] = files
        info["ann_dim"] = self.ann_dim()
        (d / "index.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def open_index(path: str | Path, encoder: Any = None, mmap: bool = True) -> SearchIndex:
    """Load an index directory. Needs only faiss, numpy and pyarrow; the model loads lazily when a text or
    image query needs it (or pass `encoder`)."""
    p = Path(path).absolute()
    fsutil.recover_dir(p)
    if not (p / "index.json").is_file():
        raise UserError(f"{path}: not an xmodal index (no index.json); build one with `xmodal index build`")
    try:
        info = json.loads((p / "index.json").read_text())
    except ValueError as e:
        raise UserError(f"{p / 'index.json'}: not valid JSON ({e})") from e
    if int(info.get("format", 0)) > FORMAT:
        raise UserError(
            f"{path}: index format {info.get('format')} is newer than this xmodal; upgrade xmodal"
        )
    try:
        meta = pq.read_table(p / "meta.parquet")
        vectors = np.load(p / "vectors.npy", mmap_mode="r" if mmap else None)
        files = info.get("files", {})
        coder = None
        if info["effective_kind"] == "binary":
            ann = faiss.read_index_binary(str(p / files.get("ann", "ann.faissb")))
            coder = BinaryCoder.load(p / files.get("binary", "binary.npz"))
        else:
            ann = faiss.read_index(str(p / files.get("ann", "ann.faiss")))
        thumbs = (
            Thumbs(p / "thumbs.bin", np.load(p / "thumbs.npy")) if (p / "thumbs.npy").is_file() else Thumbs()
        )
        cap_v = cap_m = None
        if info.get("caption_gallery") and (p / "captions.npy").is_file():
            cap_v = np.load(p / "captions.npy")
            cap_m = pq.read_table(p / "captions.parquet")
        banks = {b: np.load(p / f"bank_{b}.npy") for b in BANKS if b in info.get("banks", {})}
        lse = np.load(p / "bank_lse.npy") if banks else None
        hubs = np.load(p / "bank_hubs.npy") if banks else None
        inv = np.load(p / "vectors_invgc.npy") if info.get("invgc") else None
    except (OSError, KeyError, RuntimeError, pa.ArrowInvalid) as e:
        raise UserError(
            f"{path}: index files are missing or damaged ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); rebuild it"
        ) from e
    if meta.num_rows != len(vectors) or (ann.ntotal != meta.num_rows):
        raise UserError(
            f"{path}: meta.parquet ({meta.num_rows} rows), vectors.npy ({len(vectors)}) and the "
            f"FAISS index ({ann.ntotal}) disagree; rebuild the index"
        )
    idx = SearchIndex(
        info,
        meta,
        vectors,
        path=p,
        ann=ann,
        coder=coder,
        thumbs=thumbs,
        caption_vectors=cap_v,
        caption_meta=cap_m,
        banks=banks,
        bank_lse=lse,
        bank_hubs=hubs,
        invgc_vectors=inv,
        encoder=encoder,
    )
    return idx
