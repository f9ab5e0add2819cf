"""`SearchIndex.optimize` / `xmodal index optimize`: an ANN trained on a small first collection (IVF-PQ, ITQ,
LSH) is retrained on the grown one. Items, vectors and banks stay; only the ANN changes, and recall against
exact search gets better on the shifted data. Synthetic vectors, except the one CLI test (xm-micro)."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from conftest import run_in_process as cli
from conftest import write_tiny_manifest

from xmodal.errors import UserError
from xmodal.index import SearchIndex, open_index
from xmodal.index.embed import Embedded
from xmodal.index.mutation import has_trained_parts, optimize_index

D, N_FIRST, N_ADDED = 64, 100, 2000
TRAINED = [
    ("ivfpq", {"rerank": 20}),
    ("binary", {"rerank": 20, "bits": 64}),
    ("binary", {"rerank": 20, "bits": 64, "binary_method": "lsh"}),
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def first_set(n: int = N_FIRST, seed: int = 0) -> np.ndarray:
    """Isotropic directions: what the index is first trained on."""
    return unit(np.random.default_rng(seed).standard_normal((n, D)))


def shifted_set(n: int, seed: int) -> np.ndarray:
    """Another distribution: an offset mean and a 12-dim subspace, plus a little noise."""
    rng = np.random.default_rng(seed)
    mean = np.zeros(D)
    mean[:4] = 2.5
    basis = np.random.default_rng(99).standard_normal((12, D)) / np.sqrt(12)
    return unit(mean + rng.standard_normal((n, 12)) @ basis + 0.15 * rng.standard_normal((n, D)))


def added(vectors: np.ndarray, prefix: str = "b") -> Embedded:
    rows = [{"id": f"{prefix}{i}", "caption": f"item {i}"} for i in range(len(vectors))]
    return Embedded(rows=rows, vectors=vectors, thumbs=[None] * len(vectors), caption_vectors=None)


def grown(kind: str, opts: dict, n_added: int = N_ADDED) -> SearchIndex:
    """Trained on N_FIRST isotropic vectors, then grown by n_added shifted ones."""
    idx = SearchIndex.from_vectors(first_set(), ids=[f"a{i}" for i in range(N_FIRST)], kind=kind, **opts)
    idx.add_embedded(added(shifted_set(n_added, seed=1)))
    return idx


def recall(idx: SearchIndex, q: np.ndarray, k: int = 10) -> float:
    _, rows = idx.search_rows(q, k)
    exact = np.argsort(-(q @ np.asarray(idx.vectors).T), axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, exact, strict=True)]))


def trained_parts(idx: SearchIndex) -> list[np.ndarray]:
    """The fitted arrays of the ANN: IVF centroids and PQ codebooks, or the binary code's mean/projection."""
    if idx.kind == "binary":
        return [idx.coder.mean.copy(), idx.coder.projection.copy()]
    ivf = faiss.extract_index_ivf(idx.ann)
    return [ivf.quantizer.reconstruct_n(0, ivf.nlist), faiss.vector_to_array(idx.ann.pq.centroids)]


@pytest.mark.parametrize(("kind", "opts"), TRAINED, ids=["ivfpq", "itq", "lsh"])
def test_optimize_retrains_the_ann_and_keeps_every_item(kind, opts):
    idx = grown(kind, opts)
    ids, vectors, meta = list(idx.ids), np.array(idx.vectors), idx.meta
    queries = shifted_set(200, seed=5)
    before, parts = recall(idx, queries), trained_parts(idx)
    assert idx.info["trained_on"] == N_FIRST

    res = idx.optimize()

    assert res["retrained"] and res["trained_on_before"] == N_FIRST and res["trained_on"] == len(idx)
    assert idx.info["trained_on"] == N_FIRST + N_ADDED
    assert idx.ids == ids and np.array_equal(idx.vectors, vectors) and idx.meta.equals(meta)
    assert idx.ann.ntotal == len(idx)
    after = trained_parts(idx)
    assert any(a.shape != b.shape or not np.allclose(a, b) for a, b in zip(parts, after, strict=True))
    if kind == "ivfpq":  # the N-dependent settings follow the collection: more lists, 8-bit codes
        assert idx.info["params"]["nlist"] > 2 and idx.info["params"]["pq_nbits"] == 8
    # every item's own vector finds it first (exact re-ranking of its candidates)
    _, top = idx.search_rows(vectors, 1)
    assert np.array_equal(top[:, 0], np.arange(len(idx)))
    # recall against exact search on the shifted data improves
    assert recall(idx, queries) > before
    # and the ANN is the one a fresh build on all the vectors would make
    fresh = SearchIndex.from_vectors(vectors, ids=ids, kind=kind, **opts)
    s1, r1 = idx.search_rows(queries, 10)
    s2, r2 = fresh.search_rows(queries, 10)
    assert np.array_equal(r1, r2) and np.allclose(s1, s2)


