"""Data reduction (`xmodal data reduce`, TL;DR-style): does training on a reduced half match the full set?

On the built-in shapes data (5000 training images by default) xm-tiny is trained at equal steps, with the same
recipe and seeds, on:
- all: the whole training split;
- reduced: half of it chosen by `xmodal data reduce --keep 0.5` (k-means of image embeddings, each cluster's
  share of the half, nearest its centroid; `--pick nearest`);
- random: a seeded random half;
- optional (`--variants ...,uniform`): the paper's per-cluster uniform sample (`--pick uniform`).
The reducing model is xm-tiny trained briefly on the full training split (`--reducer-steps`, default 40
steps of batch 128, `_common.ensure_model`, trained once and reused), i.e. a weak model that has seen the
data. For training seed s the reduced half uses k-means `--seed s` and the random half a permutation seeded
with s, so the seeds also vary the subsets. Every trained run is evaluated on the test split by the same
function as `xmodal eval --json` (retrieval and zero-shot, fp32): t2i/i2t R@1/R@10 and zero-shot top-1.

    python benchmarks/data_reduce.py --quick --no-write   # smoke run (about 2 minutes)
    python benchmarks/data_reduce.py                      # 60 steps, seeds 0,1 (~7-11 min on 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.REPO))  # this checkout's xmodal, also where the installed one points elsewhere

MODEL = "xm-tiny"
METRICS = (
    ("t2i R@1", ("retrieval", "t2i", "R@1")),
    ("t2i R@10", ("retrieval", "t2i", "R@10")),
    ("i2t R@1", ("retrieval", "i2t", "R@1")),
    ("i2t R@10", ("retrieval", "i2t", "R@10")),
    ("zero-shot top-1", ("zeroshot", "top1")),
)
VARIANTS = ("all", "reduced", "random", "uniform")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 6 steps, one seed, 6-step reducer")
    p.add_argument("--shapes-images", type=int, default=5000, help="training images of the shapes set")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps of every training run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0,1", help="comma list of training seeds")
    p.add_argument("--keep", default="0.5", help="xmodal data reduce --keep (and the random subset's share)")
    p.add_argument("--reducer-steps", type=int, default=40, help="training steps of the reducing model")
    p.add_argument("--variants", default="all,reduced,random", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK)
    C.add_record_args(p)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.seeds, a.reducer_steps = 6, "0", 6
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad or not a.seeds:
        p.error(f"--variants {','.join(bad)}: use {', '.join(VARIANTS)}; --seeds: at least one")
    return a


def xmodal(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "xmodal", *args], env=C.xmodal_env(), capture_output=True, text=True
    )
    if r.returncode:
        raise SystemExit(f"xmodal {' '.join(args[:3])} … failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    return r, time.perf_counter() - t


def random_subset(train: Path, out: Path, keep: str, seed: int) -> int:
    """A seeded random subset of the manifest's rows, image paths re-based as `xmodal data reduce` does."""
    from xmodal.data.reduce import parse_keep, resolve_keep, rewrite_path
    from xmodal.fsutil import write_text_atomic

    rows = C.manifest_rows(train)
    n = resolve_keep(parse_keep(keep), len(rows))
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    picked = [{**rows[i], "image": rewrite_path(rows[i]["image"], train.parent, out.parent)} for i in idx]
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in picked))
    return n


