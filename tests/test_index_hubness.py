"""Hubness correction: QB-Norm (IS, DIS), DBNorm (dual IS/DIS), InvGC/LocalAdj against straightforward numpy
versions of the formulas, and the folded index against the explicit inverted softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xmodal.index import SearchIndex, hubness, open_index

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- brute-force references, written from the papers' formulas ---------------------------------------


def ref_is(S, B, beta):
    """IS(q, g) = exp(β s(q,g)) / Σ_b exp(β s(b,g))."""
    out = np.zeros(S.shape)
    for j in range(S.shape[1]):
        denom = sum(math.exp(beta * B[b, j]) for b in range(B.shape[0]))
        for i in range(S.shape[0]):
            out[i, j] = math.exp(beta * S[i, j]) / denom
    return out


def ref_dis(S, B, beta, k=1):
    """DIS: rows whose top-1 gallery item is some bank query's top-k item get IS, other rows exp(β s)."""
    active = set()
    for b in range(B.shape[0]):
        active |= {int(j) for j in np.argsort(-B[b], kind="stable")[:k]}
    normalised = ref_is(S, B, beta)
    out = np.exp(beta * S)
    for i in range(S.shape[0]):
        if int(np.argmax(S[i])) in active:
            out[i] = normalised[i]
    return out


def ref_dbnorm(S, Bq, Bg, beta_q, beta_g, dynamic):
    f = ref_dis if dynamic else ref_is
    return f(S, Bq, beta_q) * f(S, Bg, beta_g)


def ref_invgc(G, bank, r, local, pool_rate):
    """x' = x − r · (1/|N|) Σ_{b∈N(x)} w(x,b) b, with N all bank items (weights centred on the mean
    similarity) or, with LocalAdj, the top pool_rate·|bank| bank items by similarity (raw weights);
    then L2-normalised."""
    out = []
    W = G @ bank.T
    mean_w = W.mean()
    p = max(1, int(pool_rate * len(bank)))
    for i, x in enumerate(G):
        if local:
            nb = np.argsort(-W[i], kind="stable")[:p]
            msg = sum(W[i, b] * bank[b] for b in nb) / p
        else:
            msg = sum((W[i, b] - mean_w) * bank[b] for b in range(len(bank))) / len(bank)
        y = x - r * msg
        out.append(y / np.linalg.norm(y))
    return np.array(out)


@pytest.fixture
def sims():
    rng = np.random.default_rng(0)
    g, q, bq, bg = unit(rng, 30, 8), unit(rng, 7, 8), unit(rng, 20, 8), unit(rng, 15, 8)
    return q @ g.T, bq @ g.T, bg @ g.T, (q, g, bq, bg)