def test_reranked_results_equal_exact_search_where_recall_is_high():
    """Every IVF list probed, a deep re-rank: after optimize the top 10 are exact search's, row for row."""
    idx = grown("ivfpq", {"rerank": 400, "nprobe": 10_000})
    idx.optimize()
    assert idx.info["params"]["nprobe"] == idx.info["params"]["nlist"]
    q = shifted_set(100, seed=7)  # (isotropic queries have no clear neighbours: 0.3 vs 0.29 cosines)
    scores, rows = idx.search_rows(q, 10)
    exact = q @ np.asarray(idx.vectors).T
    want = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    assert np.array_equal(rows, want)
    assert np.allclose(scores, np.take_along_axis(exact, want, 1), atol=1e-5)


@pytest.mark.parametrize(("kind", "opts"), TRAINED[:2], ids=["ivfpq", "itq"])
def test_the_optimized_index_reloads_with_the_same_results(tmp_path, kind, opts):
    path = tmp_path / "idx"
    grown(kind, opts).save(path)
    mem = open_index(path, mmap=False)
    mem.optimize()
    res = optimize_index(path, log=lambda m: None)  # the CLI's path: lock, open, optimize, atomic save
    assert res["retrained"] and res["trained_on"] == N_FIRST + N_ADDED
    disk = open_index(path)
    assert disk.info["trained_on"] == N_FIRST + N_ADDED and disk.info["params"] == mem.info["params"]
    assert disk.ids == mem.ids and np.array_equal(disk.vectors, mem.vectors)
    q = shifted_set(100, seed=9)
    s1, r1 = mem.search_rows(q, 10)
    s2, r2 = disk.search_rows(q, 10)
    assert np.array_equal(r1, r2) and np.allclose(s1, s2)
    # once current, a second run keeps it unless forced
    again = optimize_index(path, log=lambda m: None)
    assert not again["retrained"] and "already trained" in again["reason"]
    assert optimize_index(path, force=True, log=lambda m: None)["retrained"]


def test_banks_and_deletions_are_kept():
    """The folded hubness columns of the banks go into the retrained ANN; deleted items stay deleted."""
    idx = grown("ivfpq", {"rerank": 50})
    idx.delete([f"b{i}" for i in range(0, 300, 3)])
    idx.set_bank("text", shifted_set(200, seed=11))
    bank, lse, ids = idx.banks["text"].copy(), idx.bank_lse.copy(), list(idx.ids)
    idx.optimize()
    assert idx.ids == ids and "b0" not in idx.ids and idx.row_of("b3") is None
    assert np.array_equal(idx.banks["text"], bank) and np.array_equal(idx.bank_lse, lse)
    assert idx.ann.ntotal == len(idx) and idx.ann.d == idx.ann_dim() > D
    q = shifted_set(20, seed=12)
    s, r = idx.search_rows(q, 5, norm="qbnorm")
    assert (r >= 0).all() and np.isfinite(s).all()


