"""Backward-compatible upgrades on real data: can a new model's queries search a gallery the old model
embedded, and at what share of a full re-embedding's cost?

    python benchmarks/compat.py                  # emoji: old xm-tiny on half the train set, new on all of it
    python benchmarks/compat.py --quick          # a smoke run (few steps; numbers mean nothing)

The old model is xm-tiny trained on a seeded random half of emoji's training set; the gallery is the test
set's images as the old model embedded them (an `xmodal index build`). The new models are trained on the
whole training set: xm-tiny (`clip`), xm-tiny with BCT (`xmodal distill --teacher OLD --objective
clip+bct`, from scratch, the old model frozen), and a larger config (default xm-small, 256-d, so only a
projection can bridge it). For each, with the gallery left as it is:

- **none**: the new model's queries against the old vectors (what an upgrade without compatibility gives);
- **BCT**: the compatible model's queries, directly;
- **projection**: `xmodal compat fit` on the training captions alone, then with `--pairs` image–caption
  pairs (XBT-style), the new queries mapped into the old space;
- **backfill**: `xmodal index upgrade` + `xmodal index backfill --max-chunks 1` in steps of a quarter of the
  gallery, t2i R@1/R@5 measured through the real index (merged old/new search) after each step.

Metrics are `xmodal eval --task compat` (R@K of M(old,old), M(new,new), M(new,old), M(proj(new),old);
BCT's criterion M(new, old) > M(old, old) on R@1). Cost is counted in embeddings computed: gallery images
re-embedded (what a backfill costs; 0 for the compatibility layers), and what fitting a projection
embedded (texts and images, each model). Training time is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_WORK,
    REPO,
    add_record_args,
    ensure_emoji,
    fmt,
    machine_line,
    manifest_rows,
    record,
    table,
    xmodal_env,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK / "compat")
    p.add_argument("--steps-old", type=int, default=600, help="training steps of the old model")
    p.add_argument("--steps-new", type=int, default=1000, help="training steps of each new model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--large-model", default="xm-small", help="the larger new config ('none' to skip)")
    p.add_argument("--steps-large", type=int, default=300, help="training steps of the larger config")
    p.add_argument("--pairs", type=int, default=256, help="image-caption pairs of the projection's 2nd stage")
    p.add_argument("--backfill-steps", type=int, default=4, help="backfill measured in this many chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="retrain the models even if their runs exist")
    p.add_argument("--quick", action="store_true", help="smoke run: 20/30 steps, 64 pairs")
    add_record_args(p)
    a = p.parse_args(argv)
    if a.quick:
        a.steps_old, a.steps_new, a.steps_large, a.pairs = 20, 30, 30, 64
    return a


# -- data and runs ---------------------------------------------------------------------------------------


def write_half(train: Path, out: Path, seed: int) -> int:
    """A seeded random half of the training rows as a manifest with absolute image paths."""
    rows = manifest_rows(train)
    random.Random(seed).shuffle(rows)
    half = rows[: len(rows) // 2]
    for r in half:
        r["image"] = str((train.parent / r["image"]).absolute())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in half), encoding="utf-8")
    return len(half)


def xmodal(args: list[Any], log: Path) -> float:
    """`python -m xmodal ARGS` as a child process (its output to `log`); wall seconds, or SystemExit."""
    cmd = [sys.executable, "-m", "xmodal", *map(str, args)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=xmodal_env())
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-1500:]}")
    return time.perf_counter() - t0


def train(a: argparse.Namespace, name: str, args: list[Any]) -> tuple[Path, float | None]:
    """A run under work/NAME trained by `args` (reused when it exists, unless --fresh); (run, seconds)."""
    run = a.work / name
    if (run / "checkpoints" / "latest.pt").is_file() and not a.fresh:
        took = (
            json.loads((run / "bench.json").read_text()).get("seconds")
            if (run / "bench.json").is_file()
            else None
        )
        print(f"reusing {run}", flush=True)
        return run, took
    shutil.rmtree(run, ignore_errors=True)
    print(f"training {name} …", flush=True)
    took = xmodal([*args, "--out", run], a.work / f"{name}.log")
    (run / "bench.json").write_text(json.dumps({"seconds": took, "args": list(map(str, args))}))
    return run, took


def common(a: argparse.Namespace, steps: int, seed: int) -> list[Any]:
    warm = max(1, steps // 10)
    return ["--batch-size", a.batch_size, "--steps", steps, "--warmup", warm, "--lr", "1e-3",
            "--precision", "auto", "--seed", seed, "--no-progress"]  # fmt: skip


# -- measuring -------------------------------------------------------------------------------------------


def compat_cells(
    a: argparse.Namespace, new: Path, old: Path, test: Path, proj: Path | None, tag: str
) -> dict:
    """`xmodal eval NEW --task compat --old OLD [--projection P]` on the test set → its cells."""
    out = a.work / f"eval-{tag}.json"
    args = ["eval", new, "--task", "compat", "--old", old, "--data", test, "--json", out]
    if proj is not None:
        args += ["--projection", proj]
    xmodal(args, a.work / f"eval-{tag}.log")
    return json.loads(out.read_text())["compat"]["cells"]


def index_recall(idx: Any, captions: list[str], owner: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """t2i R@K through the index: each caption's query (the index's query model, its compatibility layer,
    a partial backfill's merge) must find its image among the top K."""
    hits = np.zeros((len(captions), max(ks)), bool)
    for s in range(0, len(captions), 256):
        q = idx.embed_text(captions[s : s + 256])
        _, rows = idx.search_rows(q, k=max(ks))
        hits[s : s + 256] = rows == owner[s : s + 256, None]
    return {f"R@{k}": float(hits[:, :k].any(1).mean()) for k in ks}


