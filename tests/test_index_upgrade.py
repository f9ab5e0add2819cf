"""`xmodal index upgrade / rollback / backfill`: a new model's queries on the old gallery, an exact undo,
a crash-safe re-embedding, and merged search while it is partial."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO_TRAIN, run_in_process, sigkill_at_line, write_tiny_manifest

from xmodal.errors import UserError
from xmodal.index import open_index
from xmodal.index.embed import TEST_DELAY_ENV

N, CHUNK = 20, 4  # five backfill chunks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, the new model (an xm-micro run: the old model is xm-micro's seeded random init, same width),
    a pristine old index, and a reference index built directly with the new model."""
    root = tmp_path_factory.mktemp("upgrade")
    data = write_tiny_manifest(root / "data", n=N, seed=3)
    new = root / "new"
    run_in_process("train", "--data", data, "--out", new, *MICRO_TRAIN, "--steps", "3", "--lr", "0.01")
    old_index = root / "old_index"
    run_in_process("index", "build", "xm-micro", "--data", data, "--out", old_index, "--no-progress")
    ref = root / "ref_index"
    run_in_process("index", "build", new, "--data", data, "--out", ref, "--no-progress")
    return {"data": data, "new": new, "old_index": old_index, "ref": ref}


def _fresh(setup, tmp_path) -> Path:
    idx = tmp_path / "idx"
    shutil.copytree(setup["old_index"], idx)
    return idx


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_upgrade_then_rollback_restores_the_index_byte_for_byte(setup, tmp_path):
    idx_dir = _fresh(setup, tmp_path)
    before = _snapshot(idx_dir)
    run_in_process("index", "upgrade", idx_dir, "--model", setup["new"])
    info = json.loads((idx_dir / "index.json").read_text())
    assert info["query_model"]["model"]["source"] == str(setup["new"].absolute())
    assert [e["event"] for e in info["chain"]] == ["build", "upgrade"]
    assert _snapshot(idx_dir).keys() == before.keys()  # only index.json changed
    assert all(_snapshot(idx_dir)[k] == v for k, v in before.items() if k != "index.json")
    # a partial backfill changes index.json again and writes chunks beside the index
    run_in_process("index", "backfill", idx_dir, "--chunk-size", CHUNK, "--max-chunks", 2, "--no-progress")
    assert len(list((tmp_path / "idx.work-backfill").glob("chunk_*.npz"))) == 2
    run_in_process("index", "rollback", idx_dir)
    assert _snapshot(idx_dir) == before
    assert not (tmp_path / "idx.work-backfill").exists()
    assert open_index(idx_dir).query_model is None


def test_upgraded_index_embeds_queries_with_the_new_model(setup, tmp_path):
    idx_dir = _fresh(setup, tmp_path)
    run_in_process("index", "upgrade", idx_dir, "--model", setup["new"])
    idx = open_index(idx_dir)
    ref = open_index(setup["ref"])
    q = idx.embed_text(["a red circle"])
    np.testing.assert_allclose(q, ref.embed_text(["a red circle"]), atol=1e-6)  # the new model's
    scores, rows = idx.search_rows(q, k=N)
    want = np.asarray(idx.vectors) @ (q[0] / np.linalg.norm(q[0]))  # against the old vectors, no layer
    np.testing.assert_allclose(scores[0], np.sort(want)[::-1], atol=1e-5)
    hits = idx.hits(scores[0], rows[0])
    assert {h["embedded_by"] for h in hits} == {"old"}


