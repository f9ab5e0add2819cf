"""Task-stream benchmark: continual pre-training stage after stage, and how much each method forgets.

The data set is cut into T stages (emoji by Unicode group, shapes by shape kind); every method trains
stage 1, then stage 2 starting from its stage-1 run (`xmodal train --init-from PREV_RUN`), and so on, and
after every stage its retrieval is measured on every stage's test split. Methods (all `clip` underneath):

- `finetune`: `--objective clip` on the new stage only;
- `replay`: the same with `--replay OLD --replay-fraction 0.2`, OLD the union of the earlier stages'
  training rows (a JSONL manifest written here); the replayed rows sit *inside* the batch
  (round(0.2 · batch) of its rows), so the batch size and the steps stay those of every other method;
- `modx`: `--objective clip+modx:W` (Mod-X, Ni et al. 2023; its term is a sum over the batch's rows, so W
  is the authors' α, 0.1–1 in their scripts) against the frozen previous-stage model;
- `ctp`: `--objective clip+ctp` (CTP's topology preservation, Zhu et al. 2023) with the same replay
  memory as `replay` (CTP runs on the mixed batch of new and memory rows, as the authors' ER variant);
- `joint`: the upper bound, trained at stage t on the union of stages 1..t, from its own stage t−1 run
  (`--joint-from previous`, the default; or from scratch), at the same steps and batch.

Equal compute per stage: the same steps, batch size, learning-rate schedule (linear warm-up, cosine to
0, restarted each stage) and seed for every method; what differs is what fills the batch and the loss. Mod-X
and CTP also run the frozen old model forward on every batch: that cost is in their train seconds, not
equalised. Stage 1 is the same run for every method (plain `clip` on stage 1 from scratch: no method has
old data or an old model yet), trained once per seed and shared.

Metrics (R = the mean of t2i and i2t R@K on one stage's test split; gallery = that split's images):
- forgetting matrix R[t, j]: after stage t (row), on stage j's test split (column); columns j > t are
  stages not trained yet;
- average R@K after the last stage: mean_j R[T, j];
- backward transfer (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS
  2017): BWT = mean_{j<T} (R[T, j] − R[j, j]); negative = forgetting;
- forgetting (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018):
  F = mean_{j<T} max_{t<T} (R[t, j] − R[T, j]); the drop from the best earlier value.

Training runs through the `xmodal train` command — in this process by default, as benchmarks/objectives.py
does (interpreter and imports paid once; later edits of the checkout cannot break a run half-way), or each
in a fresh `python -m xmodal train` process with `--subprocess`. One training process at a time.

    python benchmarks/continual.py --quick --record-to /tmp/continual.md   # smoke: 3 stages × 6 steps
    python benchmarks/continual.py                                         # emoji, 4 stages × 250 steps
    python benchmarks/continual.py --dataset shapes --stages 5 --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from objectives import TestSets, eval_dtype  # noqa: E402  (shared with the objectives benchmark)

if importlib.util.find_spec("xmodal") is None:  # run from anywhere: the package lives beside benchmarks/
    sys.path.append(str(C.REPO))

DATASETS = ("emoji", "shapes")
DEFAULT_STAGES = {"emoji": 4, "shapes": 5}
METHOD_NAMES = ("finetune", "replay", "modx", "ctp", "joint")


@dataclass(frozen=True)
class Method:
    name: str
    objective: str
    replay: bool = False  # --replay the union of the earlier stages' training rows
    joint: bool = False  # train on the union of stages 1..t (the upper bound)

    def describe(self, a: argparse.Namespace) -> str:
        if self.joint:
            start = "its stage t−1 run" if a.joint_from == "previous" else "scratch"
            return f"`--objective {self.objective}` on stages 1..t, from {start}"
        text = f"`--objective {self.objective}`"
        if self.replay:
            text += f" `--replay` earlier stages `--replay-fraction {a.replay_fraction:g}`"
        return text


def methods(a: argparse.Namespace) -> dict[str, Method]:
    return {
        "finetune": Method("finetune", "clip"),
        "replay": Method("replay", "clip", replay=True),
        "modx": Method("modx", f"clip+modx:{a.modx_weight:g}"),
        "ctp": Method("ctp", f"clip+ctp:{a.ctp_weight:g}", replay=a.ctp_replay),
        "joint": Method("joint", "clip", joint=True),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 stages × 6 steps, batch 16")
    p.add_argument("--dataset", choices=DATASETS, default="emoji")
    p.add_argument("--stages", type=int, default=None, help="number of stages, 2–8 (emoji 4, shapes 5)")
    p.add_argument(
        "--methods", default=",".join(METHOD_NAMES), help=f"comma list of {', '.join(METHOD_NAMES)}"
    )
    p.add_argument("--seeds", type=int, default=1, help="task streams per method (seeds 0 … N-1)")
    p.add_argument("--steps", type=int, default=250, help="optimiser steps per stage (every method)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (replayed rows count inside it)")
    p.add_argument("--model", default="xm-tiny")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-frac", type=float, default=0.1, help="warm-up share of each stage's steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--precision", default="auto", help="xmodal train --precision (auto: bf16 where native)")
    p.add_argument(
        "--eval-precision",
        choices=("train", "fp32"),
        default="train",
        help="evaluate under the training's autocast (as xmodal's own validation) or in fp32",
    )
    p.add_argument("--replay-fraction", type=float, default=0.2, help="replay/ctp: share of each batch")
    p.add_argument("--modx-weight", type=float, default=1.0, help="Mod-X's α (its term sums over rows)")
    p.add_argument("--ctp-weight", type=float, default=1.0, help="weight of CTP's term")
    p.add_argument(
        "--ctp-replay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ctp: with the replay memory (default; --no-ctp-replay: the new stage's rows only)",
    )
    p.add_argument(
        "--joint-from",
        choices=("previous", "scratch"),
        default="previous",
        help="joint: start stage t from its own stage t−1 run (default) or from scratch",
    )
    p.add_argument("--shapes-images", type=int, default=5000, help="training images of the shapes data set")
    p.add_argument("--subprocess", action="store_true", help="each training in its own `python -m xmodal`")
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK)
    p.add_argument("--json", type=Path, default=None, help="raw results (default WORK/continual/…json)")
    p.add_argument("--heatmap", type=Path, default=None, help="heat-map PNG (default WORK/continual/…png)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (WORK/continual/run-PID)")
    C.add_record_args(p)
    a = p.parse_args(argv)
    if a.quick:
        a.stages = a.stages or 3
        a.steps, a.batch_size, a.seeds = min(a.steps, 6), min(a.batch_size, 16), 1
        a.shapes_images = min(a.shapes_images, 500)
    a.stages = a.stages or DEFAULT_STAGES[a.dataset]
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in METHOD_NAMES]
    if bad or not a.methods:
        p.error(f"--methods {','.join(bad) or '(none)'}: choose from {', '.join(METHOD_NAMES)}")
    if not 2 <= a.stages <= 8:
        p.error(f"--stages {a.stages}: give 2–8")
    if a.seeds < 1 or a.steps < 1 or a.batch_size < 2:
        p.error("--seeds and --steps must be ≥ 1, --batch-size ≥ 2")
    if not 0 < a.replay_fraction < 1:
        p.error("--replay-fraction: a share of the batch, in (0, 1)")
    if not 0 <= a.warmup_frac < 1:
        p.error("--warmup-frac: a share of the steps, in [0, 1)")
    a.eval_precision_resolved = a.precision if a.eval_precision == "train" else "fp32"
    return a


# -- the stage split (tested by hand in tests/test_benchmarks_continual.py) -----------------------------

Unit = tuple[str, str | None]  # (group, subgroup); subgroup None = the whole group


def plan_stages(counts: Sequence[tuple[str, str | None, int]], n_stages: int) -> list[list[Unit]]:
    """Cut a data set into `n_stages` stages of about equal training rows, keeping the data's order.

    counts: (group, subgroup, training rows) in the data's own order (emoji: Unicode's). A group is one unit,
    unless it holds more than a stage's share (total / n_stages) and has subgroups: then each of its
    subgroups is a unit. Units stay in order and are dealt to stages by the middle of their cumulative
    range: unit u goes to stage floor((rows before u + rows(u) / 2) · n_stages / total). Every stage must
    get at least one unit with training rows, else ValueError (fewer stages, or smaller groups, are needed).
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be ≥ 1, got {n_stages}")
    groups: dict[str, dict[str | None, int]] = {}
    for g, s, n in counts:
        groups.setdefault(g, {})
        groups[g][s] = groups[g].get(s, 0) + n
    total = sum(sum(subs.values()) for subs in groups.values())
    if total <= 0:
        raise ValueError("no training rows to split")
    share = total / n_stages
    units: list[tuple[Unit, int]] = []
    for g, subs in groups.items():
        size = sum(subs.values())
        if size > share and any(s is not None for s in subs):
            units += [((g, s), n) for s, n in subs.items()]
        else:
            units.append(((g, None), size))
    stages: list[list[Unit]] = [[] for _ in range(n_stages)]
    rows = [0] * n_stages
    before = 0
    for unit, n in units:
        k = min(n_stages - 1, math.floor((before + n / 2) * n_stages / total))
        stages[k].append(unit)
        rows[k] += n
        before += n
    empty = [i + 1 for i, r in enumerate(rows) if r == 0]
    if empty:
        raise ValueError(
            f"{n_stages} stages leave stage(s) {', '.join(map(str, empty))} without training rows "
            f"(group sizes {', '.join(f'{g} {sum(s.values())}' for g, s in groups.items())}); "
            "use fewer stages"
        )
    return stages


