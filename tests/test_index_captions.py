"""`xmodal index build --captions generate`: items without a caption get one from the index's CoCa model,
stored in meta.parquet (marked `caption_generated`), searched in the caption gallery, saved with each
embedding chunk (a rerun after a crash keeps them) and continued by `index add`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_in_process, write_tiny_manifest
from PIL import Image

from xmodal.index import add_to_index, build_index, delete_from_index, open_index


def quiet(_msg: str) -> None:
    pass


def image_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n shape images and nothing else: no .txt captions, no manifest."""
    write_tiny_manifest(root, n=n, seed=seed)
    (root / "data.jsonl").unlink()
    return root


@pytest.fixture(scope="module")
def coca_encoder(coca_run):
    from xmodal.models import load_encoder

    return load_encoder(str(coca_run))


@pytest.fixture(scope="module")
def folder_index(coca_run, tmp_path_factory):
    """`xmodal index build COCA --data FOLDER --captions generate`, through the CLI."""
    root = tmp_path_factory.mktemp("captions")
    folder = image_folder(root / "photos", n=8)
    out = root / "photos.idx"
    run_in_process("index", "build", coca_run, "--data", folder, "--out", out, "--captions", "generate",
                   "--chunk-size", "4", "--no-progress")  # fmt: skip
    return folder, out


def test_image_folder_gets_generated_captions_that_caption_search_finds(folder_index):
    folder, out = folder_index
    meta = pq.read_table(out / "meta.parquet").to_pylist()
    assert len(meta) == 8  # every image indexed, although none has a caption
    for row in meta:
        assert row["caption"].strip() and row["captions"] == [row["caption"]], row
        assert row["caption_generated"] is True
    info = json.loads((out / "index.json").read_text())
    assert info["captions"]["mode"] == "generate" and info["captions"]["generated"] == 8
    assert info["captions"]["decoding"]["max_len"] == 30 and info["captions"]["decoding"]["beam"] == 1
    assert info["caption_gallery"] is True  # implied: generated captions are searched there
    gallery = pq.read_table(out / "captions.parquet").to_pylist()
    assert sorted((g["id"], g["caption"]) for g in gallery) == sorted((r["id"], r["caption"]) for r in meta)

    idx = open_index(out)
    hits = idx.search_captions(Image.open(folder / "img_003.png"), k=8)
    assert len(hits) == 8 and all(h["caption_generated"] is True for h in hits)
    assert {h["caption"] for h in hits} == {r["caption"] for r in meta}
    proc = run_in_process(
        "search", out, "--image", folder / "img_003.png", "--captions", "--k", "3", "--json"
    )
    cli_hits = json.loads(proc.stdout)
    assert [h["caption"] for h in cli_hits] == [h["caption"] for h in hits[:3]]


def test_generated_captions_are_the_captioners(folder_index, coca_encoder):
    """The stored caption is what `caption_images` says of the image, preprocessed as the index does."""
    import torch

    from xmodal.data import resize_center_crop
    from xmodal.models.captioner import Decoding, caption_images

    folder, out = folder_index
    meta = pq.read_table(out / "meta.parquet").to_pylist()[:4]
    x = torch.stack([resize_center_crop(Image.open(folder / r["id"]).convert("RGB"), 64) for r in meta])
    assert caption_images(coca_encoder, x, Decoding()) == [r["caption"] for r in meta]


def test_killed_build_keeps_the_generated_captions_of_finished_chunks(tmp_path, coca_encoder, monkeypatch):
    """A JSONL manifest with captions, empty captions and no caption field: only the captionless items are
    captioned; a rerun after losing the last chunk recomputes that chunk alone, with the same captions."""
    import xmodal.index.captions as gen

    src = write_tiny_manifest(tmp_path / "data", n=7)
    lines = [json.loads(x) for x in src.read_text().splitlines()]
    lines[1]["caption"] = ""
    del lines[2]["caption"]
    lines[5]["caption"] = ["", " "]
    lines[6]["caption"] = ""
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, work = tmp_path / "idx", tmp_path / "work"
    kw = {"captions": "generate", "chunk_size": 3, "work_dir": work, "progress": False, "log": quiet}
    build_index(coca_encoder, src, out, keep_work=True, **kw)
    first = pq.read_table(out / "meta.parquet").to_pylist()
    flags = {r["id"]: r["caption_generated"] for r in first}
    assert flags == {f"img_{i:03d}.png": i in (1, 2, 5, 6) for i in range(7)}
    kept = {r["id"]: r["caption"] for r in first if not r["caption_generated"]}
    assert kept["img_000.png"] == lines[0]["caption"][0]  # the collection's own captions stay
    assert all(r["caption"].strip() for r in first)

    (work / "chunk_000002.npz").unlink()  # as if killed while the last chunk ran
    calls = []
    real = gen.caption_chunk
    monkeypatch.setattr(gen, "caption_chunk", lambda *a, **k: calls.append(int(a[2].sum())) or real(*a, **k))
    log: list[str] = []
    build_index(coca_encoder, src, out, **{**kw, "log": log.append})
    assert calls == [1]  # chunk 3 (img_006) only: the finished chunks' captions came from their files
    assert any("1 chunk(s) computed, 2 reused" in m for m in log), log
    assert pq.read_table(out / "meta.parquet").to_pylist() == first
    assert not work.exists()


def test_index_add_and_delete_keep_generated_captions(tmp_path, coca_encoder):
    src = image_folder(tmp_path / "first", n=3)
    more = image_folder(tmp_path / "more", n=2, seed=1)
    for p in more.iterdir():
        p.rename(more / f"new_{p.name}")
    out = tmp_path / "idx"
    build_index(coca_encoder, src, out, captions="generate", progress=False, log=quiet)
    before = pq.read_table(out / "meta.parquet").to_pylist()
    assert add_to_index(out, more, encoder=coca_encoder, progress=False, log=quiet) == 2
    idx = open_index(out)
    rows = idx.meta.to_pylist()
    assert rows[:3] == before  # the old generated captions are kept as they were
    assert [r["id"] for r in rows[3:]] == ["new_img_000.png", "new_img_001.png"]
    assert all(r["caption_generated"] and r["caption"].strip() for r in rows)
    assert idx.info["captions"]["generated"] == 5
    assert sorted(idx.caption_meta.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    delete_from_index(out, ["img_000.png"], log=quiet)
    assert open_index(out).info["captions"]["generated"] == 4


def test_non_coca_model_and_bad_options_are_one_line_errors(tmp_path):
    folder = image_folder(tmp_path / "photos", n=2)
    cases = [
        (("xm-micro", "--captions", "generate"), "--captions generate: the model has no caption decoder"),
        (("xm-micro", "--captions", "bogus"), "--captions bogus: use keep"),
        (("xm-micro", "--captions", "generate", "--caption-beam", "0"), "--caption-beam 0"),
    ]
    for args, needle in cases:
        out = tmp_path / "x.idx"
        proc = run_in_process(
            "index", "build", args[0], "--data", folder, "--out", out, *args[1:], check=False
        )
        assert proc.returncode == 2, proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in proc.stderr
        assert not out.exists()
    shutil.rmtree(tmp_path / "x.idx.work", ignore_errors=True)
