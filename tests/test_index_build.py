"""`xmodal index build/add/delete/bank/info` and `xmodal search` end to end on tiny data,
plus the Python API."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli, write_tiny_manifest
from conftest import run_in_process as cli
from PIL import Image

from xmodal.errors import UserError
from xmodal.index import SearchIndex, add_bank, add_to_index, build_index, delete_from_index, open_index
from xmodal.models import load_encoder


@pytest.fixture(autouse=True)
def _one_thread():
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("xm-micro")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One CLI-built index (with caption gallery), reused by the read-only tests below."""
    root = tmp_path_factory.mktemp("built")
    manifest = write_tiny_manifest(root / "data", n=40)
    out = root / "idx"
    proc = run_cli(
        "index",
        "build",
        "xm-micro",
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--chunk-size",
        "16",
        "--caption-gallery",
        "--no-progress",
    )
    return manifest, out, proc


def test_build_writes_the_index_directory_contract(built):
    manifest, out, proc = built
    for name in ("index.json", "meta.parquet", "vectors.npy", "ann.faiss", "captions.npy", "thumbs.bin"):
        assert (out / name).is_file(), name
    info = json.loads((out / "index.json").read_text())
    for key in ("model", "dim", "kind", "normalisation", "created", "count", "image_size"):
        assert key in info
    assert info["count"] == 40 and info["dim"] == 32 and info["image_size"] == 32 and info["kind"] == "flat"
    assert info["model"]["source"] == "xm-micro"
    meta = pq.read_table(out / "meta.parquet")
    assert meta.num_rows == 40
    assert {"id", "path", "caption", "label"} <= set(meta.column_names)
    assert Path(meta.column("path")[0].as_py()).is_file()
    assert np.load(out / "vectors.npy").shape == (40, 32)
    assert not (out.parent / f"{out.name}.work").exists()  # work chunks removed after success
    assert "3 chunk(s) computed, 0 reused" in proc.stderr


def test_index_loads_without_the_model(built):
    _, out, _ = built
    idx = open_index(out)
    assert idx._encoder is None
    vecs = np.load(out / "vectors.npy")
    scores, ids = idx.search_vectors(vecs[:3], k=5)
    assert list(ids[:, 0]) == idx.ids[:3]
    assert idx._encoder is None  # vector search never touched the model
    assert idx.item(idx.ids[0])["caption"]
    assert idx.thumbnail(idx.ids[0])[:2] == b"\xff\xd8"  # JPEG


def test_search_cli_text_image_and_captions(built):
    _, out, _ = built
    idx = open_index(out)
    table = run_cli("search", str(out), "a red circle", "--k", "5").stdout
    assert "score" in table and sum(i in table for i in idx.ids) == 5
    img = open_index(out).item(idx.ids[7])["path"]
    hits = json.loads(cli("search", str(out), "--image", img, "--k", "3", "--json").stdout)
    assert hits[0]["id"] == idx.ids[7] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    caps = json.loads(cli("search", str(out), "--image", img, "--captions", "--json", "--k", "4").stdout)
    assert len(caps) == 4 and all("caption" in c for c in caps)


def test_python_search_text_matches_cli_model(built, encoder):
    _, out, _ = built
    idx = open_index(out)
    hits = idx.search_text("a red circle", k=3)
    q = encoder.encode_texts(["a red circle"]).numpy()
    _, ids = idx.search_vectors(q, k=3)
    assert [h["id"] for h in hits] == list(ids[0])  # the recorded model reloads to the same weights


def test_bad_input_is_one_line_error(built, tmp_path):
    manifest, out, _ = built
    cases = [
        ("index", "build", "xm-micro", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")),
        (
            "index",
            "build",
            "xm-micro",
            "--data",
            str(manifest),
            "--out",
            str(tmp_path / "x"),
            "--kind",
            "bogus",
        ),
        (
            "index",
            "build",
            "xm-micro",
            "--data",
            str(manifest),
            "--out",
            str(tmp_path / "x"),
            "--kind",
            "binary",
            "--bits",
            "12",
        ),
        ("search", str(tmp_path / "missing"), "hello"),
        ("search", str(out), "   "),
        ("search", str(out), "hello", "--norm", "qbnorm"),
    ]
    for i, args in enumerate(cases):
        proc = (run_cli if i == 0 else cli)(*args, check=False)  # one real process, the rest in-process
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1].startswith("error:"), proc.stderr
        assert "Traceback" not in proc.stderr
    assert "xmodal index bank" in proc.stderr  # the last case says how to fix it


def test_add_delete_bank_cli(tmp_path):
    a = write_tiny_manifest(tmp_path / "a", n=24, seed=1)
    b = write_tiny_manifest(tmp_path / "b", n=8, seed=2)
    # b's file names collide with a's (img_000.png…): give them their own names
    rows = [json.loads(x) for x in b.read_text().splitlines()]
    for r in rows:
        new = "extra_" + r["image"]
        os.rename(b.parent / r["image"], b.parent / new)
        r["image"] = new
    b.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "idx"
    cli("index", "build", "xm-micro", "--data", str(a), "--out", str(out), "--kind", "hnsw", "--no-progress")
    cli("index", "add", str(out), "--data", str(b), "--no-progress")
    idx = open_index(out)
    assert len(idx) == 32 and "extra_img_003.png" in idx.ids
    cli("index", "delete", str(out), "--ids", "img_000.png,extra_img_003.png,not-there")
    idx = open_index(out)
    assert len(idx) == 30 and "img_000.png" not in idx.ids and "extra_img_003.png" not in idx.ids
    _, ids = idx.search_vectors(idx.vectors, k=30)
    assert "img_000.png" not in set(ids.ravel())
    texts = tmp_path / "bank.txt"
    texts.write_text("a red circle\na green square\n\na blue circle\n")
    cli("index", "bank", str(out), "--texts", str(texts), "--no-progress")
    cli("index", "bank", str(out), "--data", str(a), "--no-progress")
    info = open_index(out).info
    # each bank call replaces the banks it gives: --data's captions are now the text bank
    assert info["banks"]["text"]["count"] == 48 and info["banks"]["image"]["count"] == 24
    for norm in ("qbnorm-dynamic", "dbnorm"):
        hits = json.loads(cli("search", str(out), "a red circle", "--norm", norm, "--json").stdout)
        assert len(hits) == 10
    info_out = json.loads(cli("index", "info", str(out)).stdout)
    assert info_out["count"] == 30