def train(a, data: Path, out: Path, seed: int, cache: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)  # a run left by an earlier invocation
    _, wall = xmodal(
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        MODEL,
        "--batch-size",
        str(a.batch_size),
        "--steps",
        str(a.steps),
        "--lr",
        str(a.lr),
        "--warmup",
        str(max(1, a.steps // 10)),
        "--weight-decay",
        "0.1",
        "--seed",
        str(seed),
        "--save-every",
        str(a.steps),
        "--no-progress",
        "--cache-dir",
        str(cache),
    )
    return wall


def evaluate(run: Path, test, json_out: Path) -> dict:
    """What `xmodal eval RUN --data test.jsonl --json FILE` computes (its default tasks), in this process."""
    from xmodal.eval import evaluate as xm_evaluate
    from xmodal.eval import write_json
    from xmodal.models import load_encoder

    enc = load_encoder(run, device="cpu")
    res = xm_evaluate(enc, test, "retrieval,zeroshot", skip_unavailable=True, progress=False)
    write_json(json_out, res)
    return res


def pick(res: dict, path: tuple[str, ...]) -> float:
    for k in path:
        res = res[k]
    return float(res)


def label_spread(manifest: Path) -> str:
    """Shapes per class (the label: the first shape's kind) and share of one-shape images."""
    rows = C.manifest_rows(manifest)
    kinds = Counter(r.get("label") for r in rows)
    single = sum(1 for r in rows if len(r.get("shapes", [])) == 1)
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + f"; one-shape {single / len(rows):.0%}"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    started = time.time()
    machine = C.machine_line()
    work = a.work_dir
    data = C.ensure_shapes(work, n_train=a.shapes_images)
    cache = work / "cache"
    root = work / "data_reduce"
    root.mkdir(parents=True, exist_ok=True)
    train_jsonl = data / "train.jsonl"
    t = time.perf_counter()
    reducer = C.ensure_model(work, data, steps=a.reducer_steps, model=MODEL)
    reducer_s = time.perf_counter() - t

    from xmodal.data import load_dataset
    from xmodal.models import load_encoder

    size = load_encoder(reducer, device="cpu").image_size
    test = load_dataset(data / "test.jsonl", size, cache_dir=cache, progress=False)
    results: dict[str, list[dict]] = {v: [] for v in a.variants}
    subsets: dict[str, str] = {}
    walls: dict[str, list[float]] = {v: [] for v in a.variants}
    reduce_s: list[float] = []
    summary_line = ""
    for seed in a.seeds:
        for variant in a.variants:
            manifest = train_jsonl
            if variant in ("reduced", "uniform"):
                manifest = root / f"train-{variant}-s{seed}.jsonl"
                pick_rule = "nearest" if variant == "reduced" else "uniform"
                r, wall = xmodal(
                    "data",
                    "reduce",
                    str(train_jsonl),
                    "--keep",
                    a.keep,
                    "--model",
                    str(reducer),
                    "--out",
                    str(manifest),
                    "--seed",
                    str(seed),
                    "--pick",
                    pick_rule,
                    "--cache-dir",
                    str(cache),
                    "--no-progress",
                )
                reduce_s.append(wall)
                summary_line = r.stdout.strip().splitlines()[-1]
                print(f"  {summary_line} ({wall:.0f} s)", flush=True)
            elif variant == "random":
                manifest = root / f"train-random-s{seed}.jsonl"
                random_subset(train_jsonl, manifest, a.keep, seed)
            if seed == a.seeds[0]:
                subsets[variant] = label_spread(manifest)
            run = root / f"run-{variant}-s{seed}"
            walls[variant].append(train(a, manifest, run, seed, cache))
            res = evaluate(run, test, root / f"eval-{variant}-s{seed}.json")
            results[variant].append(res)
            print(
                f"{variant:8s} seed {seed}: "
                + ", ".join(f"{name} {pick(res, path):.3f}" for name, path in METRICS)
                + f" (train {walls[variant][-1]:.0f} s)",
                flush=True,
            )

    n_train = len(C.manifest_rows(train_jsonl))
    headers = ["training data", "images", *[f"{m} (mean; per seed)" for m, _ in METRICS], "train s (median)"]
    rows = []
    means: dict[str, dict[str, float]] = {}
    for variant in a.variants:
        n = (
            n_train
            if variant == "all"
            else len(C.manifest_rows(root / f"train-{variant}-s{a.seeds[0]}.jsonl"))
        )
        cells = []
        for name, path in METRICS:
            vals = [pick(r, path) for r in results[variant]]
            means.setdefault(variant, {})[name] = statistics.mean(vals)
            cells.append(f"{statistics.mean(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
        rows.append([variant, n, *cells, statistics.median(walls[variant])])
    body = C.table(headers, rows)
    if "all" in means:
        diff_rows = [
            [v, *[f"{means[v][m] - means['all'][m]:+.3f}" for m, _ in METRICS]]
            for v in a.variants
            if v != "all"
        ]
        body += "\n\nDifference of the means from `all`:\n\n" + C.table(
            ["training data", *[m for m, _ in METRICS]], diff_rows
        )
    body += "\n\nSubsets (first seed), class counts (label = first shape's kind):\n\n" + "\n".join(
        f"- {v}: {s}" for v, s in subsets.items()
    )
    reducer_note = f"trained now in {reducer_s:.0f} s" if reducer_s > 5 else "trained earlier, reused"
    seeds = ",".join(map(str, a.seeds))
    n_caps = sum(len(c) for c in test.captions)
    body += (
        f"\n\nRecipe: {MODEL}, {a.steps} steps of batch {a.batch_size} for every run (so a half sees each "
        f"image about twice as often as `all`), lr {a.lr}, warm-up {max(1, a.steps // 10)}, weight decay "
        f"0.1, precision auto, seeds {seeds}; train s is the whole `xmodal train` process (a subset's first "
        f"run decodes its images into the cache). Test split: {len(test)} images, {n_caps} captions, "
        f"evaluated in fp32. Reducing model: {reducer.name} ({MODEL}, {a.reducer_steps} steps of batch 128, "
        f"lr 1e-3 on the full training split; {reducer_note})."
    )
    if reduce_s:
        body += f" `xmodal data reduce` took {statistics.median(reduce_s):.0f} s per call (median)"
        body += f"; the last printed `{summary_line.split(' → ')[0]}`." if summary_line else "."
    C.record(
        "data_reduce",
        f"Data reduction: all vs reduced vs random half (shapes, {a.steps} steps)",
        body,
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )
    print(json.dumps(means, indent=1))


if __name__ == "__main__":
    main()
