"""`xmodal caption`: image files → captions, a manifest → a captioned manifest (resumable after SIGKILL),
one-line refusals. The tiny CoCa's captions are gibberish: these tests check the mechanics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO_TRAIN, REPO, assert_one_line_error, run_in_process, write_tiny_manifest

from xmodal.caption.manifest import TEST_DELAY_ENV

FAST = ["--max-len", "8", "--min-len", "2"]  # short captions: the tests check files and flags, not text
CHUNKED = [*FAST, "--batch-size", "2", "--chunk-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def captioned(coca_run, tmp_path_factory) -> tuple[Path, Path]:
    """(input manifest of 8 images, its captions written by one uninterrupted `--data` run)."""
    root = tmp_path_factory.mktemp("caption")
    manifest = write_tiny_manifest(root / "data", n=8, seed=3)
    out = root / "out" / "full.jsonl"
    run_in_process("caption", coca_run, "--data", manifest, "--out", out, *CHUNKED)
    return manifest, out


def test_caption_image_files_text_and_json(coca_run, tmp_path):
    manifest = write_tiny_manifest(tmp_path, n=2)
    paths = [str(manifest.parent / "img_000.png"), str(manifest.parent / "img_001.png")]
    text = run_in_process("caption", coca_run, *paths, *FAST)
    lines = text.stdout.strip().split("\n")
    assert [ln.split("\t")[0] for ln in lines] == paths
    assert all(len(ln.split("\t")) == 2 for ln in lines)
    as_json = json.loads(run_in_process("caption", coca_run, *paths, *FAST, "--json").stdout)
    assert as_json == [{"image": p, "caption": ln.split("\t")[1]} for p, ln in zip(paths, lines, strict=True)]


def test_manifest_output_is_a_manifest_aligned_with_the_input(captioned):
    from xmodal.data import read_records

    manifest, out = captioned
    src, got = read_records(manifest), read_records(out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(got) == len(src) == 8
    for s, g, row in zip(src, got, rows, strict=True):
        assert Path(g.image).resolve() == Path(s.image).resolve()  # relative to the output's folder
        assert row["image"] == os.path.relpath(s.image, out.parent)
        assert g.captions == [row["caption"]] and row["caption"]
        assert row["reference"] == s.captions and row["label"] == s.label == g.label
    assert not (out.parent / "full.jsonl.parts").exists()  # the work folder goes once the output is written


def test_sigkill_then_resume_skips_finished_chunks(coca_run, captioned):
    manifest, full = captioned
    out = full.parent / "resumed.jsonl"  # same folder as the uninterrupted output: same relative paths
    parts = full.parent / "resumed.jsonl.parts"
    args = ["caption", str(coca_run), "--data", str(manifest), "--out", str(out), *CHUNKED]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xmodal", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, TEST_DELAY_ENV: "3"},
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and not list(parts.glob("chunk_*.json")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    finished = sorted(parts.glob("chunk_*.json"))
    assert 1 <= len(finished) < 4 and not out.exists(), err
    stamps = {p: p.stat().st_mtime_ns for p in finished}

    # other decoding options are refused, and the finished chunks stay as they were
    other = run_in_process(*args, "--beam", "2", check=False)
    assert_one_line_error(other, "--restart")
    assert "--beam 1, now 2" in other.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps

    rerun = run_in_process(*args)
    done = len(finished)
    assert f"{done} already done (skipped), {4 - done} to caption" in rerun.stderr
    assert f"{4 - done} chunk(s) captioned, {done} reused" in rerun.stderr
    for c in range(1, done + 1):
        assert f"chunk {c}/4 captioned" not in rerun.stderr
    assert out.read_text() == full.read_text()
    assert not parts.exists()


def test_train_reads_the_output_and_a_clip_run_is_refused(captioned, tmp_path):
    _, out = captioned
    run = tmp_path / "micro"
    run_in_process("train", "--data", out, "--out", run, *MICRO_TRAIN, "--steps", "1")
    assert (run / "checkpoints" / "latest.pt").is_file()
    image = str(out.parent / json.loads(out.read_text().splitlines()[0])["image"])
    assert_one_line_error(run_in_process("caption", run, image, check=False), "no caption decoder")


def test_one_line_errors(coca_run, captioned, tmp_path):
    manifest, _ = captioned
    image = str(manifest.parent / "img_000.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cases = [
        ((image, "--beam", "3", "--top-p", "0.9"), "--beam and --top-p"),
        ((image, "--temperature", "0.7"), "--temperature 0.7: applies to --top-p"),
        ((image, "--max-len", "99"), "--max-len 99"),  # the model's context length is 32
        (("--out", tmp_path / "c.jsonl"), "--out: needs --data"),
        (("--data", manifest), "--data: needs --out"),
        ((image, "--data", manifest, "--out", tmp_path / "c.jsonl"), "not both"),
        (("--data", manifest, "--out", tmp_path / "c.txt"), "give a .jsonl file"),
        (("--data", manifest, "--out", manifest.with_suffix(".jsonl")), "is the input manifest"),
        (("--data", tmp_path / "none.jsonl", "--out", tmp_path / "c.jsonl"), "none.jsonl: not found"),
        ((str(tmp_path / "missing.png"),), "missing.png: image not found"),
        ((str(bad),), "bad.png: not a readable image"),
        ((), "give IMAGE files, or --data"),
    ]
    for args, needle in cases:
        assert_one_line_error(run_in_process("caption", coca_run, *args, check=False), needle)


def test_shard_images_are_written_beside_the_output(coca_run, captioned, tmp_path):
    import io
    import tarfile

    from xmodal.data import read_records

    manifest, _ = captioned
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(2):
            png = (manifest.parent / f"img_{i:03d}.png").read_bytes()
            for name, data in ((f"part/s{i}.png", png), (f"part/s{i}.txt", f"reference {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out" / "shard.jsonl"
    run_in_process("caption", coca_run, "--data", shard, "--out", out, *CHUNKED)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == ["shard_images/part_s0.png", "shard_images/part_s1.png"]
    assert [r["reference"] for r in rows] == [["reference 0"], ["reference 1"]]
    assert (out.parent / rows[0]["image"]).read_bytes() == (manifest.parent / "img_000.png").read_bytes()
    assert len(read_records(out)) == 2


def test_work_folder_of_another_job_is_refused_or_restarted(tmp_path):
    from xmodal.caption.manifest import _prepare_work, _stamp
    from xmodal.errors import UserError
    from xmodal.models.captioner import Decoding

    work, logs = tmp_path / "c.jsonl.parts", []
    greedy = _stamp("model-a", "data-a", Decoding(), 64, 2, 8)
    _prepare_work(work, greedy, False, logs.append)
    (work / "chunk_000000.json").write_text("{}")
    _prepare_work(work, {**greedy, "options": {}}, False, logs.append)  # the same job: kept
    assert (work / "chunk_000000.json").is_file()
    for other, needle in (
        (_stamp("model-b", "data-a", Decoding(), 64, 2, 8), "made with another model;"),
        (_stamp("model-a", "data-b", Decoding(), 64, 2, 8), "made with other data"),
        (_stamp("model-a", "data-a", Decoding(top_p=0.9), 64, 2, 8), "--top-p off, now 0.9"),
        (_stamp("model-a", "data-a", Decoding(), 64, 4, 8), "--chunk-size 2"),
    ):
        with pytest.raises(UserError, match="add --restart") as e:
            _prepare_work(work, other, False, logs.append)
        assert needle in str(e.value)
    _prepare_work(work, _stamp("model-a", "data-a", Decoding(), 32, 2, 8), False, logs.append)  # greedy
    assert (work / "chunk_000000.json").is_file()  # the batch size changes no greedy caption: resumed
    _prepare_work(work, other, True, logs.append)
    assert not (work / "chunk_000000.json").exists() and "--restart" in logs[-1]


def test_an_uncaptioned_image_folder_gets_captions(coca_run, tmp_path):
    """The main use: a folder of images with no text at all becomes a trainable manifest."""
    from xmodal.data import read_records

    folder = tmp_path / "photos"
    manifest = write_tiny_manifest(folder, n=3)
    manifest.unlink()  # images only
    out = tmp_path / "captions.jsonl"
    run_in_process("caption", coca_run, "--data", folder, "--out", out, *FAST)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["caption"] and r["reference"] == [] for r in rows)
    assert [r.captions for r in read_records(out)] == [[r["caption"]] for r in rows]
