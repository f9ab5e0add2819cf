"""`xmodal data …` commands on tiny data; bad input is one line on stderr, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from xmodal.data.cli import register

REPO = Path(__file__).resolve().parents[1]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("noop", hidden=True)(lambda: None)  # a second command keeps "data" a sub-command group
    register(app)
    return app


def test_data_shapes_check_and_cache(tmp_path):
    runner = CliRunner()
    out = tmp_path / "shapes"
    res = runner.invoke(_app(), ["data", "shapes", str(out), "--n-train", "6", "--n-val", "2",
                                 "--n-test", "4", "--image-size", "32", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert f"{out / 'train.jsonl'} (6 train lines)" in res.output.replace("\n", "")
    assert len(list((out / "images" / "train").glob("*.png"))) == 6
    (out / "images" / "train" / "000000.png").write_bytes(b"broken")

    res = runner.invoke(_app(), ["data", "check", str(out / "train.jsonl")])
    assert res.exit_code == 0, res.output
    assert "usable samples" in res.output and "skipped: 1 corrupt_image" in res.output

    cache = tmp_path / "cache"
    args = ["data", "cache", str(out / "train.jsonl"), "--image-size", "16", "--cache-dir", str(cache)]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert "cache built" in res.output and "5 images" in res.output
    entry = next(p for p in cache.iterdir() if p.is_dir())
    assert (entry / "images.npy").is_file() and json.loads((entry / "meta.json").read_text())["n"] == 5
    assert "cache up to date" in runner.invoke(_app(), args).output


def test_data_emoji_command(tmp_path):
    from xmodal.data.emoji import EMOJI_TEST

    assert EMOJI_TEST.is_file(), "apt-get install unicode-data (README, .ci/run)"
    res = CliRunner().invoke(_app(), ["data", "emoji", str(tmp_path), "--limit", "5", "--langs", "de",
                                      "--image-size", "16"])
    assert res.exit_code == 0, res.output
    assert "train.jsonl" in res.output and len(list((tmp_path / "images").glob("*.png"))) == 5


def test_missing_manifest_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xmodal", "data", "check", str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.jsonl: not found" in lines[0]


def test_bad_manifest_line_via_cli(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
    res = CliRunner().invoke(_app(), ["data", "check", str(tmp_path / "m.jsonl")])
    assert res.exit_code != 0 and "m.jsonl:2: not valid JSON" in str(res.exception)
