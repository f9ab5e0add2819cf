"""benchmarks/gpu.py without a GPU: the dry run prints commands both trainers accept and a FLOP count that
matches a hand count; a real run on a machine without CUDA refuses in one line with exit status 2; the
Batcher's pinned gather gives the same batch as the plain one. Speed is never asserted here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"


def dry_run(*args: str, tmp_path: Path) -> str:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--work-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def commands(out: str) -> list[list[str]]:
    lines = out.splitlines()
    return [shlex.split(lines[i + 1]) for i, ln in enumerate(lines) if ln.startswith("[")]


def test_dry_run_commands_parse_with_both_trainers(tmp_path):
    import typer

    from xmodal.cli import app

    out = dry_run("--no-flops", "--compile-both", "--steps", "20", "--batch-size", "64", tmp_path=tmp_path)
    cmds = commands(out)
    # 2 models × 2 trainers × (with, without compile)
    assert len(cmds) == 8
    xm = [c for c in cmds if c[1:4] == ["-m", "xmodal", "train"]]
    oc = [c for c in cmds if c[1].endswith("_open_clip_main.py")]
    assert len(xm) == len(oc) == 4
    train = typer.main.get_command(app).commands["train"]
    for c in xm:  # every flag is one `xmodal train` has (click raises on an unknown one)
        ctx = train.make_context("train", c[4:])
        assert ctx.params["precision"] == "bf16" and ctx.params["device"] == "cuda"
        assert ctx.params["batch_size"] == 64 and ctx.params["steps"] == 20
    assert sum("--compile" in c for c in xm) == 2
    assert {c[c.index("--model") + 1] for c in xm} == {"xm-small", "ViT-B-32"}
    from open_clip_train.params import parse_args

    for c in oc:
        args = parse_args(c[2:])
        assert args.precision == "amp_bf16" and args.device == "cuda" and args.batch_size == 64
        assert args.pretrained in (None, "")  # random init: nothing downloaded
    assert sum("--torchcompile" in c for c in oc) == 2
    # both sides read the same CSV for a model
    for model in ("xm-small", "ViT-B-32"):
        data = {c[c.index("--data") + 1] for c in xm if c[c.index("--model") + 1] == model}
        data |= {c[c.index("--train-data") + 1] for c in oc if c[c.index("--model") + 1] == model}
        assert len(data) == 1


def hand_flops(cfg: dict, batch: int) -> int:
    """Forward matmul FLOPs of a ViT image tower and a text transformer plus the two logit matmuls, ×3 for
    forward + backward, less the patch convolution's input gradient (the pixels need none)."""
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]

    def layers(tokens: int, width: int, hidden: int, n: int) -> int:
        per = tokens * (2 * width * 3 * width + 2 * width * width + 2 * 2 * width * hidden)
        return n * (per + 2 * 2 * tokens * tokens * width)  # + q·kᵀ and attn·v

    patches = (v["image_size"] // v["patch_size"]) ** 2
    vw, tw = v["width"], t["width"]
    conv = 2 * patches * 3 * v["patch_size"] ** 2 * vw
    vision = conv + layers(patches + 1, vw, int(v.get("mlp_ratio", 4) * vw), v["layers"]) + 2 * vw * e
    text = layers(t["context_length"], tw, int(t.get("mlp_ratio", 4) * tw), t["layers"]) + 2 * tw * e
    forward = batch * (vision + text) + 2 * 2 * batch * batch * e
    return 3 * forward - batch * conv


def test_dry_run_flops_match_a_hand_count(tmp_path):
    from xmodal.models import ModelSpec, resolve_model_config

    out = dry_run("--models", "xm-micro", "--batch-size", "16", "--dry-run-batch", "2", tmp_path=tmp_path)
    got = {int(m[0]): float(m[1]) for m in re.findall(r"^flops xm-micro batch=(\d+): (\d+)", out, re.M)}
    assert set(got) == {2, 16}
    cfg = resolve_model_config(ModelSpec("xm-micro"))
    for batch, flops in got.items():
        assert flops > 0
        assert flops == pytest.approx(hand_flops(cfg, batch), rel=0.01)


def test_refuses_without_cuda_in_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--work-dir", str(tmp_path), "--no-write"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no device visible, on a GPU machine too
        timeout=300,
    )
    assert r.returncode == 2
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert lines == ["benchmarks/gpu.py: no CUDA device here; run it on a GPU machine"]