def test_add_suggests_optimize_once_the_collection_outgrows_its_training():
    idx = SearchIndex.from_vectors(first_set(), kind="ivfpq")
    idx.add_embedded(added(shifted_set(N_FIRST, seed=2)))  # 2× trained_on: not yet
    assert idx.info["trained_on"] == N_FIRST and idx.training_hint() is None
    idx.add_embedded(added(shifted_set(10, seed=3), prefix="c"))
    hint = idx.training_hint()
    assert hint and "xmodal index optimize" in hint and f"trained on {N_FIRST} items" in hint
    idx.optimize()
    assert idx.training_hint() is None
    # kinds without fitted parts never ask
    flat = SearchIndex.from_vectors(first_set(10), kind="flat")
    flat.add_embedded(added(shifted_set(100, seed=4)))
    assert flat.training_hint() is None


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_kinds_without_trained_parts_are_left_alone(kind):
    """flat and HNSW (delete refills them: no tombstones) have nothing to retrain — nor has ivfpq while
    its collection is too small for a codebook (it is searched exactly)."""
    idx = SearchIndex.from_vectors(first_set(40), kind=kind)
    idx.add_embedded(added(shifted_set(20, seed=6)))
    ann = idx.ann
    res = idx.optimize(force=True)
    assert not res["retrained"] and "nothing to retrain" in res["reason"] and idx.ann is ann
    assert has_trained_parts("IVF4,Flat", D) and not has_trained_parts("HNSW16", D)


def test_a_crash_while_writing_leaves_the_previous_index(tmp_path, monkeypatch):
    """optimize writes through `save` (temp folder, then one atomic swap): failing before the swap keeps
    the old directory intact and leaves no temp folder."""
    from xmodal import fsutil

    path = tmp_path / "idx"
    grown("binary", {"bits": 64}).save(path)

    def crash(tmp, final):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fsutil, "replace_dir", crash)
    with pytest.raises(OSError, match="simulated"):
        optimize_index(path, log=lambda m: None)
    monkeypatch.undo()
    old = open_index(path)
    assert old.info["trained_on"] == N_FIRST and len(old) == N_FIRST + N_ADDED
    assert not list(tmp_path.glob(".idx.tmp-*"))
    with pytest.raises(UserError, match="not an xmodal index"):
        optimize_index(tmp_path / "missing", log=lambda m: None)
    assert not (tmp_path / ".missing.lock").exists()


def test_cli_add_suggests_and_optimize_retrains(tmp_path):
    small = write_tiny_manifest(tmp_path / "data", n=6, seed=1)
    new = write_tiny_manifest(tmp_path / "data" / "new", n=14, seed=2)
    more = tmp_path / "data" / "more.jsonl"  # keys new/img_…: distinct from the first items' img_…
    rows = [json.loads(x) for x in new.read_text().splitlines()]
    more.write_text("".join(json.dumps({**r, "image": f"new/{r['image']}"}) + "\n" for r in rows))
    out = tmp_path / "idx"
    cli("index", "build", "xm-micro", "--data", small, "--out", out, "--kind", "binary", "--bits", "64",
        "--no-progress")  # fmt: skip
    add = cli("index", "add", out, "--data", more, "--no-progress")
    assert f"xmodal index optimize {out}" in add.stderr and "trained on 6 items" in add.stderr
    before = open_index(out)
    ids, vectors = before.ids, np.array(before.vectors)

    run = cli("index", "optimize", out)
    assert "retrained on 20 items (was 6)" in run.stderr
    info = json.loads(cli("index", "info", out).stdout)
    assert info["trained_on"] == 20 and info["count"] == 20
    after = open_index(out)
    assert after.ids == ids and np.array_equal(after.vectors, vectors)
    _, top = after.search_rows(vectors, 1, modality="image")
    assert np.array_equal(top[:, 0], np.arange(20))
    assert "already trained on all 20" in cli("index", "optimize", out).stderr

    flat = tmp_path / "flat"
    SearchIndex.from_vectors(first_set(10), kind="flat").save(flat)
    note = cli("index", "optimize", flat)
    assert note.returncode == 0 and "nothing to retrain" in note.stderr
    bad = cli("index", "optimize", tmp_path / "nope", check=False)
    assert bad.returncode != 0 and "not an xmodal index" in bad.stderr