def test_inverted_softmax_equals_formula(sims):
    S, Bq, _, _ = sims
    np.testing.assert_allclose(hubness.inverted_softmax(S, Bq, beta=20), ref_is(S, Bq, 20), rtol=1e-10)
    np.testing.assert_allclose(
        hubness.inverted_softmax(S, Bq, beta=20, log=True), np.log(ref_is(S, Bq, 20)), rtol=1e-10, atol=1e-10
    )
    np.testing.assert_allclose(hubness.qb_norm(S, Bq, beta=7, dynamic=False), ref_is(S, Bq, 7), rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_dynamic_inverted_softmax_equals_formula(sims, k):
    S, Bq, _, _ = sims
    got = hubness.qb_norm(S, Bq, beta=20, dynamic=True, k=k)
    ref = ref_dis(S, Bq, 20, k)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    if k == 1:  # the dynamic rule really splits rows here (some normalised, some not): IS would not pass
        plain = np.exp(20 * S)
        rows_plain = [np.allclose(ref[i], plain[i]) for i in range(len(S))]
        assert any(rows_plain) and not all(rows_plain)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dbnorm_equals_formula(sims, dynamic):
    S, Bq, Bg, _ = sims
    got = hubness.db_norm(S, Bq, Bg, beta_q=20, beta_g=10, dynamic=dynamic)
    np.testing.assert_allclose(got, ref_dbnorm(S, Bq, Bg, 20, 10, dynamic), rtol=1e-9)


@pytest.mark.parametrize("local", [False, True])
def test_invgc_equals_formula(sims, local):
    _, _, _, (q, g, bq, bg) = sims
    got = hubness.invgc(g, query_bank=bq, local_adj=local, r_q=0.5, pool_rate=0.2)
    np.testing.assert_allclose(got, ref_invgc(g, bq, 0.5, local, 0.2), atol=1e-6)
    both = hubness.invgc(g, query_bank=bq, gallery_bank=bg, local_adj=local, r_q=0.5, r_g=0.3, pool_rate=0.2)
    avg = ref_invgc(g, bq, 0.5, local, 0.2) + ref_invgc(g, bg, 0.3, local, 0.2)
    np.testing.assert_allclose(both, avg / np.linalg.norm(avg, axis=1, keepdims=True), atol=1e-6)


def test_corrected_similarities_dispatch(sims):
    _, _, _, (q, g, bq, bg) = sims
    S = q @ g.T
    np.testing.assert_allclose(hubness.corrected_similarities(q, g, "none"), S)
    np.testing.assert_allclose(
        hubness.corrected_similarities(q, g, "qbnorm", query_bank=bq, log=False),
        ref_is(S, bq @ g.T, 20),
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        hubness.corrected_similarities(
            q, g, "dbnorm-dynamic", query_bank=bq, gallery_bank=bg, beta_g=5, log=False
        ),
        ref_dbnorm(S, bq @ g.T, bg @ g.T, 20, 5, True),
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        hubness.corrected_similarities(q, g, "localadj", query_bank=bq, r_q=0.5, pool_rate=0.2),
        q @ ref_invgc(g, bq, 0.5, True, 0.2).T,
        atol=1e-6,
    )
    with pytest.raises(ValueError):
        hubness.corrected_similarities(q, g, "dbnorm", query_bank=bq)


def test_bank_offsets_and_hub_mask(sims):
    _, Bq, _, (q, g, bq, _) = sims
    lse = hubness.bank_offsets(bq, g, beta=20, chunk=7)
    np.testing.assert_allclose(
        lse, [math.log(sum(math.exp(20 * v) for v in Bq[:, j])) for j in range(Bq.shape[1])]
    )
    np.testing.assert_array_equal(hubness.hub_mask(bq, g, chunk=3), hubness.activation_set(Bq))


# -- the folded index -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_data():
    """Clustered items with real hubs: queries (and the text bank) share an offset direction u, like the
    modality gap, and the first 30 gallery items lean towards u, so they are near many queries."""
    rng = np.random.default_rng(1)
    d = 32
    centres = unit(rng, 40, d)
    u = unit(rng, 1, d)[0]

    def cloud(n, s, shift=0.0):
        x = centres[rng.integers(0, 40, n)] + s * rng.standard_normal((n, d)) / math.sqrt(d) + shift * u
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    g = cloud(3000, 1.0)
    g[:30] = cloud(30, 1.0, shift=1.5)  # hubs
    return g, cloud(60, 1.0, shift=0.7), cloud(800, 1.0, shift=0.7), cloud(400, 1.0)


def explicit(norm, q, g, tb, ib, modality="text", beta=20.0):
    S = q.astype(np.float64) @ g.T.astype(np.float64)
    qb = tb if modality == "text" else ib
    if norm == "none":
        return S
    if norm.startswith("qbnorm"):
        return hubness.qb_norm(S, qb @ g.T, beta=beta, dynamic=norm.endswith("dynamic"), log=True)
    return hubness.db_norm(
        S, qb @ g.T, ib @ g.T, beta_q=beta, beta_g=beta, dynamic=norm.endswith("dynamic"), log=True
    )


def check_same_ranking(scores, ids, ref, k=10, tol=1e-4):
    """Our top-k is the reference top-k (up to near-ties) and our scores are the reference values."""
    rows = np.vectorize(int)(ids)
    for i in range(len(ref)):
        kth = np.sort(ref[i])[::-1][k - 1]
        assert np.all(ref[i, rows[i]] >= kth - tol), f"query {i}: an item outside the reference top-{k}"
        np.testing.assert_allclose(scores[i], ref[i, rows[i]], atol=2e-3, rtol=1e-5)


def recall_vs(ids, ref, k=10):
    rows = np.vectorize(int)(ids)
    top = np.argsort(-ref, axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, top, strict=True)]))


@pytest.fixture(scope="module")
def flat_with_banks(hub_data):
    g, _, tb, ib = hub_data
    idx = SearchIndex.from_vectors(g, kind="flat")
    idx.set_bank("text", tb, beta=20, refresh=False)
    idx.set_bank("image", ib, beta=20)
    return idx