def backfill_curve(a: argparse.Namespace, base: Path, model: Path, proj: Path | None, tag: str, test: Path):
    """(share re-embedded, gallery images embedded, t2i R@1, R@5) after upgrade and each backfill step."""
    from xmodal.index import open_index
    from xmodal.index.upgrade import backfill_index, upgrade_index

    idx_dir = a.work / f"idx-{tag}"
    shutil.rmtree(idx_dir, ignore_errors=True)
    shutil.rmtree(idx_dir.parent / f"{idx_dir.name}.work-backfill", ignore_errors=True)
    shutil.copytree(base, idx_dir)
    upgrade_index(idx_dir, str(model), projection=proj, log=lambda m: None)
    idx = open_index(idx_dir)
    rows = manifest_rows(test)
    row_of = {r: i for i, r in enumerate(idx.ids)}
    captions, owner = [], []
    for r in rows:
        for c in r["caption"] if isinstance(r["caption"], list) else [r["caption"]]:
            captions.append(c)
            owner.append(row_of[r["image"]])
    owner = np.array(owner)
    n = len(idx)
    chunk = math.ceil(n / a.backfill_steps)
    out = [(0.0, 0, *index_recall(idx, captions, owner).values())]
    embedded = 0
    while True:
        res = backfill_index(idx_dir, chunk_size=chunk, max_chunks=1, progress=False, log=lambda m: None)
        embedded += res["embedded_images"]
        idx = open_index(idx_dir)
        out.append((embedded / n, embedded, *index_recall(idx, captions, owner).values()))
        if res["finished"]:
            return out


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    started = time.time()
    a.work.mkdir(parents=True, exist_ok=True)
    emoji = ensure_emoji(DEFAULT_WORK)
    if emoji is None:
        raise SystemExit("emoji data unavailable (fonts-noto-color-emoji, unicode-data); see the README")
    train_all, test = emoji / "train.jsonl", emoji / "test.jsonl"
    half = a.work / "half.jsonl"
    n_half = write_half(train_all, half, a.seed)
    n_all = len(manifest_rows(train_all))

    old, t_old = train(a, "old", ["train", "--data", half, "--model", "xm-tiny", *common(a, a.steps_old, 0)])
    new, t_new = train(
        a, "new", ["train", "--data", train_all, "--model", "xm-tiny", *common(a, a.steps_new, 1)]
    )
    bct_args = [
        "distill",
        "--teacher",
        old,
        "--student",
        "xm-tiny",
        "--data",
        train_all,
        "--objective",
        "clip+bct",
    ]
    bct, t_bct = train(a, "new-bct", [*bct_args, *common(a, a.steps_new, 1)])
    # what each new model's training cost, beside the upgrade's own cost (wall-clock on this shared machine
    # would mix in other work; the run logs have it)
    t_new, t_bct = (
        f"{a.steps_new} steps",
        f"{a.steps_new} steps + old model on the {n_all} train pairs (cached)",
    )
    models = [("xm-tiny", new, t_new)]
    if a.large_model != "none":
        large, _ = train(
            a,
            "new-large",
            ["train", "--data", train_all, "--model", a.large_model, *common(a, a.steps_large, 1)],
        )
        models.append((a.large_model, large, f"{a.steps_large} steps"))

    projections: dict[tuple[str, str], tuple[Path, dict]] = {}
    for name, run, _ in models:
        for stage, extra in (("text", ["--texts-only"]), ("pairs", ["--pairs", a.pairs])):
            out = a.work / f"proj-{name}-{stage}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"fitting the {stage} projection of {name} …", flush=True)
            fit = [
                "compat",
                "fit",
                "--old",
                old,
                "--new",
                run,
                "--data",
                train_all,
                "--out",
                out,
                "--seed",
                a.seed,
            ]
            took = xmodal([*fit, *extra, "--quiet"], a.work / f"proj-{name}-{stage}.log")
            projections[(name, stage)] = (
                out,
                {**json.loads((out / "projection.json").read_text()), "took": took},
            )

    print("evaluating …", flush=True)
    rows = []

    def cost(p: dict | None) -> str:
        if p is None:
            return "0"
        e = p.get("embedded") or {}
        texts = sum(int(v.get("texts", 0)) for v in e.values())
        images = sum(int(v.get("images", 0)) for v in e.values())
        return f"{texts} texts + {images} images"

    def add(label: str, cells: dict, cell: str, fit: dict | None, training: str) -> None:
        c, base = cells[cell], cells["old_old"]
        if "skipped" in c:
            rows.append([label, "n/a", "n/a", "n/a", "0", cost(fit), training])
            return
        ok = [d for d in ("t2i", "i2t") if c[d]["R@1"] > base[d]["R@1"]]
        r1 = [fmt(c["t2i"]["R@1"]), fmt(c["i2t"]["R@1"])]
        rows.append([label, *r1, ", ".join(ok) or "no", "0", cost(fit), training])

    plain = compat_cells(a, new, old, test, None, "none")
    oo = plain["old_old"]
    rows.append(["no upgrade: the old model's own queries, M(old, old)", fmt(oo["t2i"]["R@1"]),
                 fmt(oo["i2t"]["R@1"]), "–", "0", "0", f"{a.steps_old} steps on {n_half}"])  # fmt: skip
    add("none (xm-tiny, `clip`)", plain, "new_old", None, t_new)
    bct_cells = compat_cells(a, bct, old, test, None, "bct")
    add("BCT (xm-tiny, `clip+bct`)", bct_cells, "new_old", None, t_bct)
    full_rows = []
    for name, run, took in models:
        for stage in ("text", "pairs"):
            p, pj = projections[(name, stage)]
            cells = compat_cells(a, run, old, test, p, f"{name}-{stage}")
            what = "captions only" if stage == "text" else f"captions + {a.pairs} pairs"
            add(f"projection, {what} ({name})", cells, "proj_old", pj, took)
        full_rows.append((name, cells["new_new"], took))
    n_test = str(len(manifest_rows(test)))
    for name, nn, took in [("xm-tiny, `clip+bct`", bct_cells["new_new"], t_bct), *full_rows]:
        new_new = [fmt(nn["t2i"]["R@1"]), fmt(nn["i2t"]["R@1"])]
        rows.append([f"full backfill, M(new, new) ({name})", *new_new, "–", n_test, "0", took])

    from xmodal.index.build import build_index
    from xmodal.models import load_encoder

    base_idx = a.work / "idx-old"
    build_index(
        load_encoder(str(old)), test, base_idx, model_source=str(old), progress=False, log=lambda m: None
    )
    curves = [("BCT (xm-tiny)", backfill_curve(a, base_idx, bct, None, "bct", test))]
    for name, run, _ in models:
        p, _ = projections[(name, "pairs")]
        curves.append(
            (f"projection + pairs ({name})", backfill_curve(a, base_idx, run, p, f"proj-{name}", test))
        )
    curve_rows = [
        [label, f"{share:.0%}", str(imgs), fmt(r1), fmt(r5)]
        for label, pts in curves
        for share, imgs, r1, r5 in pts
    ]

    body = (
        f"Emoji: old model xm-tiny on {n_half} of the {n_all} training emoji ({a.steps_old} steps), new "
        f"models on all {n_all} ({a.steps_new} steps), batch {a.batch_size}; gallery = the "
        f"{len(manifest_rows(test))} test images embedded by the old model; queries = their captions "
        "(t2i) and images (i2t). R@1 of the new model's queries on the old gallery (through the upgrade's "
        "layer) beside the old model's own, M(old, old), and the new model's own after a full backfill, "
        "M(new, new); `compatible` = BCT's criterion M(new, old) > M(old, old) per direction.\n\n"
        + table(
            [
                "upgrade",
                "t2i R@1",
                "i2t R@1",
                "compatible (> M(old, old))",
                "gallery images re-embedded",
                "fit embeddings (both models)",
                "model's training",
            ],
            rows,
        )
        + "\n\nDuring a backfill (`xmodal index upgrade`, then `xmodal index backfill --max-chunks 1` per "
        "step), t2i through the index (merged old/new search):\n\n"
        + table(["upgrade", "re-embedded", "gallery images embedded", "t2i R@1", "t2i R@5"], curve_rows)
    )
    record("compat", "Backward-compatible upgrades (emoji)", body, machine_line(), started=started,
           write=not a.no_write, path=a.record_to)  # fmt: skip


if __name__ == "__main__":
    main()
