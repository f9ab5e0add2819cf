"""Recall of every index kind against exact brute force, on clustered vectors and on real (emoji)
embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.index import SearchIndex
from xmodal.index.binary import fit_itq, fit_lsh, hamming

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_mixture(
    n: int, d: int = 256, clusters: int = 200, spread: float = 1.25, seed: int = 0
) -> np.ndarray:
    """L2-normalised points around random unit centres; the noise has a decaying (1/i) spectrum in a random
    basis, like real embeddings, so that neighbours are not trivially separable (unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lam = 1.0 / np.arange(1, d + 1)
    lam *= spread**2 / lam.sum()
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = centres[rng.integers(0, clusters, n)] + (rng.standard_normal((n, d)) * np.sqrt(lam)) @ basis.T
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    s = q @ g.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def rows_of(ids: np.ndarray) -> np.ndarray:
    return np.vectorize(int)(ids)


@pytest.fixture(scope="module")
def clustered():
    x = gaussian_mixture(20_200)
    g, q = x[:20_000], x[20_000:]
    return g, q, exact_topk(q, g, 10)


def test_flat_is_exact(clustered):
    g, q, truth = clustered
    idx = SearchIndex.from_vectors(g, kind="flat")
    scores, ids = idx.search_vectors(q, k=10)
    assert np.array_equal(rows_of(ids), truth)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ g.T, truth, 1), atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "binary"])
def test_approximate_kinds_recall_at_defaults(clustered, kind):
    g, q, truth = clustered
    idx = SearchIndex.from_vectors(g, kind=kind)
    _, ids = idx.search_vectors(q, k=10)
    r = recall_at(rows_of(ids), truth)
    assert r >= 0.95, f"{kind}: recall@10 {r:.3f} < 0.95 ({idx.info['params']})"


def test_weak_settings_do_fail_the_bar(clustered):
    """The data are hard enough that the 0.95 bar means something: starved settings miss it."""
    g, q, truth = clustered
    ivf = SearchIndex.from_vectors(g, kind="ivfpq", nprobe=1, rerank=0)
    assert recall_at(rows_of(ivf.search_vectors(q, k=10)[1]), truth) < 0.95
    lsh = SearchIndex.from_vectors(g, kind="binary", binary_method="lsh", bits=64, rerank=0)
    assert recall_at(rows_of(lsh.search_vectors(q, k=10)[1]), truth) < 0.95


@pytest.mark.parametrize("factory,opts", [("IVF64,Flat", {"nprobe": 64}), ("HNSW16", {"ef_search": 64})])
def test_factory_string_kind(clustered, factory, opts):
    g, q, _ = clustered
    idx = SearchIndex.from_vectors(g[:5000], kind=factory, **opts)
    _, ids = idx.search_vectors(q, k=10)
    assert recall_at(rows_of(ids), exact_topk(q, g[:5000], 10)) >= 0.95


def test_itq_codes_match_hamming_and_beat_lsh():
    x = gaussian_mixture(3000, d=64, clusters=30)
    itq, lsh = fit_itq(x, 64, seed=0), fit_lsh(x, 64, seed=0)
    codes = itq.encode(x)
    assert codes.shape == (3000, 8) and codes.dtype == np.uint8
    # faiss's Hamming distances equal a brute-force popcount of our packed codes
    import faiss

    bi = faiss.IndexBinaryFlat(64)
    bi.add(codes)
    d, i = bi.search(codes[:5], 20)
    brute = hamming(codes[:5], codes)
    np.testing.assert_array_equal(d, np.take_along_axis(brute, i, 1))
    # ITQ's learned rotation lowers quantisation loss against a random projection of the same PCA data
    truth = exact_topk(x[:200], x, 10)

    def code_recall(coder):
        c = coder.encode(x)
        h = hamming(c[:200], c)
        return recall_at(np.argsort(h, axis=1, kind="stable")[:, :10], truth)

    assert code_recall(itq) > code_recall(lsh)


def test_itq_more_bits_than_dims_uses_projection():
    x = gaussian_mixture(500, d=16, clusters=5)
    coder = fit_itq(x, 64)
    assert coder.projection.shape == (16, 64)
    assert coder.encode(x).shape == (500, 8)


@pytest.fixture(scope="module")
def emoji_embeddings(tmp_path_factory):
    """A few hundred rendered emoji embedded by a (seeded random) xm-micro: real image embeddings."""
    from xmodal.data import load_dataset, make_emoji
    from xmodal.models import load_encoder

    root = tmp_path_factory.mktemp("emoji")
    paths = make_emoji(root, image_size=32, limit=400)  # needs the README's emoji font package
    ds = load_dataset(paths["train"], 32, use_cache=False, progress=False)
    return load_encoder("xm-micro").encode_images(ds.images).numpy()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "binary"])
def test_recall_on_emoji_embeddings(emoji_embeddings, kind):
    g = emoji_embeddings
    assert len(g) >= 200
    truth = exact_topk(g[:100], g, 10)
    idx = SearchIndex.from_vectors(g, kind=kind)
    _, ids = idx.search_vectors(g[:100], k=10)
    r = recall_at(rows_of(ids), truth)
    assert r >= (1.0 if kind == "flat" else 0.95), f"{kind}: recall@10 {r:.3f}"
