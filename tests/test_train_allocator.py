"""The trainer's glibc malloc settings change where memory comes from, not a single number of the run."""

import platform

import pytest

import xmodal.train.trainer as trainer_module
from tests.test_train import micro_curve
from xmodal.train.allocator import glibc_default_thresholds, keep_freed_memory

GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_settings_are_accepted_by_glibc():
    assert glibc_default_thresholds()
    assert keep_freed_memory()


def test_the_loss_curve_is_the_one_of_glibcs_defaults(tiny_manifest, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "keep_freed_memory", glibc_default_thresholds)
        defaults = micro_curve(tiny_manifest, tmp_path / "defaults")
    kept = micro_curve(tiny_manifest, tmp_path / "kept")
    assert len(kept) == 4
    assert kept == defaults
