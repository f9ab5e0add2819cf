"""Compact binary codes for float embeddings: ITQ (Gong & Lazebnik 2011) or random-projection LSH.

A `BinaryCoder` maps float vectors (N×D) to k-bit codes packed as uint8 (N×k/8), the layout
faiss's `IndexBinaryFlat` / `IndexBinaryHNSW` search by Hamming distance.

ITQ: centre, project to k dims (PCA when k ≤ D; a seeded Gaussian projection when k > D, since PCA
cannot give more than D directions), then learn an orthogonal rotation R that minimises the
quantisation loss ||sign(VR) − VR||² by alternating B = sign(VR) and the orthogonal Procrustes
solution R = U Wᵀ of svd(Vᵀ B). LSH: sign of a seeded Gaussian projection (no training beyond the mean).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmodal.errors import UserError

METHODS = ("itq", "lsh")


@dataclass
class BinaryCoder:
    """Fitted code parameters: codes = packbits((x − mean) @ projection > 0)."""

    method: str
    bits: int
    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, bits); for ITQ this already includes the learned rotation

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float N×D → uint8 N×(bits/8), bit order as faiss expects (little-endian within each byte)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected N×{self.dim} vectors, got shape {x.shape}")
        bits = ((x - self.mean) @ self.projection) > 0
        return np.packbits(bits, axis=1, bitorder="little")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        with open(path, "wb") as f:
            np.savez(
                f,
                method=np.array(self.method),
                bits=np.array(self.bits),
                mean=self.mean,
                projection=self.projection,
            )

    @classmethod
    def load(cls, path: str | Path) -> BinaryCoder:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(
                method=str(z["method"]),
                bits=int(z["bits"]),
                mean=z["mean"].astype(np.float32),
                projection=z["projection"].astype(np.float32),
            )


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its own thread count
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _check_bits(bits: int) -> None:
    if bits <= 0 or bits % 8:
        raise UserError(f"--bits {bits}: must be a positive multiple of 8 (codes are stored as bytes)")


def fit_itq(
    x: np.ndarray, bits: int = 256, iters: int = 50, seed: int = 0, max_train: int = 10_000
) -> BinaryCoder:
    """Learn ITQ codes from `x` (N×D float). Uses at most `max_train` rows (seeded subsample)."""
    _check_bits(bits)
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    if len(x) > max_train:
        x = x[rng.choice(len(x), max_train, replace=False)]
    if len(x) < 2:
        raise UserError("binary codes need at least 2 vectors to train on")
    mean = x.mean(axis=0)
    xc = x - mean
    d = x.shape[1]
    if bits <= d:
        # PCA: top-`bits` right singular vectors of the centred data.
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        pca = vt[:bits].T  # D×bits
        if pca.shape[1] < bits:  # fewer samples than bits: pad with random directions
            extra = rng.standard_normal((d, bits - pca.shape[1]))
            pca = np.concatenate([pca, extra / np.linalg.norm(extra, axis=0, keepdims=True)], axis=1)
    else:
        pca = rng.standard_normal((d, bits)) / np.sqrt(d)
    v = (xc @ pca).astype(np.float32)  # N×bits; float32 is plenty for a sign pattern and 4× faster
    # Random orthogonal start, then alternate B-step and Procrustes R-step. The matrices are small, so one
    # BLAS thread is as fast and never collapses when a shared machine is oversubscribed.
    r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    with _one_blas_thread():
        for _ in range(iters):
            b = np.where(v @ r.astype(np.float32) >= 0, 1.0, -1.0).astype(np.float32)
            u, _, wt = np.linalg.svd((v.T @ b).astype(np.float64))
            r = u @ wt
    return BinaryCoder("itq", bits, mean.astype(np.float32), (pca @ r).astype(np.float32))


def fit_lsh(x: np.ndarray, bits: int = 256, seed: int = 0) -> BinaryCoder:
    """Sign random projection (SimHash) codes; the mean is removed so bits split the data evenly."""
    _check_bits(bits)
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((x.shape[1], bits)) / np.sqrt(x.shape[1])
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    return BinaryCoder("lsh", bits, mean.astype(np.float32), proj.astype(np.float32))


def fit_binary(
    x: np.ndarray, bits: int = 256, method: str = "itq", seed: int = 0, iters: int = 50
) -> BinaryCoder:
    """Fit a coder by name (`itq` or `lsh`)."""
    if method == "itq":
        return fit_itq(x, bits=bits, iters=iters, seed=seed)
    if method == "lsh":
        return fit_lsh(x, bits=bits, seed=seed)
    raise UserError(f"--binary-method {method}: use one of {', '.join(METHODS)}")


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute-force Hamming distances between packed codes a (N×B) and b (M×B) → N×M int (for tests)."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(x, axis=2).sum(axis=2)


class LearnedCoder:
    """Codes from trained hash heads (`xmodal hash train`): the image head codes the gallery and image
    queries, the text head codes text queries. Stored as plain arrays (the heads' config and weights, no
    pickle); torch is imported only when something is encoded."""

    method = "learned"

    def __init__(self, config: dict, state: dict[str, np.ndarray]) -> None:
        self.config, self.state = dict(config), state
        self._heads = None

    @classmethod
    def from_heads(cls, heads) -> LearnedCoder:
        return cls(
            heads.config(), {k: v.detach().cpu().float().numpy() for k, v in heads.state_dict().items()}
        )

    @property
    def bits(self) -> int:
        return int(self.config["bits"]) * int(self.config.get("steps", 1))

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    def heads(self):
        if self._heads is None:
            import torch

            from xmodal.hashing.heads import HashHeads

            h = HashHeads.from_config(self.config)
            h.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()})
            self._heads = h.eval()
        return self._heads

    def encode(self, x: np.ndarray, modality: str = "image") -> np.ndarray:
        """float N×D → packed uint8 N×(bits/8), the `modality` head's ±1 codes."""
        import torch

        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected N×{self.dim} vectors, got shape {x.shape}")
        heads = self.heads()
        with torch.no_grad():
            return heads.pack(heads.codes(torch.from_numpy(x), modality))

    def save(self, path: str | Path) -> None:
        import json

        with open(Path(path), "wb") as f:
            np.savez(
                f, config=np.array(json.dumps(self.config)), **{f"w.{k}": v for k, v in self.state.items()}
            )

    @classmethod
    def load(cls, path: str | Path) -> LearnedCoder:
        import json

        with np.load(Path(path), allow_pickle=False) as z:
            state = {k[2:]: z[k] for k in z.files if k.startswith("w.")}
            return cls(json.loads(str(z["config"])), state)
