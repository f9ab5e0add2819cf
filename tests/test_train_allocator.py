"""The trainer's glibc malloc settings change where memory comes from, not a single number of the run."""

import json
import platform

import pytest

import xmodal.train.trainer as trainer_module
from tests.conftest import run_in_process
from xmodal.train.allocator import glibc_default_thresholds, keep_freed_memory

MICRO = ["--model", "xm-micro", "--precision", "fp32", "--no-progress", "--lr", "1e-3", "--warmup", "2"]
GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_settings_are_accepted_by_glibc():
    assert glibc_default_thresholds()
    assert keep_freed_memory()


def _curve(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_the_loss_curve_is_the_one_of_glibcs_defaults(tiny_manifest, tmp_path, monkeypatch):
    common = [
        "train",
        "--data",
        tiny_manifest,
        *MICRO,
        "--batch-size",
        "8",
        "--steps",
        "4",
        "--log-every",
        "1",
    ]
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "keep_freed_memory", glibc_default_thresholds)
        run_in_process(*common, "--out", tmp_path / "defaults")
    run_in_process(*common, "--out", tmp_path / "kept")
    assert len(_curve(tmp_path / "kept")) == 4
    assert _curve(tmp_path / "kept") == _curve(tmp_path / "defaults")
