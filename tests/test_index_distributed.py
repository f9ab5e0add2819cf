"""Scale-out `index build`: torchrun ranks share the chunks and rank 0 assembles them; the public chunk API
(plan_chunks / embed_chunk, then build_index(embed_missing=False)) that a Ray or Spark map step calls.

The two-rank tests run rank 0 in this process and rank 1 in a forked child (gloo over TCP, as torchrun
would set it up): no interpreter or torch start-up, so they take seconds. One slow test runs the real
`torchrun -m xmodal index build`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, write_tiny_manifest
from conftest import run_in_process as cli

from xmodal.errors import UserError
from xmodal.index import ChunkPlan, build_index, embed_chunk, open_index, plan_chunks
from xmodal.index import build as build_mod
from xmodal.models import load_encoder

N, CHUNK = 20, 4  # five chunks: rank 0 gets 0, 2, 4 and rank 1 gets 1, 3


@pytest.fixture(autouse=True)
def _one_thread(one_thread, monkeypatch):
    monkeypatch.setattr(build_mod, "SHARED_FS_WAIT_S", 0.0)  # a missing chunk is reported at once here


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("xm-micro")


@pytest.fixture
def manifest(tmp_path) -> Path:
    return write_tiny_manifest(tmp_path / "d", n=N)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank1(env: dict, log_path: str, die_after: str | None, args: tuple, kwargs: dict) -> None:
    """Rank 1 in the forked child: its log goes to a file; `die_after` kills it abruptly after that line."""
    os.environ.update(env)

    def log(msg: str) -> None:
        with open(log_path, "a") as f:
            f.write(msg + "\n")
        if die_after and die_after in msg:
            os._exit(3)  # as a killed rank: no cleanup, no barrier

    try:
        assert build_index(*args, log=log, **kwargs) is None  # only rank 0 returns (and writes) the index
    except UserError as e:
        log(f"error: {e}")
        os._exit(2)


def two_ranks(monkeypatch, tmp_path, args: tuple, kwargs: dict, die_after: str | None = None, rank1=None):
    """build_index(*args, **kwargs) as torchrun rank 0 (here) and rank 1 (a forked child; `rank1`: other
    kwargs for it). Returns rank 0's result (or exception), rank 1's exit code and log lines."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    log_path = tmp_path / "rank1.log"
    log_path.unlink(missing_ok=True)
    child = multiprocessing.get_context("fork").Process(
        target=_rank1,
        args=({**env, "RANK": "1", "LOCAL_RANK": "1"}, str(log_path), die_after, args, rank1 or kwargs),
    )
    child.start()
    try:
        with monkeypatch.context() as m:
            for k, v in {**env, "RANK": "0", "LOCAL_RANK": "0"}.items():
                m.setenv(k, v)
            try:
                result = build_index(*args, log=lambda _m: None, **kwargs)
            except UserError as e:
                result = e
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    return result, child.exitcode, lines


def assert_same_index(a: Path, b: Path) -> None:
    """Same ids in the same order, vectors to 1e-6, same metadata, thumbnails and caption gallery."""
    ia, ib = open_index(a), open_index(b)
    assert ia.ids == ib.ids and len(ia) == N
    np.testing.assert_allclose(ia.vectors, ib.vectors, atol=1e-6, rtol=0)
    assert pq.read_table(a / "meta.parquet").equals(pq.read_table(b / "meta.parquet"))
    ja, jb = (json.loads((p / "index.json").read_text()) for p in (a, b))
    for j in (ja, jb):
        j.pop("created"), j.pop("updated", None)
    assert ja == jb
    assert (a / "thumbs.bin").read_bytes() == (b / "thumbs.bin").read_bytes()
    if (a / "captions.npy").exists() or (b / "captions.npy").exists():
        np.testing.assert_allclose(
            np.load(a / "captions.npy"), np.load(b / "captions.npy"), atol=1e-6, rtol=0
        )


