"""benchmarks/train_vs_open_clip.py still drives today's trainers: the `xmodal train` command it builds runs
(from a cold cache) and yields the per-step times it reads, and open_clip's log lines parse. Speed itself is
measured by the script, never asserted here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import _common as C  # noqa: E402
import train_vs_open_clip as T  # noqa: E402

while str(REPO / "benchmarks") in sys.path:  # keep benchmarks/search.py etc. off the import path
    sys.path.remove(str(REPO / "benchmarks"))


def test_parse_args_defaults_and_quick():
    a = T.parse_args([])
    assert a.oc_workers == [0, 1, 2] and a.xm_precision == "auto" and a.oc_precision == "auto"
    assert a.calib_steps <= a.steps and a.skip < a.steps
    q = T.parse_args(["--quick", "--oc-workers", "2"])
    assert (q.steps, q.repeats, q.oc_workers) == (12, 1, [2])
    with pytest.raises(SystemExit):
        T.parse_args(["--oc-workers", "x"])


def test_xmodal_side_runs_from_a_cold_cache(tmp_path, tiny_manifest):
    a = T.parse_args(["--steps", "3", "--batch-size", "8"])
    csv = tmp_path / "pairs.csv"
    C.write_pairs_csv(tiny_manifest, csv)
    cache = tmp_path / "cold-cache"
    (cache / "stale").mkdir(parents=True)  # whatever was there is removed: the run starts cold
    res = T.run_xmodal(a, csv, tmp_path / "run", cache, seed=0)
    assert len(res["step_s"]) == 3 and all(s > 0 for s in res["step_s"])
    assert res["ckpt"].is_file() and res["run"].wall_s > sum(res["step_s"])
    assert not cache.exists()  # emptied after the run too
    assert "--precision" in (cmd := T.xmodal_cmd(a, csv, tmp_path / "r", cache, 0)) and "auto" in cmd
    ev = T.evaluate_ckpt(res["ckpt"], _test_data(tiny_manifest, tmp_path), "xmodal")
    assert 0 <= ev["t2i"]["R@10"] <= 1


def _test_data(manifest: Path, tmp_path: Path):
    from xmodal.data import load_dataset

    return load_dataset(manifest, 64, cache_dir=tmp_path / "eval-cache", progress=False)


@pytest.mark.skipif(
    importlib.util.find_spec("pandas") is None or importlib.util.find_spec("open_clip_train") is None,
    reason="open_clip_train's CSV loader needs pandas (pip install -e '.[bench]')",
)
def test_open_clip_side_runs_and_its_log_parses(tmp_path, tiny_manifest):
    a = T.parse_args(["--steps", "3", "--batch-size", "8"])
    csv = tmp_path / "pairs.csv"
    T.pairs_csv(tiny_manifest, csv, 3 * 8)
    res = T.run_open_clip(a, csv, tmp_path / "logs", "oc", "fp32", 0, 1, workers=0)
    assert len(res["step_s"]) == 3 and len(res["data_s"]) == 3 and len(res["losses"]) == 3
    assert res["ckpt"].is_file()
    ev = T.evaluate_ckpt(res["ckpt"], _test_data(tiny_manifest, tmp_path), "open_clip")
    assert 0 <= ev["i2t"]["R@1"] <= 1


@pytest.mark.slow
def test_whole_script_tiny(tmp_path):
    """The whole benchmark at toy size (calibration, both sides, ratios), recorded into a temporary file."""
    pytest.importorskip("pandas")
    out = tmp_path / "B.md"
    T.main(
        [
            "--steps", "4", "--repeats", "1", "--calib-steps", "3", "--batch-size", "16",
            "--shapes-images", "200", "--work-dir", str(tmp_path / "work"), "--record-to", str(out),
            "--xm-variant", "--patch-dropout 0.5",
        ]
    )  # fmt: skip
    text = out.read_text(encoding="utf-8")
    assert "<!-- results:train_vs_open_clip -->" in text and "native bf16:" in text
    assert "**end to end**" in text and "**per step**" in text and "calibration runs" in text
    assert "open_clip wall / xmodal `--patch-dropout 0.5`" in text and "**floor**" in text