def test_batcher_cpu_path_unchanged_and_pinned_gather_equal(tmp_path, tiny_manifest, monkeypatch):
    """No CUDA device given (or a CPU one): no copier, `get` as before. The pinned gather (CUDA only) takes
    the same rows as `_images`, with and without --replay rows (pinning itself needs CUDA: faked here)."""
    from xmodal.data import load_dataset
    from xmodal.train import distributed as D
    from xmodal.train.batcher import Batcher
    from xmodal.train.config import TrainConfig

    data = load_dataset(str(tiny_manifest), 16, cache_dir=str(tmp_path / "cache"), progress=False)
    tok = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731
    cfg = TrainConfig(data=str(tiny_manifest), batch_size=8, seed=3)
    plain = Batcher(data, tok, cfg, D.DistInfo())
    on_cpu = Batcher(data, tok, cfg, D.DistInfo(), device=torch.device("cpu"))
    assert plain._cuda is None and on_cpu._cuda is None
    for step in (0, 1, 7):
        for x, y in zip(plain.get(step), on_cpu.get(step), strict=True):
            assert x.device.type == "cpu" and torch.equal(x, y)

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    rows = plain.indices(1)
    assert torch.equal(plain._images_pinned(rows), plain._images(rows))
    replay_cfg = TrainConfig(
        data=str(tiny_manifest), batch_size=8, seed=3, replay="old", replay_fraction=0.25
    )
    with_replay = Batcher(data, tok, replay_cfg, D.DistInfo(), replay=data)
    rows = with_replay.indices(2)
    assert (rows >= with_replay.n).any()
    assert torch.equal(with_replay._images_pinned(rows), with_replay._images(rows))


def test_report_renders_rows_ratios_and_failures():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _common as C
        import gpu as G
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    a = G.parse_args(["--models", "xm-small", "--steps", "20", "--batch-size", "8", "--compile-both"])
    run = C.RunResult(0, 12.0, 1.0, 1.0, 1.0)
    xm, xmc, oc, occ = G.sides(a)
    results = [
        {"side": xm, "run": run, "mem": (900.0, "nvidia-smi, trainer processes"), "step_s": [0.1] * 20,
         "data_s": [], "median_step_s": 0.1},
        {"side": xmc, "run": run, "mem": (None, "not available"), "error": "exit 1: DynamoError"},
        {"side": oc, "run": run, "mem": (1000.0, "nvidia-smi, trainer processes"), "step_s": [0.2] * 20,
         "data_s": [0.01] * 20, "median_step_s": 0.2},
        {"side": occ, "run": run, "mem": (1000.0, "nvidia-smi, trainer processes"), "step_s": [0.4] * 20,
         "data_s": [0.01] * 20, "median_step_s": 0.4},
    ]  # fmt: skip
    body = G.report(a, results, {"xm-small": 1e12}, peak=1e15, sheet=None)
    assert "failed: exit 1: DynamoError" in body
    assert "| xm-small | xmodal --precision bf16 vs open_clip --precision amp_bf16 | 2 | 1 |" in body
    assert "| 10.0 |" in body  # model TFLOP/s: 1e12 / 0.1 s
    assert G.datasheet_bf16("NVIDIA H200") == 989e12 and G.datasheet_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert G.datasheet_bf16("NVIDIA H100 PCIe") == 756e12 and G.datasheet_bf16("Tesla T4") is None