@pytest.mark.parametrize("norm", ["none", "qbnorm", "qbnorm-dynamic", "dbnorm", "dbnorm-dynamic"])
@pytest.mark.parametrize("modality", ["text", "image"])
def test_folded_flat_index_equals_explicit(hub_data, flat_with_banks, norm, modality):
    g, q, tb, ib = hub_data
    scores, ids = flat_with_banks.search_vectors(q, k=10, norm=norm, modality=modality)
    check_same_ranking(scores, ids, explicit(norm, q, g, tb, ib, modality))


def test_correction_changes_results_and_demotes_hubs(hub_data, flat_with_banks):
    """Guard against a no-op fold: the hubs (rows < 30) dominate plain results and QB-Norm demotes them."""
    g, q, tb, ib = hub_data
    _, plain = flat_with_banks.search_vectors(q, k=10)
    _, fixed = flat_with_banks.search_vectors(q, k=10, norm="qbnorm")
    hub_share = lambda ids: np.mean(np.vectorize(int)(ids) < 30)  # noqa: E731
    assert hub_share(fixed) < hub_share(plain)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "binary"])
@pytest.mark.parametrize("norm", ["qbnorm", "dbnorm-dynamic"])
def test_folded_approximate_kinds_recall(hub_data, kind, norm):
    g, q, tb, ib = hub_data
    idx = SearchIndex.from_vectors(g, kind=kind)
    idx.set_bank("text", tb, refresh=False)
    idx.set_bank("image", ib)
    _, ids = idx.search_vectors(q, k=10, norm=norm)
    assert recall_vs(ids, explicit(norm, q, g, tb, ib)) >= 0.95


def test_banks_survive_save_add_delete(hub_data, tmp_path):
    g, q, tb, ib = hub_data
    idx = SearchIndex.from_vectors(g[:2500], ids=[f"i{i}" for i in range(2500)], kind="flat")
    idx.set_bank("text", tb, refresh=False)
    idx.set_bank("image", ib)
    idx.save(tmp_path / "idx")
    idx = open_index(tmp_path / "idx")
    from xmodal.index.embed import Embedded

    extra = [{"id": f"i{i}", "caption": "", "captions": []} for i in range(2500, 3000)]
    idx.add_embedded(Embedded(rows=extra, vectors=g[2500:], thumbs=[None] * 500, caption_vectors=None))
    gone = [f"i{i}" for i in range(0, 3000, 7)]
    idx.delete(gone)
    idx.save()
    idx = open_index(tmp_path / "idx")
    keep = np.array([i % 7 != 0 for i in range(3000)])
    kept = g[keep]
    for norm in ("qbnorm", "dbnorm-dynamic"):
        scores, ids = idx.search_vectors(q, k=10, norm=norm)
        ref = explicit(norm, q, kept, tb, ib)
        # map ids back to rows of `kept`
        row_of = {f"i{i}": r for r, i in enumerate(np.flatnonzero(keep))}
        check_same_ranking(scores, np.vectorize(row_of.__getitem__)(ids), ref)


def test_invgc_in_the_index_equals_explicit(hub_data):
    g, q, tb, ib = hub_data
    idx = SearchIndex.from_vectors(g, kind="flat")
    idx.set_bank("text", tb, refresh=False)
    idx.set_bank("image", ib, refresh=False)
    idx.set_invgc("localadj", r_q=0.3, r_g=0.3, pool_rate=0.01)
    scores, ids = idx.search_vectors(q, k=10)
    ref = q.astype(np.float64) @ hubness.invgc(g, tb, ib, r_q=0.3, r_g=0.3, local_adj=True, pool_rate=0.01).T
    check_same_ranking(scores, ids, ref)
    assert recall_vs(ids, q @ g.T) < 1.0  # InvGC did change the ranking


def test_norm_without_bank_is_a_clear_error(hub_data):
    from xmodal.errors import UserError

    idx = SearchIndex.from_vectors(hub_data[0][:100], kind="flat")
    with pytest.raises(UserError, match="no text bank"):
        idx.search_vectors(hub_data[1], norm="qbnorm")
    with pytest.raises(UserError, match="--norm"):
        idx.search_vectors(hub_data[1], norm="bogus")