def test_two_ranks_equal_one_process(encoder, manifest, tmp_path, monkeypatch):
    opts = {"chunk_size": CHUNK, "caption_gallery": True, "progress": False, "model_source": "xm-micro"}
    build_index(encoder, manifest, tmp_path / "one", log=lambda _m: None, **opts)
    idx, code, lines = two_ranks(monkeypatch, tmp_path, (encoder, manifest, tmp_path / "two"), opts)
    assert code == 0 and not isinstance(idx, Exception), idx
    assert_same_index(tmp_path / "one", tmp_path / "two")
    assert len(idx) == N
    # rank 1 embedded its share (chunks 1 and 3), tagged with its rank, and wrote no index
    assert "[rank 1/2] embedding done: 2 chunk(s) computed, 0 reused" in lines
    assert [x.split(" (")[0] for x in lines if "computed (" in x] == [
        "[rank 1/2] chunk 2/5 computed",
        "[rank 1/2] chunk 4/5 computed",
    ]
    assert not (tmp_path / "two.work").exists()  # rank 0 cleaned up after writing


def test_chunk_of_an_interrupted_rank_is_reused(encoder, manifest, tmp_path, monkeypatch):
    """Rank 1 dies right after saving its first chunk; the rerun (same command) reuses that chunk and
    every chunk of rank 0, embeds only what is missing, and gives the single-process index."""
    opts = {"chunk_size": CHUNK, "progress": False}
    out, work = tmp_path / "idx", tmp_path / "idx.work"
    err, code, _ = two_ranks(monkeypatch, tmp_path, (encoder, manifest, out), opts, die_after="chunk 2/5")
    assert code == 3 and isinstance(err, UserError) and "chunk_000003.npz" in str(err)
    assert not out.exists()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("chunk_*.npz")}
    assert sorted(kept) == [f"chunk_{c:06d}.npz" for c in (0, 1, 2, 4)]

    idx, code, lines = two_ranks(monkeypatch, tmp_path, (encoder, manifest, out), {**opts, "keep_work": True})
    assert code == 0 and len(idx) == N
    assert "[rank 1/2] embedding done: 1 chunk(s) computed, 1 reused" in lines
    assert [x.split(" (")[0] for x in lines if "computed (" in x] == ["[rank 1/2] chunk 4/5 computed"]
    for name, stamp in kept.items():  # not rewritten: the same file
        p = work / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, name
    build_index(encoder, manifest, tmp_path / "one", log=lambda _m: None, **opts)
    assert_same_index(tmp_path / "one", out)


def test_rank_that_died_gives_one_line_missing_chunk_error(encoder, manifest, tmp_path, monkeypatch):
    """Rank 1 dies before embedding anything: rank 0 embeds only its own share (it never recomputes another
    rank's chunks) and says which chunks are missing and to rerun; its finished chunks stay."""
    out, work = tmp_path / "idx", tmp_path / "idx.work"
    opts = {"chunk_size": CHUNK, "progress": False}
    err, code, _ = two_ranks(monkeypatch, tmp_path, (encoder, manifest, out), opts, die_after="over 2 ranks")
    assert code == 3 and isinstance(err, UserError)
    msg = str(err)
    assert "\n" not in msg and "2 of 5 chunk(s) missing" in msg and "rerun the same command" in msg
    assert "chunk_000001.npz" in msg and "chunk_000003.npz" in msg and str(work) in msg
    assert sorted(p.name for p in work.glob("chunk_*.npz")) == [f"chunk_{c:06d}.npz" for c in (0, 2, 4)]
    assert not out.exists()


def test_ranks_that_disagree_on_the_plan_stop_with_one_line(encoder, manifest, tmp_path, monkeypatch):
    """Rank 1 given another --chunk-size derives another plan: it refuses to write into rank 0's folder."""
    opts = {"chunk_size": CHUNK, "progress": False}
    args = (encoder, manifest, tmp_path / "idx")
    err, code, lines = two_ranks(monkeypatch, tmp_path, args, opts, rank1={**opts, "chunk_size": 8})
    assert code == 2 and lines[-1].startswith("error: rank 1: ") and "give every rank the same" in lines[-1]
    assert isinstance(err, UserError) and "2 of 5 chunk(s) missing" in str(err)