def test_search_during_backfill_is_merged_and_ordered(setup, tmp_path):
    idx_dir = _fresh(setup, tmp_path)
    run_in_process("index", "upgrade", idx_dir, "--model", setup["new"])
    run_in_process("index", "backfill", idx_dir, "--chunk-size", CHUNK, "--max-chunks", 2, "--no-progress")
    idx, ref = open_index(idx_dir), open_index(setup["ref"])
    assert ref.ids == idx.ids
    view = idx.backfill_view()
    assert view.count == 2 * CHUNK and view.done[: 2 * CHUNK].all() and not view.done[2 * CHUNK :].any()
    q = idx.embed_text(["a blue square", "a green triangle"])
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    # brute force: re-embedded rows by their new vectors, the others by their old ones
    done = np.arange(N) < 2 * CHUNK
    gallery = np.where(done[:, None], np.asarray(ref.vectors), np.asarray(idx.vectors))
    brute = qn @ gallery.T
    assert np.abs(brute - qn @ np.asarray(idx.vectors).T).max() > 1e-2  # the two models' vectors differ
    for k in (3, 10, N):
        scores, rows = idx.search_rows(q, k=k)
        for i in range(len(q)):
            order = np.argsort(-brute[i], kind="stable")[:k]
            np.testing.assert_allclose(scores[i], brute[i][order], atol=1e-5)
            assert (np.diff(scores[i]) <= 1e-7).all()
            assert sorted(rows[i]) == sorted(order) and len(set(rows[i])) == k
    hits = idx.hits(*[a[0] for a in idx.search_rows(q[:1], k=N)])
    by = {h["id"]: h["embedded_by"] for h in hits}
    assert {by[i] for i in idx.ids[: 2 * CHUNK]} == {"new"} and {by[i] for i in idx.ids[2 * CHUNK :]} == {
        "old"
    }
    with pytest.raises(UserError, match="--norm qbnorm"):
        idx.search_rows(q, k=3, norm="qbnorm")
    # the HTTP API marks each hit too
    from fastapi.testclient import TestClient

    from xmodal.serve import create_app

    res = TestClient(create_app(idx_dir), base_url="http://localhost").get(
        "/search", params={"q": "a blue square", "k": N}
    )
    assert res.status_code == 200, res.text
    res = res.json()
    assert {h["id"]: h["embedded_by"] for h in res["results"]} == {
        i: ("new" if j < 2 * CHUNK else "old") for j, i in enumerate(idx.ids)
    }
    # items may not change part-way through
    r = run_in_process("index", "delete", idx_dir, "--ids", idx.ids[0], check=False)
    assert r.returncode == 2 and "backfill" in r.stderr


def test_sigkill_during_backfill_loses_no_finished_chunk(setup, tmp_path):
    idx_dir = _fresh(setup, tmp_path)
    run_in_process("index", "upgrade", idx_dir, "--model", setup["new"])
    backfill = ["index", "backfill", idx_dir, "--chunk-size", CHUNK, "--no-progress"]
    sigkill_at_line(backfill, "chunk 2/5 computed", env={TEST_DELAY_ENV: "1.0"})
    work = tmp_path / "idx.work-backfill"
    finished = sorted(work.glob("chunk_*.npz"))
    assert len(finished) >= 2
    # the killed run's chunks already answer searches
    idx = open_index(idx_dir)
    assert idx.backfill_view().count == len(finished) * CHUNK

    rerun = run_in_process("index", "backfill", idx_dir, "--chunk-size", CHUNK, "--no-progress")
    assert f"{len(finished)} of 5 chunk(s) done, {5 - len(finished)} to compute now" in rerun.stderr
    assert len(re.findall(r"^chunk \d+/5 computed", rerun.stderr, flags=re.M)) == 5 - len(finished)
    assert "backfill finished" in rerun.stderr
    done, ref = open_index(idx_dir), open_index(setup["ref"])
    assert done.query_model is None and "backfill" not in done.info and "upgrade" not in done.info
    assert done.info["model"]["source"] == str(setup["new"].absolute())
    assert [e["event"] for e in done.info["chain"]] == ["build", "upgrade", "backfill"]
    assert done.ids == ref.ids
    np.testing.assert_allclose(np.asarray(done.vectors), np.asarray(ref.vectors), atol=1e-6)
    assert not work.exists()
    hits = done.search_text("a red circle", k=3)
    assert len(hits) == 3 and "embedded_by" not in hits[0]
    assert done.thumbnail(done.ids[0]) == ref.thumbnail(ref.ids[0])