def test_every_kind_via_api_finds_items_by_their_own_image(tmp_path, encoder):
    from xmodal.data import load_dataset

    manifest = write_tiny_manifest(tmp_path / "d", n=120, seed=3)
    data = load_dataset(manifest, encoder.image_size, use_cache=False, progress=False)
    for kind in ("flat", "hnsw", "ivfpq", "binary", "IVF4,Flat"):
        idx = build_index(
            encoder,
            data,
            tmp_path / f"idx-{kind}",
            kind=kind,
            bits=64,
            chunk_size=50,
            progress=False,
            log=lambda m: None,
        )
        assert len(idx) == 120
        again = open_index(tmp_path / f"idx-{kind}", encoder=encoder)
        assert again.kind == (kind if kind != "ivfpq" else "ivfpq")
        hits = again.search_image(data.images[5], k=3)
        assert hits[0]["id"] == data.keys[5], kind
        assert again.search_text("a red circle", k=4)


def test_undecodable_images_are_skipped_and_counted(tmp_path, encoder):
    manifest = write_tiny_manifest(tmp_path / "d", n=6)
    (manifest.parent / "img_002.png").write_bytes(b"not a png at all")
    logs: list[str] = []
    idx = build_index(encoder, manifest, tmp_path / "idx", progress=False, log=logs.append)
    assert len(idx) == 5 and "img_002.png" not in idx.ids
    assert any("corrupt_image" in m for m in logs)
    assert open_index(tmp_path / "idx").info["skipped"] == {"corrupt_image": 1}


def test_failed_save_keeps_previous_index(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, 16)).astype(np.float32)
    SearchIndex.from_vectors(v, kind="flat").save(tmp_path / "idx")
    bigger = SearchIndex.from_vectors(np.concatenate([v, v]), kind="flat")

    def boom(self, d):
        (d / "index.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(SearchIndex, "_write", boom)
    with pytest.raises(OSError):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    assert len(open_index(tmp_path / "idx")) == 50
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.tmp")] == []


def test_crash_between_renames_is_recovered(tmp_path):
    from xmodal.fsutil import backup_path

    v = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    SearchIndex.from_vectors(v).save(tmp_path / "idx")
    os.rename(tmp_path / "idx", backup_path(tmp_path / "idx"))  # as if killed right after the first rename
    assert len(open_index(tmp_path / "idx")) == 10


def test_python_api_add_delete_and_bank(tmp_path, encoder):
    a = write_tiny_manifest(tmp_path / "a", n=20, seed=4)
    idx = build_index(
        encoder,
        a,
        tmp_path / "idx",
        model_source="xm-micro",
        caption_gallery=True,
        progress=False,
        log=lambda m: None,
    )
    assert idx.has_captions and len(idx.caption_vectors) == 40
    n = delete_from_index(tmp_path / "idx", ["img_001.png"], log=lambda m: None)
    assert n == 1
    again = open_index(tmp_path / "idx", encoder=encoder)
    assert len(again) == 19 and len(again.caption_vectors) == 38
    assert all(i != "img_001.png" for i in again.caption_meta.column("id").to_pylist())
    with pytest.raises(UserError, match="already"):
        add_to_index(tmp_path / "idx", a, encoder=encoder, log=lambda m: None)
    b = write_tiny_manifest(tmp_path / "b", n=3, seed=5)
    for i in range(3):  # distinct ids from a's
        (b.parent / f"img_{i:03d}.png").rename(b.parent / f"b_{i}.png")
    b.write_text(
        b.read_text()
        .replace('"img_', '"b_')
        .replace("_000.png", "_0.png")
        .replace("_001.png", "_1.png")
        .replace("_002.png", "_2.png")
    )
    assert again.add(b) == 3 and len(again) == 22 and len(again.caption_vectors) == 44
    assert again.search_image(Image.open(b.parent / "b_1.png"), k=1)[0]["id"] == "b_1.png"
    again.save()
    assert len(open_index(tmp_path / "idx")) == 22
    add_bank(tmp_path / "idx", texts=["a red circle", "a blue square"], encoder=encoder, log=lambda m: None)
    assert open_index(tmp_path / "idx").available_norms("text") == ["none", "qbnorm", "qbnorm-dynamic"]
    with pytest.raises(UserError):
        add_bank(tmp_path / "idx", log=lambda m: None)


def test_duplicate_keys_get_unique_ids(tmp_path, encoder):
    m = write_tiny_manifest(tmp_path / "d", n=3)
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    sub = m.parent / "sub"
    sub.mkdir()
    shutil.copy(m.parent / rows[0]["image"], sub / rows[0]["image"])
    rows.append({**rows[0], "image": f"sub/{rows[0]['image']}"})
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    idx = build_index(encoder, m, tmp_path / "idx", progress=False, log=lambda m: None)
    assert len(set(idx.ids)) == len(idx.ids) == 4
