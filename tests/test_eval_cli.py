"""`xmodal eval` end to end on a tiny manifest, its error handling, and the HTML report in a real browser."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import ARTIFACTS, CHROMIUM_ARGS, REPO

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
KEYS = {"retrieval", "zeroshot", "probe", "hubness", "gap", "robustness", "meta"}


def write_manifest(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """Coloured shapes on white; 2 captions, a label and attribute/object negatives per record."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 2]
        img = Image.new("RGB", (40, 40), (255, 255, 255))
        d = ImageDraw.Draw(img)
        x0, y0 = rng.randint(0, 12), rng.randint(0, 12)
        (d.ellipse if shape == "circle" else d.rectangle)((x0, y0, x0 + 22, y0 + 22), fill=COLORS[color])
        img.save(folder / f"{i:03d}.png")
        other_color = list(COLORS)[(i + 1) % 4]
        other_shape = SHAPES[1 - SHAPES.index(shape)]
        rows.append(
            {
                "image": f"{i:03d}.png",
                "caption": [f"a {color} {shape}", f"{color} {shape} number {i}"],
                "label": shape,
                "negatives": [
                    {"caption": f"a {other_color} {shape}", "type": "attribute"},
                    {"caption": f"a {color} {other_shape}", "type": "object"},
                ],
            }
        )
    path = folder / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def xmodal(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmodal", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )


def test_cli_eval_all_writes_json_and_report(tmp_path):
    manifest = write_manifest(tmp_path / "data", n=12)
    proc = xmodal(
        "eval",
        "xm-micro",
        "--data",
        str(manifest),
        "--task",
        "all",
        "--json",
        str(tmp_path / "out.json"),
        "--report",
        str(tmp_path / "rep"),
        "--pgd-images",
        "8",
        "--pgd-steps",
        "2",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "out.json").read_text())
    assert set(res) == KEYS
    assert {"t2i", "i2t", "RSUM"} <= set(res["retrieval"])
    assert {"R@1", "R@5", "R@10", "median_rank", "MRR"} <= set(res["retrieval"]["t2i"])
    assert {"top1", "top5", "mean_per_class_recall"} <= set(res["zeroshot"])
    assert {"attribute", "object"} == set(res["probe"]["by_type"])
    assert {"skewness", "antihub_share"} <= set(res["hubness"]["i2t"])
    assert {"gap", "alignment", "uniformity_image", "uniformity_text", "linear_separability"} <= set(
        res["gap"]
    )
    assert res["robustness"]["pgd"]["n_images"] == 8
    assert {"typo", "attribute", "noise", "blur", "jpeg"} <= set(res["robustness"])
    assert res["meta"]["n_images"] == 12 and res["meta"]["n_texts"] == 24
    # a config name without --pretrained is a random init: said on stderr and recorded in the JSON
    assert res["meta"]["random_init"] is True and "warning: xm-micro" in proc.stderr
    assert json.loads((tmp_path / "rep" / "results.json").read_text())["retrieval"] == res["retrieval"]
    assert (tmp_path / "rep" / "index.html").stat().st_size > 1000
    assert "R@1" in proc.stdout  # the rich table


def test_cli_bad_task_is_one_line_error(tmp_path):
    manifest = write_manifest(tmp_path / "data", n=4)
    proc = xmodal("eval", "xm-micro", "--data", str(manifest), "--task", "foo", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--task foo" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "missing.jsonl"], "--data missing.jsonl"),
        (["--data", "{m}", "--templates", "nope.txt"], "--templates nope.txt"),
    ],
)
def test_cli_bad_input_errors(tmp_path, args, needle):
    m = tmp_path / "plain.jsonl"
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    m.write_text(
        json.dumps({"image": "a.png", "caption": "x"})
        + "\n"
        + json.dumps({"image": "a.png", "caption": "y"})
        + "\n"
    )
    proc = xmodal("eval", "xm-micro", *[a.replace("{m}", str(m)) for a in args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip().startswith("error: ") and needle in proc.stderr and "Traceback" not in proc.stderr
    )


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="/usr/bin/chromium not installed: cannot render the report"
)
def test_report_renders_in_headless_chromium(tmp_path):
    from xmodal.data import load_dataset
    from xmodal.eval import evaluate
    from xmodal.models import load_encoder

    manifest = write_manifest(tmp_path / "data", n=16)
    enc = load_encoder("xm-micro", device="cpu")
    data = load_dataset(manifest, enc.image_size, use_cache=False, progress=False)
    rep = tmp_path / "rep"
    evaluate(enc, data, ["retrieval", "zeroshot", "hubness", "gap"], report_dir=rep, positives="label")
    page = (rep / "index.html").read_text()
    assert page.count('class="thumb') >= 6 * 5 and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained
    assert 'class="thumb ok"' in page  # label positives: every query has correct results in its top 5

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "eval_report.png"
    shot.unlink(missing_ok=True)
    subprocess.run(
        [
            shutil.which("chromium"),
            *CHROMIUM_ARGS,
            f"--user-data-dir={tmp_path / 'chrome'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            (rep / "index.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape[:2] == (2000, 1200)
    assert (px.min(axis=2) < 200).mean() > 0.01  # not blank
    green = (abs(px[..., 0] - 0x1A) < 25) & (abs(px[..., 1] - 0x9A) < 25) & (abs(px[..., 2] - 0x2A) < 25)
    fills = np.zeros(px.shape[:2], dtype=bool)
    for rgb in COLORS.values():  # the shapes inside the thumbnails
        fills |= np.abs(px - np.array(rgb)).max(axis=2) < 20
    assert green.sum() > 200, "no green 'correct' borders visible in the gallery"
    assert fills.sum() > 500, "no thumbnail content visible"
