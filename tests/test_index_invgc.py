"""InvGC centres on the whole gallery: the same vectors for any chunk size, against a numpy brute force of
the paper's formula, and after `add`/`delete` the folded scores equal a fresh build on the whole gallery."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.index import SearchIndex, hubness, open_index
from xmodal.index.embed import Embedded

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ref_invgc(G, bank, r):
    """Full InvGC (Jian & Wang 2023), one bank: x' = normalise(x − r · (1/|B|) Σ_b (w(x,b) − w̄) b), with
    w(x,b) = ⟨x,b⟩ and w̄ the mean of w over the whole gallery × bank."""
    G, bank = G.astype(np.float64), bank.astype(np.float64)
    W = np.array([[float(x @ b) for b in bank] for x in G])
    mean_w = W.sum() / W.size
    out = []
    for i, x in enumerate(G):
        msg = sum((W[i, j] - mean_w) * bank[j] for j in range(len(bank))) / len(bank)
        y = x - r * msg
        out.append(y / np.linalg.norm(y))
    return np.array(out)


def ref_invgc_two(G, tb, ib, r_q, r_g):
    """Both banks: the two messages' results averaged, then normalised (as the official code)."""
    y = ref_invgc(G, tb, r_q) + ref_invgc(G, ib, r_g)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    d = 16
    shift = unit(rng, 1, d)[0]
    g = unit(rng, 300, d) + 0.6 * shift  # a shared direction: the mean similarity is far from 0
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    return g, unit(rng, 12, d), unit(rng, 40, d), unit(rng, 25, d)  # gallery, queries, text/image banks


@pytest.mark.parametrize("chunk", [7, 64, 299, 4096])
def test_invgc_is_the_formula_for_any_chunk(data, chunk):
    g, _, tb, ib = data
    got = hubness.invgc(g, query_bank=tb, local_adj=False, r_q=0.5, chunk=chunk)
    np.testing.assert_allclose(got, ref_invgc(g, tb, 0.5), atol=1e-6)
    both = hubness.invgc(g, tb, ib, r_q=0.5, r_g=0.3, local_adj=False, chunk=chunk)
    np.testing.assert_allclose(both, ref_invgc_two(g, tb, ib, 0.5, 0.3), atol=1e-6)


def test_index_invgc_on_a_gallery_larger_than_the_default_chunk(data):
    """4,200 items: more than one default INVGC_CHUNK (4,096), nothing patched."""
    rng = np.random.default_rng(3)
    _, _, tb, ib = data
    g = unit(rng, 4200, 16) + 0.6 * tb[0]
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    q = unit(rng, 6, 16)
    assert len(g) > hubness.INVGC_CHUNK == 4096
    idx = SearchIndex.from_vectors(g, kind="flat")
    idx.set_bank("text", tb, refresh=False)
    idx.set_bank("image", ib, refresh=False)
    idx.set_invgc("invgc", r_q=0.5, r_g=0.3)
    ref = ref_invgc_two(g, tb, ib, 0.5, 0.3)
    np.testing.assert_allclose(idx.invgc_vectors, ref, atol=1e-6)
    scores, ids = idx.search_vectors(q, k=5)
    s_ref = q.astype(np.float64) @ ref.T
    rows = np.vectorize(int)(ids)
    np.testing.assert_allclose(scores, np.take_along_axis(s_ref, rows, 1), atol=1e-5)
    np.testing.assert_array_equal(rows[:, 0], s_ref.argmax(1))


def _built(g, ids, tb, ib, method, kind):
    idx = SearchIndex.from_vectors(g, ids=ids, kind=kind)
    idx.set_bank("text", tb, refresh=False)
    idx.set_bank("image", ib, refresh=False)
    idx.set_invgc(method, r_q=0.5, r_g=0.3, pool_rate=0.1)
    return idx


def _same(a: SearchIndex, b: SearchIndex, q: np.ndarray) -> None:
    """Same gallery vectors, offsets and hubs, and the same folded scores and results for every norm."""
    assert a.ids == b.ids
    np.testing.assert_allclose(a.invgc_vectors, b.invgc_vectors, atol=1e-6)
    np.testing.assert_allclose(a.bank_lse, b.bank_lse, atol=1e-5)
    np.testing.assert_array_equal(a.bank_hubs, b.bank_hubs)
    for norm in ("none", "qbnorm", "dbnorm-dynamic"):
        sa, ia = a.search_vectors(q, k=8, norm=norm)
        sb, ib_ = b.search_vectors(q, k=8, norm=norm)
        np.testing.assert_allclose(sa, sb, atol=2e-4, rtol=1e-5)
        assert (ia == ib_).mean() > 0.97, norm  # the same items, up to float32 near-ties


@pytest.mark.parametrize("method,kind", [("invgc", "flat"), ("invgc", "hnsw"), ("localadj", "flat")])
def test_add_and_delete_equal_a_fresh_build(data, tmp_path, monkeypatch, method, kind):
    monkeypatch.setattr(hubness, "INVGC_CHUNK", 64)
    g, q, tb, ib = data
    ids = [f"i{i}" for i in range(len(g))]
    _built(g[:200], ids[:200], tb, ib, method, kind).save(tmp_path / "idx")
    idx = open_index(tmp_path / "idx", mmap=False)
    rows = [{"id": i, "caption": "", "captions": []} for i in ids[200:]]
    idx.add_embedded(Embedded(rows=rows, vectors=g[200:], thumbs=[None] * 100, caption_vectors=None))
    _same(idx, _built(g, ids, tb, ib, method, kind), q)
    idx.save()
    _same(open_index(tmp_path / "idx"), _built(g, ids, tb, ib, method, kind), q)

    gone = set(ids[::3])
    idx.delete(sorted(gone))
    keep = np.array([i not in gone for i in ids])
    _same(idx, _built(g[keep], [i for i in ids if i not in gone], tb, ib, method, kind), q)
