"""benchmarks/step_variants.py still drives today's trainer: every variant it times trains a step, and the
block names each with its step time (speed itself is measured by the script, never asserted here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_variants_quick_records_every_variant(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import step_variants as S
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "B.md"
    variants = "default,SDPA attention,1 thread,--patch-dropout 0.5,--tome 8"
    S.main(["--quick", "--model", "xm-micro", "--variants", variants, "--work", str(tmp_path / "w"),
            "--record-to", str(out)])  # fmt: skip
    text = out.read_text(encoding="utf-8")
    assert "<!-- results:step_variants -->" in text and "% of the measured" in text
    for name in ("| default |", "| 1 thread |", "| `--patch-dropout 0.5` |", "| `--tome 8` |"):
        assert name in text, name
