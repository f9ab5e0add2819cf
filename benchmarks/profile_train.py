"""Where a whole `xmodal train` command's wall time goes, phase by phase (the run's profile.json), with a
cold preprocessed-image cache and again warm, each as a fresh process.

    python benchmarks/profile_train.py               # shapes, xm-tiny, 300 steps × batch 128
    python benchmarks/profile_train.py --quick
    python benchmarks/profile_train.py --before 891a1f8   # and an earlier revision, in the same run

Phases (xmodal/train/profile.py): startup (interpreter, imports, argument parsing), model (build, optimizer,
frozen copies), data (decode and cache the images, or read the cache), batcher (tokenisation), steps,
validation, checkpoints, finish (loss plot, logs); `other` is what falls between them. The steps' rate
is the samples over the steps phase alone; the end-to-end rate is the samples over the process's wall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_WORK,
    REPO,
    add_record_args,
    ensure_shapes,
    machine_line,
    peak_at,
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
    p.add_argument("--before", metavar="REV", help="also profile this earlier git revision, in one run")
    add_record_args(p)
    a = p.parse_args(argv)
    if a.quick:
        a.steps = 20
    return a


def run(a: argparse.Namespace, data: Path, cache: Path, name: str, code: Path = REPO) -> tuple[dict, float]:
    """One fresh `python -m xmodal train` process of the xmodal in `code`: (its profile.json, its wall
    seconds from outside)."""
    out = a.work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "xmodal", "train", "--data", str(data), "--out", str(out),
           "--model", a.model, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--precision", "auto", "--cache-dir", str(cache), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "profile.json").read_text()), time.perf_counter() - t0


def cold_and_warm(a: argparse.Namespace, data: Path, side: str, code: Path) -> dict[str, tuple[dict, float]]:
    """The command with an empty image cache (cold), then again with the cache it built (warm)."""
    cache = a.work / f"cache-{side}"
    shutil.rmtree(cache, ignore_errors=True)
    runs = {kind: run(a, data, cache, f"{side}-{kind}", code) for kind in ("cold", "warm")}
    shutil.rmtree(cache, ignore_errors=True)
    return runs


def step_flops(
    data: Path, cache: Path, out: Path, model: str, batch_size: int, precision: str = "auto"
) -> float:
    """FLOPs of one training step (forward and backward, as torch's FlopCounterMode counts them: matmuls,
    convolutions, attention) on a real batch of the data, through the trainer's own step."""
    from xmodal.train.batcher import Batcher
    from xmodal.train.config import resolve_config
    from xmodal.train.trainer import Trainer

    shutil.rmtree(out, ignore_errors=True)
    flags = {"data": str(data), "out": str(out), "model": model, "steps": 1, "batch_size": batch_size}
    cfg = resolve_config(None, {**flags, "precision": precision, "cache_dir": str(cache)})
    trainer = Trainer(cfg)
    trainer.batcher = Batcher(trainer._load(cfg.data), trainer.tokenizer, cfg, trainer.dist)
    flops = step_flops_of(trainer)
    shutil.rmtree(out, ignore_errors=True)
    return flops


def step_flops_of(trainer) -> float:
    """FLOPs of one `trainer.train_step` on its batcher's first batch (the step's weights change)."""
    from torch.utils.flop_counter import FlopCounterMode

    images, tokens, labels = trainer.batcher.get(0)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(0, images, tokens, labels)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    started = time.time()
    a.work.mkdir(parents=True, exist_ok=True)
    data = ensure_shapes(DEFAULT_WORK) / "train.jsonl"
    sides: dict[str, dict[str, tuple[dict, float]]] = {}
    if a.before:  # the earlier revision, checked out in a temporary git worktree
        before = Path(tempfile.mkdtemp(prefix="xmodal-before-"))
        shutil.rmtree(before)
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(before), a.before], cwd=REPO, check=True
        )
        try:
            sides[f"before ({a.before})"] = cold_and_warm(a, data, "before", before)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False)
    sides["now" if a.before else ""] = cold_and_warm(a, data, "now", REPO)
    cols = [(side, kind) for kind in ("cold", "warm") for side in sides]
    head = [f"{side} {kind}".strip() for side, kind in cols]
    phases = [k for k in sides[next(iter(sides))]["cold"][0]["phases_s"]]
    rows = []
    for k in phases:
        cells = []
        for side, kind in cols:
            prof = sides[side][kind][0]
            sec = prof["phases_s"].get(k, 0.0)
            cells.append(f"{sec:.2f} ({100 * sec / prof['wall_s']:.1f}%)")
        rows.append([k, *cells])
    rows.append(["whole command (profile.json)", *(f"{sides[s][k][0]['wall_s']:.1f}" for s, k in cols)])
    rows.append(["process wall, timed from outside", *(f"{sides[s][k][1]:.1f}" for s, k in cols)])
    samples = a.steps * a.batch_size
    rates = [
        ["steps only", *(f"{samples / sides[s][k][0]['phases_s']['steps']:.0f}" for s, k in cols)],
        ["end to end (process wall)", *(f"{samples / sides[s][k][1]:.0f}" for s, k in cols)],
    ]
    now = sides[list(sides)[-1]]
    flops = step_flops(data, a.work / "cache-flops", a.work / "flops", a.model, a.batch_size)
    dtype = xmodal_precision("auto")
    peak = peak_at(dtype)
    steps_per_s = a.steps / now["warm"][0]["phases_s"]["steps"]
    mfu = [
        ["model FLOPs per step (FlopCounterMode, forward + backward)", f"{flops / 1e9:.1f} GFLOP"],
        [f"measured matmul peak ({dtype}, 2048³, best of 10)", f"{peak / 1e9:.0f} GFLOP/s"],
        ["model FLOP/s in the warm run's steps", f"{flops * steps_per_s / 1e9:.0f} GFLOP/s"],
        ["share of the peak, steps only", f"{100 * flops * steps_per_s / peak:.0f}%"],
        [
            "share of the peak, end to end (warm process wall)",
            f"{100 * flops * a.steps / now['warm'][1] / peak:.0f}%",
        ],
    ]
    body = (
        f"`xmodal train --model {a.model} --steps {a.steps} --batch-size {a.batch_size} --precision auto` on "
        "the shapes training set (5,000 images), each a fresh process: first with an empty image cache "
        "(cold), then again with the cache it built (warm)"
        + (f"; before = revision `{a.before}` (a git worktree), now = this checkout" if a.before else "")
        + ". Seconds (share of the command's wall).\n\n"
        + table(["phase", *(f"{h} s" for h in head)], rows)
        + "\n\nSamples/s:\n\n"
        + table(["rate", *head], rates)
        + f"\n\nModel FLOP/s against the machine's matmul peak ({'now, ' if a.before else ''}warm run):\n\n"
        + table(["", "value"], mfu)
    )
    record("profile_train", "Whole-command training profile (shapes)", body, machine_line(), started=started,
           write=not a.no_write, path=a.record_to)  # fmt: skip


if __name__ == "__main__":
    main()
