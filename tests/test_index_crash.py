"""A build killed with SIGKILL part-way leaves the previous index usable; a rerun reuses finished chunks."""

from __future__ import annotations

import re

from conftest import run_in_process, sigkill_at_line, write_tiny_manifest

from xmodal.index import open_index
from xmodal.index.embed import TEST_DELAY_ENV


def test_sigkill_during_build_then_resume(tmp_path):
    small = write_tiny_manifest(tmp_path / "small", n=6, seed=1)
    big = write_tiny_manifest(tmp_path / "big", n=40, seed=2)
    out = tmp_path / "idx"
    run_in_process("index", "build", "xm-micro", "--data", str(small), "--out", str(out), "--no-progress")
    assert len(open_index(out)) == 6

    build = ["index", "build", "xm-micro", "--data", big, "--out", out, "--chunk-size", "4", "--no-progress"]
    sigkill_at_line(build, "chunk 3/10 computed", env={TEST_DELAY_ENV: "0.5"})

    # the previous index is untouched and loads; the finished chunks are on disk
    idx = open_index(out)
    assert len(idx) == 6 and idx.info["source"] == str(small)
    chunks = sorted((tmp_path / "idx.work").glob("chunk_*.npz"))
    assert len(chunks) >= 3

    rerun = run_in_process(  # only the killed build needs a real process
        "index",
        "build",
        "xm-micro",
        "--data",
        str(big),
        "--out",
        str(out),
        "--chunk-size",
        "4",
        "--no-progress",
    )
    computed = len(re.findall(r"^chunk \d+/10 computed", rerun.stderr, flags=re.M))
    assert f"{len(chunks)} already done" in rerun.stderr
    assert computed == 10 - len(chunks), rerun.stderr
    assert f"{computed} chunk(s) computed, {len(chunks)} reused" in rerun.stderr
    idx = open_index(out)
    assert len(idx) == 40 and idx.info["source"] == str(big)
    assert not (tmp_path / "idx.work").exists()
