"""Index parameters that follow the collection size, and the binary codes' HNSW/IVF Hamming indexes."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from tests.test_index_recall import exact_topk, gaussian_mixture, recall_at
from xmodal.errors import UserError
from xmodal.hashing.heads import HashHeads
from xmodal.index import SearchIndex, ann, open_index
from xmodal.index.binary import LearnedCoder
from xmodal.index.embed import Embedded

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_grow_with_n_and_user_options_win():
    p = ann.auto_params
    assert [p("hnsw", n, 512, {})["ef_search"] for n in (1_000, 100_000, 1_000_000)] == [128, 128, 405]
    assert p("hnsw", 10**6, 512, {})["rerank"] == 0 and p("flat", 10**6, 512, {})["rerank"] == 0
    ivf = p("ivfpq", 10**6, 512, {})
    assert (ivf["nlist"], ivf["nprobe"], ivf["rerank"], ivf["pq_m"]) == (1000, 250, 316, 64)
    assert p("ivfpq", 1_000, 512, {})["nprobe"] == 8 and p("ivfpq", 1_000, 512, {})["rerank"] == 100
    binary = [p("binary", n, 512, {})["rerank"] for n in (3_000, 100_000, 1_000_000)]
    assert binary == [100, 100, 1000]
    assert p("binary", 10**6, 512, {"bits": 128})["rerank"] == 2000  # shorter codes: a deeper pool
    assert p("binary", 10**6, 512, {})["binary_index"] == "flat"
    assert p("binary", 3 * 10**6, 512, {})["binary_index"] == "ivf"
    mine = {"rerank": 7, "ef_search": 33, "nprobe": 3, "nlist": 50, "binary_index": "hnsw"}
    assert p("hnsw", 10**6, 512, mine)["ef_search"] == 33
    assert (p("ivfpq", 10**6, 512, mine)["nprobe"], p("ivfpq", 10**6, 512, mine)["rerank"]) == (3, 7)
    assert p("binary", 10**6, 512, mine)["binary_index"] == "hnsw"
    assert p("binary", 10**6, 512, {"rerank": 0})["rerank"] == 0


def test_add_moves_the_search_time_parameters_with_the_new_size(monkeypatch):
    monkeypatch.setattr(ann, "pq_rerank", lambda n: n)  # a visible function of n
    x = gaussian_mixture(900, d=32, clusters=20)
    idx = SearchIndex.from_vectors(x[:600], kind="ivfpq")
    assert idx.info["params"]["rerank"] == 600
    nlist = idx.info["params"]["nlist"]
    idx.add_embedded(
        Embedded(
            vectors=x[600:],
            rows=[{"id": f"n{i}"} for i in range(300)],
            thumbs=[None] * 300,
            caption_vectors=None,
        )
    )
    assert idx.info["params"]["rerank"] == 900 and idx.info["params"]["nlist"] == nlist  # structure kept
    kept = SearchIndex.from_vectors(x[:600], kind="ivfpq", rerank=40)
    kept.add_embedded(
        Embedded(
            vectors=x[600:],
            rows=[{"id": f"n{i}"} for i in range(300)],
            thumbs=[None] * 300,
            caption_vectors=None,
        )
    )
    assert kept.info["params"]["rerank"] == 40  # the user's depth stays


@pytest.fixture(scope="module")
def clustered():
    x = gaussian_mixture(8_100, d=64, clusters=60)
    g, q = x[:8_000], x[8_000:]
    return g, q, exact_topk(q, g, 10)


@pytest.mark.parametrize(
    "structure,faiss_type", [("hnsw", faiss.IndexBinaryHNSW), ("ivf", faiss.IndexBinaryIVF)]
)
def test_binary_codes_in_hnsw_and_ivf_hamming_indexes(clustered, tmp_path, structure, faiss_type):
    g, q, truth = clustered
    flat = SearchIndex.from_vectors(g, kind="binary", bits=64, rerank=0)
    idx = SearchIndex.from_vectors(g, kind="binary", bits=64, rerank=0, binary_index=structure)
    assert isinstance(idx.ann, faiss_type) and idx.info["params"]["binary_index"] == structure
    if structure == "ivf":
        assert idx.info["params"]["nprobe"] == ann.ivf_nprobe(idx.info["params"]["nlist"])
    # Hamming-only results: the approximate structure finds most of what the exhaustive scan finds.
    _, r_flat = flat.search_rows(q, 10)
    _, r = idx.search_rows(q, 10)
    assert recall_at(r, r_flat) > 0.6
    # With the default re-rank the exact top 10 is found (the float vectors fix the order).
    full = SearchIndex.from_vectors(g, kind="binary", bits=64, binary_index=structure)
    assert recall_at(full.search_rows(q, 10)[1], truth) >= 0.9
    full.save(tmp_path / "i")
    again = open_index(tmp_path / "i")
    assert isinstance(again.ann, faiss_type)
    assert np.array_equal(again.search_rows(q, 10)[1], full.search_rows(q, 10)[1])
    again.delete(["5", "17"])
    again.add_embedded(
        Embedded(
            vectors=g[:2] * -1, rows=[{"id": "a"}, {"id": "b"}], thumbs=[None, None], caption_vectors=None
        )
    )
    _, ids = again.search_vectors(-g[:2], k=1)
    assert [i[0] for i in ids] == ["a", "b"] and "5" not in set(again.search_vectors(g[5:6], k=5)[1][0])


def test_learned_codes_in_a_binary_hnsw(clustered):
    g, q, _ = clustered
    torch.manual_seed(0)
    coder = LearnedCoder.from_heads(HashHeads(64, 32, "recurrent", steps=2))
    flat = SearchIndex.from_vectors(g, kind="learned-binary", coder=coder, rerank=0)
    hnsw = SearchIndex.from_vectors(g, kind="learned-binary", coder=coder, rerank=0, binary_index="hnsw")
    assert isinstance(flat.ann, faiss.IndexBinaryFlat) and isinstance(hnsw.ann, faiss.IndexBinaryHNSW)
    assert flat.info["params"]["bits"] == hnsw.info["params"]["bits"] == 64
    assert recall_at(hnsw.search_rows(q, 10)[1], flat.search_rows(q, 10)[1]) > 0.6


def test_bad_binary_index_is_a_one_line_error(clustered):
    with pytest.raises(UserError, match="--binary-index lsh") as e:
        SearchIndex.from_vectors(clustered[0][:100], kind="binary", binary_index="lsh")
    assert "\n" not in str(e.value)


def test_fit_bebr_on_plain_vectors_gives_codes_better_than_untrained_heads():
    """`xmodal.hashing.fit.fit_bebr`: learned codes for precomputed embeddings (no run): Hamming-only
    recall@10 improves over the same heads untrained, and the heads are one shared network."""
    from xmodal.hashing.fit import fit_bebr

    x = gaussian_mixture(2_050, d=32, clusters=30)
    g, q = x[:2_000], x[2_000:]
    truth = exact_topk(q, g, 10)

    def recall(steps):
        heads = fit_bebr(g, bits=8, code_steps=4, hidden=32, train_steps=steps, batch_size=256)
        assert heads.shared and heads.total_bits == 32
        idx = SearchIndex.from_vectors(
            g, kind="learned-binary", coder=LearnedCoder.from_heads(heads), rerank=0
        )
        return recall_at(idx.search_rows(q, 10)[1], truth)

    before, after = recall(0), recall(150)
    assert after > before + 0.05, (before, after)