def stage_of(group: str, subgroup: str | None, stages: Sequence[Sequence[Unit]]) -> int | None:
    """Index of the stage holding (group, subgroup): its subgroup unit, else its whole-group unit."""
    for k, units in enumerate(stages):
        if (group, subgroup) in units and subgroup is not None:
            return k
    for k, units in enumerate(stages):
        if (group, None) in units:
            return k
    return None


def stage_name(units: Sequence[Unit]) -> str:
    """'Smileys & Emotion; People & Body (hand-fingers-open, person)': groups, a split group's subgroups."""
    out: dict[str, list[str]] = {}
    for g, s in units:
        out.setdefault(g, [])
        if s is not None:
            out[g].append(s)
    return "; ".join(f"{g} ({', '.join(subs)})" if subs else g for g, subs in out.items())


# -- the continual-learning metrics ---------------------------------------------------------------------


def _check_square(R: Sequence[Sequence[float]]) -> int:
    T = len(R)
    if T < 1 or any(len(row) != T for row in R):
        raise ValueError("the forgetting matrix must be T×T (after stage t, on stage j's test split)")
    return T


def average_last(R: Sequence[Sequence[float]]) -> float:
    """Average R@K over every stage's test split after the last stage: mean_j R[T, j]."""
    T = _check_square(R)
    return sum(R[T - 1]) / T


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """BWT (Lopez-Paz & Ranzato 2017) = mean_{j<T} (R[T, j] − R[j, j]); NaN for one stage."""
    T = _check_square(R)
    if T < 2:
        return float("nan")
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(R: Sequence[Sequence[float]]) -> float:
    """Forgetting (Chaudhry et al. 2018) = mean_{j<T} max_{t<T} (R[t, j] − R[T, j]); NaN for one stage."""
    T = _check_square(R)
    if T < 2:
        return float("nan")
    return sum(max(R[t][j] for t in range(T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)


def stream_metrics(R: Sequence[Sequence[float]]) -> dict[str, float]:
    return {"avg": average_last(R), "bwt": backward_transfer(R), "forgetting": forgetting(R)}


def mean_matrix(mats: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Element-wise mean of several T×T matrices (one per seed)."""
    n = len(mats)
    return [[sum(m[t][j] for m in mats) / n for j in range(len(mats[0]))] for t in range(len(mats[0]))]


# -- data ------------------------------------------------------------------------------------------------


@dataclass
class StageData:
    index: int  # 0-based
    name: str
    train: Path
    test: Path
    upto: Path  # union of stages 0..index (joint)
    before: Path | None  # union of stages 0..index-1 (the replay memory); None for the first
    n_train: int
    n_test: int


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write, skipped when the content is already there (the image cache keys on the manifest)."""
    from xmodal.fsutil import write_text_atomic

    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _absolute(rows: Sequence[dict], folder: Path) -> list[dict]:
    return [{**r, "image": str((folder / r["image"]).resolve())} for r in rows]


def unit_key(dataset: str, row: dict) -> tuple[str, str | None]:
    """The (group, subgroup) a row belongs to: emoji's Unicode group and subgroup; shapes' first kind."""
    if dataset == "emoji":
        return str(row.get("label")), row.get("subgroup")
    return str(row.get("label")), None


def unit_counts(dataset: str, rows: Sequence[dict]) -> list[tuple[str, str | None, int]]:
    """(group, subgroup, rows) in the data's order (first appearance; shapes: the generator's KINDS)."""
    counts: dict[tuple[str, str | None], int] = {}
    for r in rows:
        k = unit_key(dataset, r)
        counts[k] = counts.get(k, 0) + 1
    items = list(counts.items())
    if dataset == "shapes":
        from xmodal.data.shapes import KINDS

        order = {k: i for i, k in enumerate(KINDS)}
        items.sort(key=lambda kv: order.get(kv[0][0], len(order)))
    return [(g, s, n) for (g, s), n in items]


def prepare_stages(a: argparse.Namespace) -> tuple[list[StageData], Path]:
    """Write every stage's train/test manifest, and the unions for replay and joint, under WORK/continual."""
    if a.dataset == "emoji":
        d = C.ensure_emoji(a.work_dir)
        if d is None:
            raise SystemExit("emoji: the data set could not be generated here (font / Unicode data missing)")
    else:
        d = C.ensure_shapes(a.work_dir, n_train=a.shapes_images, n_test=200 if a.quick else 1000)
    train = _absolute(C.manifest_rows(d / "train.jsonl"), d)
    test = _absolute(C.manifest_rows(d / "test.jsonl"), d)
    plan = plan_stages(unit_counts(a.dataset, train), a.stages)
    out = a.work_dir / "continual" / f"{d.name}-{a.stages}stages"
    out.mkdir(parents=True, exist_ok=True)

    def split(rows: list[dict]) -> list[list[dict]]:
        parts: list[list[dict]] = [[] for _ in plan]
        for r in rows:
            k = stage_of(*unit_key(a.dataset, r), plan)
            if k is not None:
                parts[k].append(r)
        return parts

    tr, te = split(train), split(test)
    stages = []
    for k, units in enumerate(plan):
        if not te[k]:
            raise SystemExit(f"stage {k + 1} ({stage_name(units)}) has no test rows; use fewer --stages")
        paths = {n: out / f"stage{k + 1}-{n}.jsonl" for n in ("train", "test", "upto", "before")}
        _write_if_changed(paths["train"], _jsonl(tr[k]))
        _write_if_changed(paths["test"], _jsonl(te[k]))
        _write_if_changed(paths["upto"], _jsonl([r for p in tr[: k + 1] for r in p]))
        if k:
            _write_if_changed(paths["before"], _jsonl([r for p in tr[:k] for r in p]))
        stages.append(
            StageData(
                k,
                stage_name(units),
                paths["train"],
                paths["test"],
                paths["upto"],
                paths["before"] if k else None,
                len(tr[k]),
                len(te[k]),
            )
        )
    return stages, d


# -- training --------------------------------------------------------------------------------------------


def _train_options() -> set[str]:
    from typer.main import get_command

    from xmodal.cli import app

    cmd = get_command(app).commands["train"]
    return {o for prm in cmd.params for o in (*prm.opts, *prm.secondary_opts) if o.startswith("--")}


def why_unavailable(m: Method, options: set[str] | None = None) -> str | None:
    """None when the method can run with this checkout, else why not (unknown objective or train flag)."""
    from xmodal.errors import UserError
    from xmodal.objectives.registry import build, parse_spec

    try:
        build(parse_spec(m.objective))
    except UserError as e:
        return str(e)
    options = _train_options() if options is None else options
    needed = ["--init-from"] + (["--replay", "--replay-fraction"] if m.replay else [])
    missing = [f for f in needed if f not in options]
    if missing:
        return f"{', '.join(missing)}: no such `xmodal train` option here"
    return None


class RunFailed(Exception):
    pass


def warmup_steps(steps: int, frac: float) -> int:
    return max(1, round(steps * frac))


def train_argv(
    a: argparse.Namespace,
    data: Path,
    out: Path,
    objective: str,
    seed: int,
    init_from: Path | None = None,
    replay: Path | None = None,
) -> list[str]:
    argv = [
        "train", "--data", str(data), "--out", str(out), "--model", a.model,
        "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--lr", str(a.lr),
        "--warmup", str(warmup_steps(a.steps, a.warmup_frac)), "--weight-decay", str(a.weight_decay),
        "--precision", a.precision, "--log-every", "1", "--save-every", str(10**9),
        "--keep-checkpoints", "1", "--no-progress", "--cache-dir", str(a.work_dir / "cache"),
        "--seed", str(seed), "--objective", objective,
    ]  # fmt: skip
    if init_from is not None:
        argv += ["--init-from", str(init_from)]
    if replay is not None:
        argv += ["--replay", str(replay), "--replay-fraction", str(a.replay_fraction)]
    return argv


def train_run(a: argparse.Namespace, argv: list[str], out: Path) -> dict:
    """One `xmodal train`; the step times come from its metrics.jsonl (logged every step)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if a.subprocess:
        out.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            [sys.executable, "-m", "xmodal", *argv], env=C.xmodal_env(), capture_output=True, text=True
        )
        if r.returncode:
            tail = (r.stderr or r.stdout).strip().splitlines()
            raise RunFailed((tail[-1] if tail else f"exit {r.returncode}")[:300])
    else:
        from xmodal.cli import app

        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                app(argv, standalone_mode=False)
        except Exception as e:  # noqa: BLE001 - one method's failure is a note, not the end of the benchmark
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RunFailed(f"{type(e).__name__}: {msg}"[:300]) from e
        finally:
            gc.collect()
    wall = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "samples_per_s" in r]
    step_s = [a.batch_size / r["samples_per_s"] for r in rows]
    if len(step_s) != a.steps:
        raise RunFailed(f"logged {len(step_s)} of {a.steps} steps")
    return {
        "train_s": sum(step_s),
        "wall_s": wall,
        "final_loss": rows[-1].get("loss") if rows else None,
        "final_terms": rows[-1].get("losses", {}) if rows else {},
    }


# -- evaluation ------------------------------------------------------------------------------------------


def evaluate_stages(run: Path, stages: Sequence[StageData], tests: TestSets, dtype) -> list[dict]:
    """Retrieval of the run's final weights on every stage's test split: per stage {t2i, i2t, R@1, R@5}
    (R@K = the mean of t2i and i2t)."""
    from xmodal.eval import evaluate
    from xmodal.models import load_encoder

    enc = load_encoder(str(run), device="cpu")
    enc.autocast_dtype = dtype
    out = []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for s in stages:
            r = evaluate(enc, tests.get(s.test, enc.image_size), tasks=["retrieval"])["retrieval"]
            t2i, i2t = r["t2i"], r["i2t"]
            out.append(
                {
                    "t2i": {k: t2i[k] for k in ("R@1", "R@5", "R@10") if k in t2i},
                    "i2t": {k: i2t[k] for k in ("R@1", "R@5", "R@10") if k in i2t},
                    "R@1": (t2i["R@1"] + i2t["R@1"]) / 2,
                    "R@5": (t2i["R@5"] + i2t["R@5"]) / 2,
                }
            )
    return out


# -- the stream -------------------------------------------------------------------------------------------


def stage_run(
    a: argparse.Namespace, m: Method, s: StageData, prev: Path | None, seed: int, out: Path
) -> list[str]:
    """The `xmodal train` argv of method m at stage s, starting from `prev` (the method's previous run)."""
    if m.joint:
        init = prev if a.joint_from == "previous" else None
        return train_argv(a, s.upto, out, m.objective, seed, init_from=init)
    replay = s.before if m.replay else None
    return train_argv(a, s.train, out, m.objective, seed, init_from=prev, replay=replay)


class Eta:
    def __init__(self, runs: int) -> None:
        self.left, self.spent, self.done = runs, 0.0, 0

    def add(self, seconds: float) -> None:
        self.left, self.spent, self.done = self.left - 1, self.spent + seconds, self.done + 1

    def minutes(self) -> float:
        return self.left * (self.spent / self.done if self.done else 0.0) / 60


def run_seed(
    a: argparse.Namespace,
    live: Sequence[Method],
    stages: Sequence[StageData],
    seed: int,
    bench: Path,
    tests: TestSets,
    eta: Eta,
    notes: list[str],
    save=lambda: None,
    res: dict | None = None,
) -> dict:
    """Every method's whole task stream for one seed: {method: {"rows": [per stage: {eval, train_s, …}]}}."""
    dtype = eval_dtype(a.eval_precision_resolved)
    res = {} if res is None else res
    root = bench / f"seed{seed}"
    shared = root / "shared-stage1"
    t0 = time.perf_counter()
    print(f"== seed {seed}, stage 1 ({stages[0].name}): shared by every method …", flush=True)
    try:
        first = train_run(a, train_argv(a, stages[0].train, shared, "clip", seed), shared)
    except RunFailed as e:
        notes.append(f"seed {seed}: stage 1 failed ({e})")
        return res
    first["eval"] = evaluate_stages(shared, stages, tests, dtype)
    first["shared"] = True
    eta.add(time.perf_counter() - t0)
    print(f"   stage 1: {_r1_line(first['eval'])}; ETA {eta.minutes():.1f} min", flush=True)
    for m in live:
        res[m.name] = {"rows": [first]}
    save()
    for m in live:
        prev = shared
        for s in stages[1:]:
            out = root / m.name / f"stage{s.index + 1}"
            t0 = time.perf_counter()
            argv = stage_run(a, m, s, prev, seed, out)
            try:
                rec = train_run(a, argv, out)
            except RunFailed as e:
                notes.append(f"seed {seed}: `{m.name}` stage {s.index + 1} failed ({e})")
                res[m.name]["error"] = str(e)
                print(f"   {m.name} stage {s.index + 1}: FAILED ({e})", flush=True)
                break
            rec["eval"] = evaluate_stages(out, stages, tests, dtype)
            res[m.name]["rows"].append(rec)
            if not a.keep and prev != shared:
                shutil.rmtree(prev, ignore_errors=True)
            prev = out
            save()
            eta.add(time.perf_counter() - t0)
            terms = ", ".join(f"{k} {v:.3g}" for k, v in rec["final_terms"].items())
            print(
                f"   {m.name} stage {s.index + 1}: {rec['train_s']:.0f} s ({terms}); "
                f"{_r1_line(rec['eval'])}; ETA {eta.minutes():.1f} min",
                flush=True,
            )
        if not a.keep and prev != shared:
            shutil.rmtree(prev, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(shared, ignore_errors=True)
    return res


def _r1_line(ev: Sequence[dict]) -> str:
    return "R@1 by stage " + " ".join(f"{e['R@1']:.3f}" for e in ev)


def matrices(stream: dict) -> dict[str, list[list[float]]] | None:
    """{"R@1": T×T, "R@5": T×T} of one method's finished stream; None when it did not finish."""
    rows = stream.get("rows", [])
    T = len(rows[0]["eval"]) if rows else 0
    if not rows or len(rows) != T:
        return None
    return {k: [[e[k] for e in r["eval"]] for r in rows] for k in ("R@1", "R@5")}


# -- tables and the heat-map ------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    xs = [v for v in values if v == v]
    if not xs:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def cell(s: dict[str, float], signed: bool = False) -> str:
    if s["n"] == 0:
        return "–"
    f = (lambda x: f"{x:+.3f}") if signed else (lambda x: f"{x:.3f}")
    text = f(s["mean"])
    if s["n"] > 1 and f(s["min"]) != f(s["max"]):
        text += f" ({f(s['min'])}–{f(s['max'])})"
    return text


def aggregate(results: dict[int, dict], names: Sequence[str]) -> dict[str, dict]:
    """Per method: mean matrices over seeds, and each metric's mean (min–max) over seeds."""
    out = {}
    for name in names:
        mats = [mx for r in results.values() if (mx := matrices(r.get(name, {}))) is not None]
        if not mats:
            continue
        done = [r[name]["rows"] for r in results.values() if matrices(r.get(name, {})) is not None]
        train_s = [sum(row["train_s"] for row in rows) for rows in done]
        agg: dict[str, Any] = {"seeds": len(mats), "train_s": summarize(train_s)}
        agg["terms"] = [  # the last logged loss terms of each stage's run, mean over seeds
            {k: sum(rows[t]["final_terms"].get(k, 0.0) for rows in done) / len(done)
             for k in done[0][t].get("final_terms", {})}
            for t in range(len(done[0]))
        ]  # fmt: skip
        for k in ("R@1", "R@5"):
            per = [stream_metrics(mx[k]) for mx in mats]
            agg[k] = {
                "matrix": mean_matrix([mx[k] for mx in mats]),
                **{m: summarize([p[m] for p in per]) for m in ("avg", "bwt", "forgetting")},
            }
        out[name] = agg
    return out


def matrix_table(agg: dict, stages: Sequence[StageData]) -> str:
    """Rows: after stage t; columns: stage j's test split; cells 'R@1 / R@5' (mean over seeds)."""
    r1, r5 = agg["R@1"]["matrix"], agg["R@5"]["matrix"]
    headers = ["after stage", *(f"stage {s.index + 1} test" for s in stages)]
    rows = [
        [str(t + 1), *(f"{r1[t][j]:.3f} / {r5[t][j]:.3f}" for j in range(len(stages)))]
        for t in range(len(stages))
    ]
    return C.table(headers, rows)


def terms_line(agg: dict) -> str:
    """'Last logged loss terms per stage: clip 2.1 / 0.11 / …; modx – / 0.12 / …' (mean over seeds)."""
    terms = agg.get("terms") or []
    names = list(dict.fromkeys(k for st in terms for k in st))
    parts = [f"{k} " + " / ".join(f"{st[k]:.3g}" if k in st else "–" for st in terms) for k in names]
    return "Last logged loss terms, stage 1 / 2 / …: " + "; ".join(parts) + "." if parts else ""


def summary_table(aggs: dict[str, dict]) -> str:
    headers = ["method", "avg R@1", "avg R@5", "BWT R@1", "forgetting R@1", "BWT R@5", "forgetting R@5",
               "train s"]  # fmt: skip
    rows = [
        [
            f"`{name}`",
            cell(g["R@1"]["avg"]),
            cell(g["R@5"]["avg"]),
            cell(g["R@1"]["bwt"], signed=True),
            cell(g["R@1"]["forgetting"], signed=True),
            cell(g["R@5"]["bwt"], signed=True),
            cell(g["R@5"]["forgetting"], signed=True),
            C.fmt(g["train_s"]["mean"]),
        ]
        for name, g in aggs.items()
    ]
    return C.table(headers, rows)


def stages_table(stages: Sequence[StageData]) -> str:
    return C.table(
        ["stage", "groups (subgroups where a group is split)", "train images", "test images"],
        [[s.index + 1, s.name, s.n_train, s.n_test] for s in stages],
    )


def heatmap(aggs: dict[str, dict], path: Path, title: str, key: str = "R@1") -> Path:
    """One panel per method: R[t, j] (mean over seeds), a shared colour scale, the value in each cell."""
    from matplotlib.figure import Figure

    names = list(aggs)
    T = len(aggs[names[0]][key]["matrix"])
    vmax = max(max(max(row) for row in aggs[n][key]["matrix"]) for n in names)
    fig = Figure(figsize=(2.4 * len(names) + 1.0, 3.3), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    im = None
    for ax, n in zip(axes, names, strict=True):
        mx = aggs[n][key]["matrix"]
        im = ax.imshow(mx, vmin=0.0, vmax=vmax or 1.0, cmap="viridis")
        for t in range(T):
            for j in range(T):
                v = mx[t][j]
                ax.text(j, t, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * (vmax or 1.0) else "white")  # fmt: skip
        g = aggs[n][key]
        ax.set_title(f"{n}\navg {g['avg']['mean']:.3f}, BWT {g['bwt']['mean']:+.3f}", fontsize=8)
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)], fontsize=7)
        ax.set_yticks(range(T), [str(t + 1) for t in range(T)], fontsize=7)
        ax.set_xlabel("test split of stage", fontsize=7)
    axes[0].set_ylabel("after training stage", fontsize=7)
    fig.suptitle(title, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label=f"{key} (mean t2i, i2t)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


# -- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    started = time.time()
    machine = C.machine_line()
    stages, data_dir = prepare_stages(a)
    print(f"{a.dataset}: {len(stages)} stages", flush=True)
    print(stages_table(stages), flush=True)
    notes: list[str] = []
    options = _train_options()
    table_ = methods(a)
    live, unavailable = [], {}
    for name in a.methods:
        why = why_unavailable(table_[name], options)
        if why:
            unavailable[name] = why
            notes.append(f"`{name}` not available here ({why})")
            print(f"note: `{name}` not available: {why}", flush=True)
        else:
            live.append(table_[name])
    if not live:
        raise SystemExit("no method can run here: " + "; ".join(notes))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = a.work_dir / "continual"
    bench = base / f"run-{os.getpid()}"
    json_path = a.json or base / f"results-{a.dataset}-{stamp}-{os.getpid()}.json"
    png = a.heatmap or base / f"heatmap-{a.dataset}-{stamp}-{os.getpid()}.png"
    tests = TestSets(a.work_dir / "cache")
    results: dict[int, dict] = {}
    raw: dict[str, Any] = {
        "machine": machine,
        "command": C.command_line(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "data": str(data_dir),
        "stages": [
            {**asdict(s), **{k: str(v) for k, v in asdict(s).items() if isinstance(v, Path)}} for s in stages
        ],  # fmt: skip
        "methods": {m.name: asdict(m) for m in live},
        "unavailable": unavailable,
        "notes": notes,
    }

    def save() -> None:
        from xmodal.eval.suite import jsonable, write_json

        raw["results"] = {str(k): v for k, v in results.items()}
        raw["seconds"] = time.time() - started
        write_json(json_path, jsonable(raw))

    eta = Eta(a.seeds * (1 + len(live) * (len(stages) - 1)))
    for seed in range(a.seeds):
        results[seed] = {}
        run_seed(a, live, stages, seed, bench, tests, eta, notes, save, results[seed])
    aggs = aggregate(results, [m.name for m in live])
    raw["aggregate"] = aggs
    save()
    print(f"raw results: {json_path}", flush=True)
    if not aggs:
        raise SystemExit("no method finished its task stream: " + "; ".join(notes))
    title = f"{a.dataset}, {len(stages)} stages × {a.steps} steps, batch {a.batch_size}: R@1 after each stage"
    heatmap(aggs, png, title)
    print(f"heat-map: {png}", flush=True)
    replay_rows = round(a.replay_fraction * a.batch_size)
    intro = (
        f"**{a.dataset}**, {len(stages)} stages (below), {a.model}, **{a.steps} steps × batch "
        f"{a.batch_size} per stage for every method** (AdamW lr {a.lr:g}, linear warm-up over "
        f"{a.warmup_frac:.0%} of the steps then cosine to 0, restarted each stage; weight decay "
        f"{a.weight_decay:g}; `--precision {a.precision}` = {C.xmodal_precision(a.precision)}), each stage "
        f"`--init-from` the method's previous stage; stage 1 is one plain `clip` run shared by all methods; "
        f"{a.seeds} seed(s). Methods: "
        + "; ".join(f"`{m.name}` {m.describe(a)}" for m in live)
        + f". Replayed rows count inside the batch ({replay_rows} of {a.batch_size}). R@K = mean of t2i and "
        f"i2t R@K on a stage's test split (its own images as the gallery; "
        f"{C.xmodal_precision(a.eval_precision_resolved)} autocast). BWT = mean_j<T (R[T,j] − R[j,j]) "
        "(Lopez-Paz & Ranzato 2017); forgetting = mean_j<T max_t<T (R[t,j] − R[T,j]) (Chaudhry et al. "
        "2018); avg = mean_j R[T,j]. **train s**: summed logged step times over all stages (Mod-X and CTP "
        "include the frozen old model's forward)."
    )
    parts = [intro, stages_table(stages), "**Summary** (after the last stage):", summary_table(aggs)]
    for name, g in aggs.items():
        parts += [f"**`{name}`** — R@1 / R@5, rows after stage t, columns stage j's test split:",
                  matrix_table(g, stages) + "\n\n" + terms_line(g)]  # fmt: skip
    parts.append(f"Heat-map: `{png}`. Raw results: `{json_path}`.")
    if notes:
        parts.append("Notes: " + "; ".join(notes) + ".")
    C.record(
        "continual",
        f"Task stream on {a.dataset}" + (" (--quick)" if a.quick else ""),
        "\n\n".join(parts),
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )
    if not a.keep:
        shutil.rmtree(bench, ignore_errors=True)
    raw["json"], raw["heatmap"] = str(json_path), str(png)
    return raw


if __name__ == "__main__":
    main()
