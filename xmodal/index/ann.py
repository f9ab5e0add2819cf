"""ANN construction and parameters: the FAISS structure of each kind, its search settings, and the
`AnnMixin` part of `SearchIndex` that (re)builds and fills it from the gallery vectors."""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from xmodal.errors import UserError
from xmodal.index.binary import fit_binary

KINDS = ("flat", "hnsw", "ivfpq", "binary", "learned-binary")
BINARY_KINDS = ("binary", "learned-binary")  # Hamming codes in a FAISS binary index
PAD = 8  # ANN vector width is padded to a multiple of this (PQ sub-vectors of 8 dims)


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised as float32 (a 1-D vector becomes one row)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
    elif kind == "learned-binary":  # the bits are the hash heads' (set when the coder is attached)
        p.update(bits=int(options.get("bits") or 0), binary_method="learned")
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
        return "flat"  # (learned codes need no training: any size works)
    return kind


def new_float_index(kind: str, dim: int, params: dict[str, Any]) -> faiss.Index:
    """An empty inner-product FAISS index of `kind` (a named kind or a factory string)."""
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
        idx.pq.cp.min_points_per_centroid = 1  # fewer than 39 points per code is fine here: no warning
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
    if kind in ("flat", *BINARY_KINDS):
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
    """Kinds whose ANN scores are already the exact inner products (no re-ranking needed)."""
    return kind == "flat" or kind.replace(" ", "") in ("Flat", "IDMap,Flat")


class AnnMixin:
    """The FAISS structure of a `SearchIndex`: built from `gallery` plus the folded bank columns."""

    def ann_dim(self) -> int:
        """Width of the ANN vectors: the embedding dim, plus one column per bank padded to PAD."""
        e = len(self.bank_names)
        if e == 0 or self.kind in BINARY_KINDS:
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
        self.info["trained_on"] = n  # items the fitted parts (IVF/PQ, ITQ/LSH) saw; see SearchIndex.optimize
        kind = effective_kind(self.info["kind"], n)
        self.info["effective_kind"] = kind
        self.info["params"] = auto_params(kind, n, self.ann_dim(), self.info.get("options", {}))
        params = self.info["params"]
        if kind == "learned-binary":
            if self.coder is None or self.coder.method != "learned":
                raise UserError(
                    "--kind learned-binary: the model has no hash heads; build from a hash run "
                    "(xmodal hash train RUN --bits 64 … --out HASHRUN, then index build HASHRUN)"
                )
            params["bits"] = self.coder.bits
            self.ann = faiss.IndexBinaryFlat(params["bits"])
            if n:
                self.ann.add(self.coder.encode(self.gallery, "image"))
            return
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
        """Append gallery rows to the ANN (its structure and training stay as they are)."""
        if self.kind in BINARY_KINDS:
            self.ann.add(self.coder.encode(self.gallery[rows]))
        else:
            self.ann.add(self._ann_vectors(rows))

    def _refill_ann(self) -> None:
        """Replace the ANN's contents by the current gallery, keeping trained structure (IVF/PQ codebooks,
        the learned binary code) where the kind allows; rebuild when the effective kind changes."""
        kind = effective_kind(self.info["kind"], len(self))
        if self.ann is None or kind != self.info["effective_kind"] or len(self) == 0:
            self.rebuild_ann()
        elif kind in BINARY_KINDS:  # keep the learned code; only the stored codes change
            self.ann.reset()
            self.ann.add(self.coder.encode(self.gallery))
        else:
            try:  # reset() keeps IVF/PQ training; HNSW and flat simply start empty
                self.ann.reset()
                self.ann.add(self._ann_vectors())
            except RuntimeError:
                self.rebuild_ann()