def test_upgrade_refusals_are_one_line(setup, tmp_path):
    idx_dir = _fresh(setup, tmp_path)
    r = run_in_process("index", "rollback", idx_dir, check=False)
    assert r.returncode == 2 and "no upgrade to roll back" in r.stderr
    r = run_in_process("index", "backfill", idx_dir, "--no-progress", check=False)
    assert r.returncode == 2 and "index upgrade" in r.stderr
    r = run_in_process("index", "upgrade", idx_dir, "--model", "xm-tiny", check=False)  # another width
    assert r.returncode == 2 and "--projection" in r.stderr, r.stderr
    run_in_process("index", "upgrade", idx_dir, "--model", setup["new"])
    r = run_in_process("index", "upgrade", idx_dir, "--model", setup["new"], check=False)
    assert r.returncode == 2 and "already upgraded" in r.stderr


def test_upgrade_through_a_projection_maps_the_new_queries_onto_the_old_gallery(setup, tmp_path):
    """A 128-d new model (xm-tiny) on a 32-d index (xm-micro): the projection bridges the widths; a changed
    projection file is refused on load, one fitted for another old model at upgrade time."""
    from xmodal.compat.projection import Projection

    idx_dir = _fresh(setup, tmp_path)
    rng = np.random.default_rng(0)
    proj = Projection(
        kind="linear",
        d_new=128,
        d_old=32,
        weights={"text.W": rng.normal(size=(128, 32)), "text.b": rng.normal(size=32) * 0.1},
        old_model={"source": str(tmp_path / "some-other-run")},
    )
    proj.save(tmp_path / "wrong.proj")
    wrong = tmp_path / "wrong.proj"
    r = run_in_process("index", "upgrade", idx_dir, "--model", "xm-tiny", "--projection", wrong, check=False)
    assert r.returncode == 2 and "fitted for old model" in r.stderr, r.stderr
    proj.old_model = {"source": "xm-micro"}
    proj.save(tmp_path / "v2.proj")
    run_in_process("index", "upgrade", idx_dir, "--model", "xm-tiny", "--projection", tmp_path / "v2.proj")
    idx = open_index(idx_dir)
    assert idx.query_dim == 128 and idx.dim == 32
    q = idx.embed_text(["a red circle", "a blue square"])
    assert q.shape == (2, 128)
    x = q / np.linalg.norm(q, axis=1, keepdims=True)
    y = x @ proj.weights["text.W"] + proj.weights["text.b"]  # the map by hand
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    scores, rows = idx.search_rows(q, k=N)
    for i in range(2):
        want = np.asarray(idx.vectors) @ y[i]
        np.testing.assert_allclose(scores[i], np.sort(want)[::-1], atol=1e-5)
        assert list(rows[i]) == list(np.argsort(-want, kind="stable"))
    # the image side of a text-only projection uses the text map
    img_scores, _ = idx.search_rows(
        idx.embed_image(torch.zeros(3, 64, 64, dtype=torch.uint8)), k=3, modality="image"
    )
    assert np.isfinite(img_scores).all()
    # the projection changed on disk since the upgrade: refused, naming what to do
    proj.weights["text.b"] = proj.weights["text.b"] + 1.0
    shutil.rmtree(tmp_path / "v2.proj")
    proj.save(tmp_path / "v2.proj")
    with pytest.raises(UserError, match="changed since the upgrade"):
        open_index(idx_dir).search_rows(q, k=3)


def test_rollback_after_an_add_keeps_the_new_items(setup, tmp_path):
    """Items added after the upgrade (embedded by the gallery's model, as before) survive a rollback, which
    then rewrites index.json instead of restoring it."""
    idx_dir = _fresh(setup, tmp_path)
    run_in_process("index", "upgrade", idx_dir, "--model", setup["new"])
    rows = [
        json.loads(x) for x in write_tiny_manifest(tmp_path / "more", n=3, seed=9).read_text().splitlines()
    ]
    more = tmp_path / "more.jsonl"  # ids are manifest-relative paths: more/img_000.png, …
    more.write_text("".join(json.dumps({**r, "image": f"more/{r['image']}"}) + "\n" for r in rows))
    run_in_process("index", "add", idx_dir, "--data", more, "--no-progress")
    r = run_in_process("index", "rollback", idx_dir)
    assert "items changed since the upgrade are kept" in r.stderr
    idx = open_index(idx_dir)
    assert len(idx) == N + 3 and idx.query_model is None and "upgrade" not in idx.info
    assert [e["event"] for e in idx.info["chain"]] == ["build", "upgrade", "rollback"]