def test_public_chunk_api_equals_plain_build(encoder, manifest, tmp_path):
    """The Ray/Spark path: a driver plans, each map task plans the same (create=False) and embeds its
    chunks in any order, then build_index(embed_missing=False) assembles them."""
    opts = {"chunk_size": CHUNK, "caption_gallery": True}
    work = tmp_path / "cache"
    plan = plan_chunks(encoder, str(manifest), work, replace_stale=True, **opts)
    assert isinstance(plan, ChunkPlan) and len(plan) == 5 and plan.missing() == [0, 1, 2, 3, 4]
    assert [plan.share(r, 2) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    for c in reversed(plan.chunks):  # e.g. one task per chunk, finishing in any order
        task_plan = plan_chunks(encoder, str(manifest), work, create=False, **opts)
        assert task_plan.fingerprint == plan.fingerprint and embed_chunk(task_plan, c) is True
    assert embed_chunk(plan, 2) is False and plan.missing() == []  # a retried task reuses the chunk
    logs: list[str] = []
    ray = tmp_path / "ray"
    kw = {"work_dir": work, "embed_missing": False, "progress": False}
    idx = build_index(encoder, manifest, ray, log=logs.append, **kw, **opts)
    assert len(idx) == N and "assembling 5 chunk(s) from " + str(work) in logs
    assert not any("computed" in m for m in logs)
    build_index(encoder, manifest, tmp_path / "plain", log=lambda _m: None, progress=False, **opts)
    assert_same_index(tmp_path / "plain", ray)


def test_assembly_with_missing_chunks_or_other_settings_is_a_user_error(encoder, manifest, tmp_path):
    work = tmp_path / "cache"
    with pytest.raises(UserError, match=r"work\.json: not found; plan the chunks first"):
        plan_chunks(encoder, manifest, work, create=False, chunk_size=CHUNK)  # a worker before the driver
    plan = plan_chunks(encoder, manifest, work, chunk_size=CHUNK)
    for c in (0, 2, 3):
        embed_chunk(plan, c)
    kw = {"work_dir": work, "embed_missing": False, "progress": False, "log": lambda _m: None}
    with pytest.raises(UserError) as e:
        build_index(encoder, manifest, tmp_path / "idx", chunk_size=CHUNK, **kw)
    assert re.search(r"2 of 5 chunk\(s\) missing \(chunk_000001\.npz, chunk_000004\.npz\)", str(e.value))
    assert len(list(work.glob("chunk_*.npz"))) == 3 and not (tmp_path / "idx").exists()  # nothing lost
    # assembling with other settings than the plan's never wipes the finished chunks
    with pytest.raises(UserError, match="different collection, model or settings"):
        build_index(encoder, manifest, tmp_path / "idx", chunk_size=CHUNK, caption_gallery=True, **kw)
    assert len(list(work.glob("chunk_*.npz"))) == 3


@pytest.mark.slow  # three interpreters start torch and open_clip on a small machine: ~30 s
def test_torchrun_cli_equals_single_process(tmp_path):
    manifest = write_tiny_manifest(tmp_path / "d", n=N)
    common = ["index", "build", "xm-micro", "--data", str(manifest), "--chunk-size", str(CHUNK),
              "--caption-gallery", "--no-progress"]  # fmt: skip
    cli(*common, "--out", str(tmp_path / "one"))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), "-m", "xmodal", *common, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_index(tmp_path / "one", tmp_path / "two")
    err = proc.stderr.splitlines()
    assert sum("index written" in x for x in err) == 1  # rank 0 alone wrote it
    assert "[rank 1/2] embedding done: 2 chunk(s) computed, 0 reused" in err
