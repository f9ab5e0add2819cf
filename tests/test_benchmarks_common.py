"""benchmarks/_common.record: concurrent scripts recording into one results file keep every block (a file
lock around the read-modify-write, an atomic replace), and --no-write leaves the file alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

# One recording process: imports first, then waits for a common start time, so every process reads the
# file at about the same moment; the test hook sleeps between read and write to widen the race window.
CHILD = textwrap.dedent(
    """
    import contextlib, sys, time
    sys.path.insert(0, {bench!r})
    import _common as C
    import xmodal.fsutil  # noqa: F401  (imported before the start, so it costs nothing inside record)

    target, i, start, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    unlocked = sys.argv[5] == "1"
    if unlocked:
        C._locked = lambda path: contextlib.nullcontext()
    C._between_read_and_write = lambda: time.sleep(delay)
    time.sleep(max(0.0, start - time.time()))
    section = "alpha" if i % 2 else "beta"
    C.record(section, f"block {{i}}", f"body {{i}}", "test machine", command=f"cmd {{i}}", path=target)
    """
).format(bench=str(BENCH))

INITIAL = """# Benchmarks

Prose that must survive.

## alpha

<!-- results:alpha -->

#### old alpha block — 2026-01-01 00:00

old body

<!-- /results:alpha -->

## beta

<!-- results:beta -->
<!-- /results:beta -->
"""


def _record_concurrently(target: Path, n: int, delay: float, unlocked: bool) -> str:
    start = time.time() + 2.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(target),
                str(i),
                str(start),
                str(delay),
                "1" if unlocked else "0",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    return target.read_text(encoding="utf-8")


def _blocks(text: str, n: int) -> list[int]:
    return [i for i in range(n) if f"#### block {i} — " in text]


def test_concurrent_records_keep_every_block(tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(INITIAL, encoding="utf-8")
    n = 6
    text = _record_concurrently(target, n, delay=0.3, unlocked=False)
    assert _blocks(text, n) == list(range(n)), text
    assert "Prose that must survive." in text and "#### old alpha block" in text
    for sec in ("alpha", "beta"):  # each section once, every block inside its own section
        assert text.count(f"<!-- results:{sec} -->") == 1 and text.count(f"<!-- /results:{sec} -->") == 1
        body = text.split(f"<!-- results:{sec} -->", 1)[1].split(f"<!-- /results:{sec} -->", 1)[0]
        mine = [i for i in range(n) if (i % 2 == 1) == (sec == "alpha")]
        assert _blocks(body, n) == mine
    assert (tmp_path / ".BENCHMARKS.md.lock").exists()  # the lock file sits beside the results file
    assert not list(tmp_path.glob(".BENCHMARKS.md.tmp*"))  # the atomic write left no temp file


def test_the_race_is_real_without_the_lock(tmp_path):
    """The same processes with the lock taken out lose blocks: the test above would catch a missing lock."""
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(INITIAL, encoding="utf-8")
    n = 6
    text = _record_concurrently(target, n, delay=1.0, unlocked=True)
    assert len(_blocks(text, n)) < n


def test_record_new_section_and_no_write(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import _common as C
    finally:
        while str(BENCH) in sys.path:
            sys.path.remove(str(BENCH))
    target = tmp_path / "R.md"
    monkeypatch.setenv("XMODAL_BENCHMARKS_MD", str(target))  # injectable by environment too
    C.record("gamma", "first", "body one", "m", command="c")
    text = target.read_text(encoding="utf-8")
    assert "<!-- results:gamma -->" in text and "#### first — " in text and "body one" in text
    C.record("gamma", "second", "body two", "m", command="c", write=False)
    assert target.read_text(encoding="utf-8") == text
    assert "not recorded" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,native",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, True),
        ({"avx2", "amx_bf16"}, True),
        ({"avx2", "avx512f"}, False),
        ({"avx2"}, False),
    ],
)
def test_native_bf16_and_open_clip_precision(flags, native):
    sys.path.insert(0, str(BENCH))
    try:
        import _common as C
        import train_vs_open_clip as T
    finally:
        while str(BENCH) in sys.path:
            sys.path.remove(str(BENCH))
    assert C.native_bf16(flags) is native
    assert f"native bf16: {'yes' if native else 'no'}" in C.isa_line(flags)
    assert T.open_clip_precision("auto", flags) == ("amp_bf16" if native else "fp32")
    assert T.open_clip_precision("fp32", flags) == "fp32"
