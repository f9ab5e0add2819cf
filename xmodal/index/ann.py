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
BINARY_STRUCTURES = ("flat", "hnsw", "ivf")  # how the codes are searched
FLAT_BINARY_MAX = 2_000_000  # above this, binary codes default to a binary IVF (the scan costs > ~3 ms)
IVF_LISTS_PER_SQRT_N = 1.0  # 2√N lists gained little at 1M and cost 2.5× the k-means time
IVF_PROBE_FRACTION = 4  # nprobe = nlist/4 (8…256): nlist/8 lost 0.03 recall on the tests' spread mixture


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised as float32 (a 1-D vector becomes one row)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def auto_params(kind: str, n: int, dim: int, options: dict[str, Any]) -> dict[str, Any]:
    """Concrete index parameters for `kind` and n items. User options win; the defaults grow with n so
    that every kind keeps recall@10 ≥ 0.95 against exact search up to 1M items (measured by
    benchmarks/search.py, BENCHMARKS.md `search`). Structural parameters (nlist, PQ bits, the code) are
    fixed when the ANN is trained; the search-time ones (efSearch, nprobe, re-rank depth) follow n."""
    p: dict[str, Any] = {}
    if kind == "hnsw":
        p.update(
            hnsw_m=int(options.get("hnsw_m") or 32), ef_construction=int(options.get("ef_construction") or 40)
        )
    elif kind == "ivfpq":
        nlist = options.get("nlist") or ivf_nlist(n)
        nlist = max(1, min(int(nlist), max(1, n // 39), 65536))
        # 2^nbits centroids per sub-quantizer; FAISS wants ≥ 39 training points per centroid.
        nbits = max(1, min(8, int(math.log2(max(n, 2)))))  # small sets: codebooks nearly memorise the items
        p.update(nlist=nlist, pq_m=max(1, dim // PAD), pq_nbits=nbits)
    elif kind in BINARY_KINDS:
        p["binary_index"] = binary_structure(n, options)
        if kind == "binary":
            p.update(
                bits=int(options.get("bits") or 256), binary_method=options.get("binary_method") or "itq"
            )
        else:  # the bits are the hash heads' (set when the coder is attached)
            p.update(bits=int(options.get("bits") or 0), binary_method="learned")
        if p["binary_index"] == "hnsw":
            p.update(hnsw_m=int(options.get("hnsw_m") or 32), ef_construction=40)
        elif p["binary_index"] == "ivf":
            p["nlist"] = max(1, min(int(options.get("nlist") or ivf_nlist(n)), max(1, n // 39), 65536))
    p.update(search_params(kind, n, p, options))
    return p


def ivf_nlist(n: int) -> int:
    """Default IVF list count: IVF_LISTS_PER_SQRT_N·√n (FAISS's guide suggests 4–16·√n at 1M+)."""
    return int(round(IVF_LISTS_PER_SQRT_N * math.sqrt(max(n, 1))))


def search_params(kind: str, n: int, p: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The search-time parameters at n items (cheap to change: `index add` updates them as n grows)."""
    out: dict[str, Any] = {}
    rerank = options.get("rerank")
    binary_hnsw = kind in BINARY_KINDS and p.get("binary_index") == "hnsw"
    if kind == "hnsw" or binary_hnsw:
        out["ef_search"] = int(options.get("ef_search") or hnsw_ef_search(n))
    if kind not in KINDS:  # a factory string: only what the user set (set_search_params has defaults)
        out.update({k: int(options[k]) for k in ("nprobe", "ef_search") if options.get(k)})
    if "nlist" in p:
        nprobe = options.get("nprobe") or ivf_nprobe(p["nlist"])
        out["nprobe"] = max(1, min(int(nprobe), p["nlist"]))
    if rerank is None:  # re-ranking by float vectors: needed where the ANN's scores are approximate
        if kind in BINARY_KINDS:
            rerank = binary_rerank(n, int(p.get("bits") or 256))
        elif kind == "hnsw" or is_exact(kind):
            rerank = 0  # HNSWFlat and flat scores are the exact inner products
        else:
            rerank = pq_rerank(n)
    out["rerank"] = int(rerank)
    return out


def hnsw_ef_search(n: int) -> int:
    """efSearch for n items: 128 up to 100k, then growing as √n (graph search needs a wider beam)."""
    return int(max(128, round(128 * math.sqrt(n / 100_000))))


def ivf_nprobe(nlist: int) -> int:
    """Lists probed: nlist/IVF_PROBE_FRACTION, at least 8 (or all) and at most 256."""
    return max(min(nlist, 8), min(nlist // IVF_PROBE_FRACTION, 256))


def pq_rerank(n: int) -> int:
    """Candidates re-ranked by float vectors after PQ scoring: 100 up to 100k, growing as √n beyond."""
    return int(max(100, round(100 * math.sqrt(n / 100_000))))


def binary_rerank(n: int, bits: int) -> int:
    """Candidates re-ranked after Hamming ranking: one per thousand items (at least 100) for 256-bit codes,
    scaled by 256/bits (shorter codes rank more coarsely). 256-bit ITQ at 1M: a pool of 500 gave
    recall@10 0.981, 1,000 gave 1.0."""
    return int(max(100, round(n / 1000)) * 256 / max(bits, 8))


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


def binary_structure(n: int, options: dict[str, Any]) -> str:
    """The FAISS binary index over the codes: `flat` (exhaustive Hamming scan, exact in Hamming distance)
    unless asked otherwise or the collection is so large that the scan dominates (> FLAT_BINARY_MAX)."""
    s = options.get("binary_index") or ("flat" if n <= FLAT_BINARY_MAX else "ivf")
    if s not in BINARY_STRUCTURES:
        raise UserError(f"--binary-index {s}: use one of {', '.join(BINARY_STRUCTURES)}")
    return s


def new_binary_index(bits: int, params: dict[str, Any]) -> faiss.IndexBinary:
    """An empty Hamming index of params["binary_index"] (flat, hnsw or ivf) for `bits`-bit codes."""
    s = params.get("binary_index", "flat")
    if s == "hnsw":
        idx = faiss.IndexBinaryHNSW(bits, params["hnsw_m"])
        idx.hnsw.efConstruction = params["ef_construction"]
        idx.hnsw.efSearch = params["ef_search"]
        return idx
    if s == "ivf":
        quantizer = faiss.IndexBinaryFlat(bits)
        idx = faiss.IndexBinaryIVF(quantizer, bits, params["nlist"])
        idx.own_fields = True
        quantizer.this.disown()
        idx.nprobe = params["nprobe"]
        return idx
    return faiss.IndexBinaryFlat(bits)


def set_search_params(index: faiss.Index, kind: str, params: dict[str, Any], candidates: int) -> None:
    """Apply nprobe / efSearch (efSearch is raised to the candidate count so HNSW can return that many)."""
    if kind == "hnsw":
        index.hnsw.efSearch = max(params["ef_search"], candidates)
        return
    if kind == "ivfpq":
        index.nprobe = params["nprobe"]
        return
    if kind in BINARY_KINDS:
        if params.get("binary_index") == "hnsw":
            index.hnsw.efSearch = max(params["ef_search"], candidates)
        elif params.get("binary_index") == "ivf":
            index.nprobe = params["nprobe"]
        return
    if kind == "flat":
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
            self._fill_binary(self.coder.encode(self.gallery, "image"))
            return
        if kind == "binary":
            self.coder = fit_binary(
                self.gallery,
                bits=params["bits"],
                method=params["binary_method"],
                seed=int(self.info.get("options", {}).get("seed", 0)),
            )
            self._fill_binary(self.coder.encode(self.gallery))
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

    def _fill_binary(self, codes: np.ndarray) -> None:
        """A new binary ANN over `codes` (its IVF trained on them first)."""
        params = self.info["params"]
        idx = new_binary_index(params["bits"], params)
        if not idx.is_trained:
            idx.train(codes)
        if len(codes):
            idx.add(codes)
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
        elif kind in BINARY_KINDS:  # keep the code (and binary IVF lists); only the stored codes change
            codes = self.coder.encode(self.gallery)
            try:
                self.ann.reset()
                self.ann.add(codes)
            except RuntimeError:  # (a binary HNSW graph cannot be emptied)
                self._fill_binary(codes)
        else:
            try:  # reset() keeps IVF/PQ training; HNSW and flat simply start empty
                self.ann.reset()
                self.ann.add(self._ann_vectors())
            except RuntimeError:
                self.rebuild_ann()
