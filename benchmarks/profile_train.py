"""Where a whole `xmodal train` command's wall time goes, phase by phase (the run's profile.json), with a
cold preprocessed-image cache and again warm, each as a fresh process.

    python benchmarks/profile_train.py               # shapes, xm-tiny, 300 steps × batch 128
    python benchmarks/profile_train.py --quick

Phases (xmodal/train/profile.py): startup (interpreter, imports, argument parsing), model (build, optimizer,
frozen copies), data (decode and cache the images, or read the cache), batcher (tokenisation), steps,
validation, checkpoints, finish (loss plot, logs); `other` is what falls between them. The steps' rate
is the samples over the steps phase alone; the end-to-end rate is the samples over the process's wall.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_WORK,
    REPO,
    add_record_args,
    ensure_shapes,
    machine_line,
    matmul_peak,
    record,
    table,
    xmodal_precision,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model", default="xm-tiny")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK / "profile_train")
    p.add_argument("--quick", action="store_true", help="20 steps")
    add_record_args(p)
    a = p.parse_args(argv)
    if a.quick:
        a.steps = 20
    return a


def run(a: argparse.Namespace, data: Path, cache: Path, name: str) -> tuple[dict, float]:
    """One fresh `python -m xmodal train` process: (its profile.json, its wall seconds from outside)."""
    out = a.work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "xmodal", "train", "--data", str(data), "--out", str(out),
           "--model", a.model, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--precision", "auto", "--cache-dir", str(cache), "--no-progress"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "profile.json").read_text()), time.perf_counter() - t0


def step_flops(a: argparse.Namespace, data: Path, cache: Path) -> float:
    """FLOPs of one training step (forward and backward, as torch's FlopCounterMode counts them: matmuls,
    convolutions, attention) on a real batch of the data, through the trainer's own step."""
    from torch.utils.flop_counter import FlopCounterMode

    from xmodal.train.batcher import Batcher
    from xmodal.train.config import resolve_config
    from xmodal.train.trainer import Trainer

    out = a.work / "flops"
    shutil.rmtree(out, ignore_errors=True)
    flags = {"data": str(data), "out": str(out), "model": a.model, "steps": 1, "batch_size": a.batch_size}
    cfg = resolve_config(None, {**flags, "precision": "auto", "cache_dir": str(cache)})
    trainer = Trainer(cfg)
    trainer.batcher = Batcher(trainer._load(cfg.data), trainer.tokenizer, cfg, trainer.dist)
    images, tokens, labels = trainer.batcher.get(0)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(0, images, tokens, labels)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    started = time.time()
    a.work.mkdir(parents=True, exist_ok=True)
    data = ensure_shapes(DEFAULT_WORK) / "train.jsonl"
    cache = a.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cold, cold_wall = run(a, data, cache, "cold")
    warm, warm_wall = run(a, data, cache, "warm")
    names = [k for k in cold["phases_s"] if k in warm["phases_s"]]
    rows = []
    for k in names:
        c, w = cold["phases_s"][k], warm["phases_s"][k]
        rows.append(
            [
                k,
                f"{c:.2f}",
                f"{100 * c / cold['wall_s']:.1f}%",
                f"{w:.2f}",
                f"{100 * w / warm['wall_s']:.1f}%",
            ]
        )
    rows.append(
        ["whole command (profile.json)", f"{cold['wall_s']:.1f}", "100%", f"{warm['wall_s']:.1f}", "100%"]
    )
    rows.append(["process wall, timed from outside", f"{cold_wall:.1f}", "", f"{warm_wall:.1f}", ""])
    samples = cold["samples"]
    rates = [
        [
            "steps only",
            f"{samples / cold['phases_s']['steps']:.0f}",
            f"{samples / warm['phases_s']['steps']:.0f}",
        ],
        ["end to end (process wall)", f"{samples / cold_wall:.0f}", f"{samples / warm_wall:.0f}"],
    ]
    flops = step_flops(a, data, cache)
    dtype = xmodal_precision("auto")
    peak = matmul_peak()["bfloat16" if dtype == "bf16" else "float32"]
    steps_per_s = a.steps / warm["phases_s"]["steps"]
    mfu = [
        ["model FLOPs per step (FlopCounterMode, forward + backward)", f"{flops / 1e9:.1f} GFLOP"],
        [f"measured matmul peak ({dtype}, 2048³, best of 10)", f"{peak / 1e9:.0f} GFLOP/s"],
        ["model FLOP/s in the warm run's steps", f"{flops * steps_per_s / 1e9:.0f} GFLOP/s"],
        ["share of the peak, steps only", f"{100 * flops * steps_per_s / peak:.0f}%"],
        [
            "share of the peak, end to end (warm process wall)",
            f"{100 * flops * a.steps / warm_wall / peak:.0f}%",
        ],
    ]
    body = (
        f"`xmodal train --model {a.model} --steps {a.steps} --batch-size {a.batch_size} --precision auto` on "
        "the shapes training set (5,000 images), each a fresh process: first with an empty image cache "
        "(cold), then again with the cache it built (warm). Seconds and share of the command's wall.\n\n"
        + table(["phase", "cold s", "cold share", "warm s", "warm share"], rows)
        + "\n\nSamples/s:\n\n"
        + table(["rate", "cold", "warm"], rates)
        + "\n\nModel FLOP/s against the machine's matmul peak:\n\n"
        + table(["", "value"], mfu)
    )
    record("profile_train", "Whole-command training profile (shapes)", body, machine_line(), started=started,
           write=not a.no_write, path=a.record_to)  # fmt: skip


if __name__ == "__main__":
    main()
