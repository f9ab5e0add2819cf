"""Objectives ablation: every training objective on the same model, data and evaluation, at equal wall-clock.

Data sets (test splits never seen in training):
- shapes: the built-in procedural set; its test split, and probe.jsonl for the compositional probe
  (attribute / relation / object swaps);
- emoji: held out by emoji (all skin-tone variants of one emoji share a split, so no test emoji is ever seen
  in training; checked here on every run, and any overlap is dropped from the training split);
- digits: scikit-learn's 8×8 handwritten digits (`xmodal data digits`); its captions only name the class,
  so retrieval counts identical-caption items as positives (`--positives caption`);
- shapes-noisy: shapes with `--noise-fraction` (30 %) of the training items' captions shuffled among them
  (`xmodal data noisy`, the shuffled keys in train.noisy.json); test split and probe clean.

Candidates: objective specs (`clip`, `clip+uniformity:0.1(t=3)`), optionally followed by extra `xmodal train`
flags (`clip --aug-flip 0.5`), or flags alone (`--recipe improved`); `--candidates` takes them separated by
`;`. The default list is built from what is registered when the script runs; unknown objectives or flags
are skipped with a note in the block.

Equal wall-clock, not equal steps: before the timed runs every candidate trains a short calibration run on
the data set (`--calib-warmup` steps, then `--calib-steps` timed ones) in this same process; its step time is
the median of the timed steps, and its first run gets steps = round(budget / step time); later seeds' runs
take the step time from the median over every step of the candidate's finished runs (far more steps than
the calibration, so budgets converge on the true one). All use the same schedule
shape for all (linear warm-up over `--warmup-frac` of the steps, then cosine to 0). The actual training
seconds (the sum of the logged step intervals: batch fetch, forward, backward, optimiser step) are recorded
and shown beside the budget. Training runs in-process through the `xmodal train` command, so the per-run
fixed cost (model construction, reading the cached data, tokenising, the final checkpoint) lies outside the
measured steps and never counts against a candidate; the one-off process start-up is paid once, by an
untimed warm-up run. Runs are interleaved (seed-major: every candidate's seed 0, then seed 1, …) so that
background load hits all candidates alike.

Full run: 4 data sets × 11–12 candidates × 3 seeds = 132–144 runs of `--budget-s` (12 s) training, each
with ~1 s of fixed cost and ~0.5–2 s of evaluation, plus one calibration (~4 s) per candidate and data set
and the one-off data generation: ~37–41 min on a quiet 2-core machine. The script prints the whole
ablation's ETA after every run; scale `--budget-s` to the time at hand.

Evaluation of each run's final weights on the test split (`xmodal.eval.evaluate`, under the training's
autocast as xmodal's own validation, or `--eval-precision fp32`): t2i/i2t R@1/5/10,
zero-shot top-1 (labelled data), probe accuracy by swap type (shapes), modality gap. Aggregated over seeds
as median (min–max). A metric is marked ▲ when a candidate's median beats plain clip's by more than the seed
spread (the larger of the two candidates' min–max ranges), ▼ when it is worse by more than that.

    python benchmarks/objectives.py --quick --no-record   # smoke: tiny data, 2 candidates, 1 seed (~1 min)
    python benchmarks/objectives.py                       # 4 data sets × all candidates × 3 seeds × 12 s
    python benchmarks/objectives.py --datasets shapes --candidates "clip;siglip;sdm" --budget-s 30
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
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

if importlib.util.find_spec("xmodal") is None:  # run from anywhere: the package lives beside benchmarks/
    sys.path.append(str(C.REPO))

DATASETS = ("shapes", "emoji", "digits", "shapes-noisy")
BASELINE = "clip"
# The default candidates, where registered; any other registered objective is added on its own, except the
# regularisers below, which only make sense beside a main objective (covered by the combination here).
PREFERRED = (
    "clip",
    # augmentation of the plain baseline: open_clip's default crop, and the stronger setting
    "clip --aug-crop-scale 0.9",
    "clip --aug-crop-scale 0.8 --aug-word-drop 0.1",
    "siglip",
    "clip+alignment:0.1+uniformity:0.1",
    "multipos",
    "sdm",
    "cwcl",
    "momentum",
    # FILIP and m2-mix add their term to CLIP's (evaluation ranks by the pooled embeddings CLIP trains)
    "clip+filip:0.5",
    "clip+mixup:0.5",
    "noisy",
    "--recipe improved",
    "--recipe improved --aug-flip 0",  # a flip turns "left of" captions false (shapes, digits)
    # the fusion encoder (ALBEF): ITM on hard negatives, MLM, momentum distillation; evaluated with and
    # without ITM re-ranking of the ITC top --rerank-k, and the probe by the ITM head too
    "clip+itm",
    "clip+itm+mlm",
    "mod+itm+mlm",
    "clip+itm(synth=true)+mlm",
)
# only beside a main objective: geometry regularisers, and the fusion heads (they train no embedding space)
REGULARISERS = frozenset({"alignment", "uniformity", "itm", "mlm"})
# objectives that need more than a data set, measured by their own benchmark
ELSEWHERE = {
    "affinity": "needs a teacher: benchmarks/distill.py",
    "feature": "needs a teacher: benchmarks/distill.py",
    "dcmh": "trains hash heads on a trained model, not an embedding",
    "bebr": "trains hash heads on a trained model, not an embedding",
    "modx": "continual training from a previous model (--init-from): benchmarks/continual.py",
    "ctp": "continual training from a previous model (--init-from): benchmarks/continual.py",
    "bct": "compatibility with a previous model's gallery; the compatibility benchmark is to come",
}
QUICK_CANDIDATES = 2
# train flags the benchmark sets itself: a candidate may not change the budget, the schedule or the seed
RESERVED_FLAGS = frozenset(
    {
        "--data",
        "--out",
        "--steps",
        "--epochs",
        "--warmup",
        "--seed",
        "--resume",
        "--config",
        "--log-every",
        "--save-every",
        "--val",
        "--eval-every",
        "--cache-dir",
        "--progress",
        "--no-progress",
    }
)
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}

# (column, path into the eval results, True = higher is better / None = descriptive)
METRICS: tuple[tuple[str, tuple[str, ...], bool | None], ...] = (
    ("t2i R@1", ("retrieval", "t2i", "R@1"), True),
    ("t2i R@5", ("retrieval", "t2i", "R@5"), True),
    ("t2i R@10", ("retrieval", "t2i", "R@10"), True),
    ("i2t R@1", ("retrieval", "i2t", "R@1"), True),
    ("i2t R@5", ("retrieval", "i2t", "R@5"), True),
    ("i2t R@10", ("retrieval", "i2t", "R@10"), True),
    ("zero-shot top-1", ("zeroshot", "top1"), True),
    ("probe attribute", ("probe", "by_type", "attribute", "accuracy"), True),
    ("probe relation", ("probe", "by_type", "relation", "accuracy"), True),
    ("probe object", ("probe", "by_type", "object", "accuracy"), True),
    ("modality gap", ("gap", "gap"), None),
    # runs with a fusion encoder: the ITC top-k re-ranked by ITM, and the probe scored by the ITM head
    ("t2i R@1 itm", ("retrieval", "rerank", "t2i", "R@1"), True),
    ("t2i R@10 itm", ("retrieval", "rerank", "t2i", "R@10"), True),
    ("i2t R@1 itm", ("retrieval", "rerank", "i2t", "R@1"), True),
    ("probe attribute itm", ("probe_itm", "by_type", "attribute", "accuracy"), True),
    ("probe relation itm", ("probe_itm", "by_type", "relation", "accuracy"), True),
    ("probe object itm", ("probe_itm", "by_type", "object", "accuracy"), True),
    ("rerank ms/query", ("retrieval", "rerank", "ms_per_query"), None),
    # CoCa runs (--model xm-coca-tiny): captions of the first --caption-images test images, generated
    # (greedy) when the run trained a caption objective, and the nearest training caption by the run's ITC
    ("CIDEr", ("captioning", "CIDEr"), True),
    ("BLEU-4", ("captioning", "BLEU-4"), True),
    ("CIDEr beam 3", ("captioning_beam3", "CIDEr"), True),
    ("CIDEr nearest train caption", ("captioning_baseline", "CIDEr"), True),
    ("BLEU-4 nearest train caption", ("captioning_baseline", "BLEU-4"), True),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny data, the first 2 candidates, 1 seed, 1.5 s budget, batch 32",
    )
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {', '.join(DATASETS)}")
    p.add_argument(
        "--candidates",
        default=None,
        help="';'-separated candidates: an objective spec, optionally followed by extra `xmodal train` "
        "flags, or flags alone (default: the registered objectives, see PREFERRED)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per candidate (0 … N-1)")
    p.add_argument(
        "--budget-s", type=float, default=12.0, help="training seconds per run (steps = budget / step time)"
    )
    p.add_argument("--calib-warmup", type=int, default=2, help="calibration steps left out of the step time")
    p.add_argument("--calib-steps", type=int, default=6, help="timed calibration steps per candidate")
    p.add_argument("--min-steps", type=int, default=5, help="at least this many steps per run")
    p.add_argument("--model", default="xm-tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-frac", type=float, default=0.1, help="warm-up share of each run's steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--precision", default="auto", help="xmodal train --precision (auto: bf16 where native)")
    p.add_argument(
        "--eval-precision",
        choices=("train", "fp32"),
        default="train",
        help="evaluate under the training's autocast (as xmodal's own validation does) or in fp32",
    )
    p.add_argument(
        "--rerank-k", type=int, default=16, help="runs with a fusion encoder: ITM re-ranks the ITC top k"
    )
    p.add_argument(
        "--caption-images", type=int, default=300, help="CoCa runs: test images to caption (0: none)"
    )
    p.add_argument("--shapes-images", type=int, default=5000, help="training images of the shapes data set")
    p.add_argument("--noise-fraction", type=float, default=0.3, help="shapes-noisy: share of items shuffled")
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK)
    p.add_argument("--json", type=Path, default=None, help="raw results (default WORK/objectives/…json)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (WORK/objectives/run-PID)")
    C.add_record_args(p)
    a = p.parse_args(argv)
    a.quick_sizes = a.quick
    a.eval_precision_resolved = a.precision if a.eval_precision == "train" else "fp32"
    if a.quick:
        a.seeds, a.budget_s, a.batch_size = 1, min(a.budget_s, 1.5), min(a.batch_size, 32)
        a.calib_warmup, a.calib_steps, a.min_steps = 1, 2, min(a.min_steps, 3)
        a.shapes_images = min(a.shapes_images, 300)
    a.datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    bad = [d for d in a.datasets if d not in DATASETS]
    if bad or not a.datasets:
        p.error(f"--datasets {','.join(bad) or '(none)'}: choose from {', '.join(DATASETS)}")
    if a.seeds < 1 or a.budget_s <= 0 or a.calib_steps < 1 or a.calib_warmup < 0 or a.min_steps < 1:
        p.error("--seeds, --budget-s, --calib-steps and --min-steps must be positive, --calib-warmup ≥ 0")
    if not 0 <= a.warmup_frac < 1:
        p.error("--warmup-frac: a share of the steps, in [0, 1)")
    return a


# -- the rules (tested by hand in tests/test_benchmarks_objectives.py) ---------------------------------


def steps_for_budget(budget_s: float, step_s: float, min_steps: int = 1) -> int:
    """Optimiser steps that fill `budget_s` at the calibrated `step_s`: budget / step time, rounded to the
    nearest step (halves up), at least `min_steps`."""
    if not step_s > 0:
        raise ValueError(f"step time must be positive, got {step_s}")
    return max(min_steps, math.floor(budget_s / step_s + 0.5))


def warmup_steps(steps: int, frac: float) -> int:
    """Linear warm-up length: the same share of every run (the schedule's shape is equal), at least 1."""
    return max(1, round(steps * frac))


def calibrated_step_s(step_s: Sequence[float], warmup: int) -> float:
    """The step time of a calibration run: the median of its steps after the first `warmup`."""
    timed = list(step_s[warmup:]) or list(step_s)
    return C.median(timed)


def summarize(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median, min, max and spread (max − min) over seeds; None/NaN values (a failed run) left out."""
    xs = [float(v) for v in values if v is not None and v == v]
    if not xs:
        return None
    return {"median": C.median(xs), "min": min(xs), "max": max(xs), "spread": max(xs) - min(xs), "n": len(xs)}


def compare(cand: dict | None, base: dict | None, higher_is_better: bool | None = True) -> int:
    """+1 when `cand` beats `base` by more than the seed spread — the median difference exceeds the larger
    of the two min–max ranges — −1 when it is worse by more than that, else 0."""
    if cand is None or base is None or higher_is_better is None:
        return 0
    diff = cand["median"] - base["median"]
    if not higher_is_better:
        diff = -diff
    margin = max(cand["spread"], base["spread"])
    return 1 if diff > margin else -1 if -diff > margin else 0


def dig(d: Any, path: Sequence[str]) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, int | float) and not isinstance(d, bool) else None


# -- candidates -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    label: str
    objective: str | None  # None: the trainer's (or the recipe's) default objective
    flags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Candidate:
        parts = shlex.split(text)
        if not parts:
            raise ValueError("empty candidate")
        if parts[0].startswith("-"):
            return cls(" ".join(parts), None, tuple(parts))
        return cls(" ".join(parts), parts[0], tuple(parts[1:]))


def _train_options() -> set[str]:
    from typer.main import get_command

    from xmodal.cli import app

    cmd = get_command(app).commands["train"]
    return {o for prm in cmd.params for o in (*prm.opts, *prm.secondary_opts) if o.startswith("--")}


def why_unavailable(c: Candidate, options: set[str] | None = None) -> str | None:
    """None when the candidate can run here, else the reason (unknown objective, parameter or flag)."""
    from xmodal.errors import UserError
    from xmodal.objectives.registry import build, parse_spec

    if c.objective is not None:
        try:
            build(parse_spec(c.objective))
        except UserError as e:
            return str(e)
    options = _train_options() if options is None else options
    for f in c.flags:
        if not f.startswith("--"):
            continue
        name = f.split("=", 1)[0]
        if name in RESERVED_FLAGS:
            return f"{name}: set by the benchmark (budget, schedule and seed are the same for all)"
        if name not in options:
            return f"{name}: no such `xmodal train` option here"
    return None


def default_candidates() -> tuple[list[str], list[str]]:
    """(candidates, notes): PREFERRED where it runs here, then every other registered objective alone."""
    from xmodal.objectives import REGISTRY

    options = _train_options()
    out, notes = [], []
    for text in PREFERRED:
        why = why_unavailable(Candidate.parse(text), options)
        (notes.append(f"`{text}` not available ({why})") if why else out.append(text))
    specs = [text.split()[0] for text in PREFERRED if not text.startswith("-")]
    mentioned = {part.split(":")[0].split("(")[0] for spec in specs for part in spec.split("+")}
    rest = [name for name in sorted(REGISTRY) if name not in mentioned and name not in REGULARISERS]
    out += [name for name in rest if name not in ELSEWHERE]
    notes += [f"`{name}` not a candidate here ({ELSEWHERE[name]})" for name in rest if name in ELSEWHERE]
    return out, notes


def pick_candidates(a: argparse.Namespace) -> tuple[list[Candidate], list[str]]:
    if a.candidates is None:
        texts, notes = default_candidates()
        if a.quick:
            texts = texts[:QUICK_CANDIDATES]
            notes = []
    else:
        texts, notes = [t.strip() for t in a.candidates.split(";") if t.strip()], []
    out, seen = [], set()
    options = _train_options()
    for text in texts:
        try:
            c = Candidate.parse(text)
        except ValueError as e:
            notes.append(f"`{text}` skipped ({e})")
            continue
        why = why_unavailable(c, options)
        if why:
            print(f"note: skipping candidate `{text}`: {why}", flush=True)
            notes.append(f"`{text}` skipped ({why})")
        elif c.label not in seen:
            seen.add(c.label)
            out.append(c)
    if BASELINE not in seen:
        notes.append(f"`{BASELINE}` added: the baseline every candidate is compared with")
        out.insert(0, Candidate(BASELINE, BASELINE))
    return out, notes


# -- data sets ------------------------------------------------------------------------------------------


@dataclass
class DataSet:
    name: str
    train: Path
    test: Path
    probe: Path | None = None  # the probe's manifest (its negatives are evaluated through `test`)
    positives: str | None = None  # retrieval positives: None = the pair; "caption" = identical caption text
    note: str = ""
    info: dict = field(default_factory=dict)


def emoji_base(text: str) -> str:
    return "".join(ch for ch in text if ch not in _SKIN_TONES)


def held_out_by_emoji(folder: Path) -> tuple[Path, int, int]:
    """(training manifest with no test emoji, training rows dropped for it, test emoji). The built-in split
    already keeps every emoji (skin-tone variants included) in one split; should it ever not, the rows of
    test emoji are dropped from a copy of the training split (train-heldout.jsonl)."""
    train, test = C.manifest_rows(folder / "train.jsonl"), C.manifest_rows(folder / "test.jsonl")
    test_bases = {emoji_base(r.get("emoji") or r["image"]) for r in test}
    keep = [r for r in train if emoji_base(r.get("emoji") or r["image"]) not in test_bases]
    if len(keep) == len(train):
        return folder / "train.jsonl", 0, len(test_bases)
    from xmodal.fsutil import write_text_atomic

    out = folder / "train-heldout.jsonl"
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
    return out, len(train) - len(keep), len(test_bases)


def _ensure_emoji(work: Path, quick: bool) -> Path | None:
    if not quick:
        return C.ensure_emoji(work)
    out = work / "emoji-300"
    if not (out / "test.jsonl").is_file():
        try:
            from xmodal.data import make_emoji

            make_emoji(out, limit=300)
        except Exception as e:  # noqa: BLE001 - missing font / Unicode data: skip the data set, say why
            print(f"note: emoji data set not generated ({str(e).splitlines()[0]}); skipping emoji")
            return None
    return out


def _ensure_digits(work: Path) -> Path:
    out = work / "digits"
    if not (out / "test.jsonl").is_file():
        from xmodal.data.digits import make_digits

        print(f"generating digits in {out} …", flush=True)
        make_digits(out)
    return out


def with_probe(test: Path, probe: Path) -> Path:
    """test.jsonl with each probe image's hard negatives attached (test-probe.jsonl beside it), so one
    evaluation embeds the test images once for retrieval, zero-shot, the gap and the probe. The probe's
    true caption is the test record's first caption (the canonical one), which the probe task scores."""
    out = test.with_name(test.stem + "-probe.jsonl")
    if out.is_file() and out.stat().st_mtime >= max(test.stat().st_mtime, probe.stat().st_mtime):
        return out
    negs = {r["image"]: (r["caption"], r["negatives"]) for r in C.manifest_rows(probe)}
    rows = []
    for r in C.manifest_rows(test):
        if r["image"] in negs:
            first = r["caption"][0] if isinstance(r["caption"], list) else r["caption"]
            if first != negs[r["image"]][0]:
                raise SystemExit(f"{probe}: {r['image']}'s true caption is not {test.name}'s first caption")
            r = {**r, "negatives": negs[r["image"]][1]}
        rows.append(r)
    from xmodal.fsutil import write_text_atomic

    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


def _ensure_noisy(shapes: Path, fraction: float, seed: int = 0) -> tuple[Path, dict]:
    from xmodal.data.noisy import make_noisy, side_file

    out = shapes.with_name(f"{shapes.name}-noisy{round(fraction * 100)}") / "train.jsonl"
    side = side_file(out)
    if out.is_file() and side.is_file():
        info = json.loads(side.read_text(encoding="utf-8"))
        if info.get("fraction") == fraction and info.get("seed") == seed:
            return out, info
    print(f"writing the noisy variant {out} …", flush=True)
    return out, make_noisy(shapes / "train.jsonl", out, fraction, seed)


def prepare_datasets(a: argparse.Namespace) -> tuple[dict[str, DataSet], list[str]]:
    work, notes, out = a.work_dir, [], {}
    shapes = None
    if {"shapes", "shapes-noisy"} & set(a.datasets):
        shapes = C.ensure_shapes(work, n_train=a.shapes_images, n_test=100 if a.quick_sizes else 1000)
    for name in a.datasets:
        if name == "shapes":
            test = with_probe(shapes / "test.jsonl", shapes / "probe.jsonl")
            out[name] = DataSet(name, shapes / "train.jsonl", test, shapes / "probe.jsonl")
        elif name == "shapes-noisy":
            train, info = _ensure_noisy(shapes, a.noise_fraction)
            out[name] = DataSet(
                name,
                train,
                with_probe(shapes / "test.jsonl", shapes / "probe.jsonl"),
                shapes / "probe.jsonl",
                note=f"{info['n_shuffled']} of {info['n_items']} training items' captions shuffled "
                f"({info['n_changed']} now wrong; keys in {train.name.removesuffix('.jsonl')}.noisy.json), "
                "test split and probe clean",
                info={k: info[k] for k in ("fraction", "seed", "n_items", "n_shuffled", "n_changed")},
            )
        elif name == "emoji":
            d = _ensure_emoji(work, a.quick_sizes)
            if d is None:
                notes.append("emoji skipped: the data set could not be generated here")
                continue
            train, dropped, n_test = held_out_by_emoji(d)
            out[name] = DataSet(
                name,
                train,
                d / "test.jsonl",
                note=f"held out by emoji: none of the {n_test} test emoji (skin tones folded) is in training"
                + (f" ({dropped} training rows dropped for it)" if dropped else " (checked)"),
                info={"dropped_train_rows": dropped, "test_emoji": n_test},
            )
        elif name == "digits":
            d = _ensure_digits(work)
            out[name] = DataSet(
                name,
                d / "train.jsonl",
                d / "test.jsonl",
                positives="caption",
                note="captions name only the class: retrieval counts identical-caption items as positives, "
                "and i2t R@5/10 equal R@1 (an image's top captions are copies of one text)",
            )
    return out, notes


# -- training, in this process -------------------------------------------------------------------------


def _memoise_tokenising() -> None:
    """Tokenising the same captions again for every run is fixed cost outside the timed steps; remember
    it per (tokenizer kind, captions) so the full ablation spends its time training."""
    try:
        from xmodal.train.batcher import Batcher
    except ImportError:
        return
    orig = getattr(Batcher, "_tokenize", None)
    if orig is None or getattr(orig, "_bench_memo", False):
        return
    memo: dict[tuple, Any] = {}

    def _tokenize(self, texts):
        tok = self.tokenizer
        inner = getattr(tok, "tokenizer", None)
        key = (type(tok).__qualname__, getattr(tok, "context_length", None),
               getattr(inner, "name_or_path", None), tuple(texts))  # fmt: skip
        if key not in memo:
            if len(memo) >= 8:
                memo.clear()
            memo[key] = orig(self, texts)
        return memo[key].clone()

    _tokenize._bench_memo = True  # type: ignore[attr-defined]
    Batcher._tokenize = _tokenize


def train_cmd(
    a: argparse.Namespace, ds: DataSet, c: Candidate, seed: int, steps: int, out: Path
) -> list[str]:
    argv = [
        "train", "--data", str(ds.train), "--out", str(out), "--model", a.model,
        "--batch-size", str(a.batch_size), "--steps", str(steps), "--lr", str(a.lr),
        "--warmup", str(warmup_steps(steps, a.warmup_frac)), "--weight-decay", str(a.weight_decay),
        "--precision", a.precision, "--log-every", "1", "--save-every", str(10**9),
        "--keep-checkpoints", "1", "--no-progress", "--cache-dir", str(a.work_dir / "cache"),
        "--seed", str(seed),
    ]  # fmt: skip
    if c.objective is not None:
        argv += ["--objective", c.objective]
    return argv + list(c.flags)  # after the benchmark's: a candidate's --lr or --batch-size wins


class RunFailed(Exception):
    pass


def train_run(a: argparse.Namespace, ds: DataSet, c: Candidate, seed: int, steps: int, out: Path) -> dict:
    """`xmodal train` in this process; the step times come from its metrics.jsonl (log every step)."""
    import yaml

    from xmodal.cli import app

    shutil.rmtree(out, ignore_errors=True)
    argv = train_cmd(a, ds, c, seed, steps, out)
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            app(argv, standalone_mode=False)
    except Exception as e:  # noqa: BLE001 - one candidate's failure is a note, not the end of the ablation
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RunFailed(f"{type(e).__name__}: {msg}"[:300]) from e
    finally:
        gc.collect()
    wall = time.perf_counter() - t0
    batch = int(yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "samples_per_s" in r]
    step_s = [batch / r["samples_per_s"] for r in rows]
    if len(step_s) != steps:
        raise RunFailed(f"logged {len(step_s)} of {steps} steps")
    return {
        "steps": steps,
        "batch_size": batch,
        "step_s": step_s,
        "train_s": sum(step_s),
        "wall_s": wall,  # the whole command, fixed cost included (not part of the budget)
        "fixed_s": wall - sum(step_s),
        "loss": [r["loss"] for r in rows],
        "final_terms": rows[-1].get("losses", {}) if rows else {},
    }


def steps_now(a: argparse.Namespace, calib: dict, earlier: Sequence[dict]) -> int:
    """Steps for the next run: budget / step time, the step time being the median over every step of this
    candidate's finished runs (dozens of steps, so more exact than the short calibration), else the
    calibration's."""
    times = [t for r in earlier for t in r.get("step_s", [])[a.calib_warmup :]]
    if not times:
        return calib["steps"]
    return steps_for_budget(a.budget_s, statistics.median(times), a.min_steps)


def calibrate(a: argparse.Namespace, ds: DataSet, c: Candidate, out: Path) -> dict:
    res = train_run(a, ds, c, 0, a.calib_warmup + a.calib_steps, out)
    shutil.rmtree(out, ignore_errors=True)
    step = calibrated_step_s(res["step_s"], a.calib_warmup)
    return {
        "step_s": step,
        "steps": steps_for_budget(a.budget_s, step, a.min_steps),
        "calib_step_s": res["step_s"],
        "fixed_s": res["fixed_s"],
    }


# -- evaluation -----------------------------------------------------------------------------------------


class TestSets:
    """Test (and probe) data decoded once per data set and image size, reused by every run."""

    def __init__(self, cache: Path) -> None:
        self.cache, self._d = cache, {}

    def get(self, path: Path, size: int):
        from xmodal.data import load_dataset

        key = (str(path), size)
        if key not in self._d:
            self._d[key] = load_dataset(path, size, cache_dir=self.cache, progress=False)
        return self._d[key]


def eval_dtype(precision: str):
    """The autocast dtype of the evaluation: the training's (as the trainer's own validation), or None
    (fp32) with --eval-precision fp32."""
    import torch

    from xmodal.train.precision import resolve_precision

    return None if precision == "fp32" else resolve_precision(precision, torch.device("cpu"))


def evaluate_run(
    run: Path, ds: DataSet, tests: TestSets, dtype=None, rerank_k: int = 16, caption_images_n: int = 300
) -> dict:
    """Retrieval, zero-shot (labelled data), modality gap and (with negatives in `test`) the probe, in one
    pass over the test split, by the run's final weights. With a fusion encoder also the retrieval with
    the ITC top `rerank_k` re-ranked by ITM (`retrieval.rerank`) and the probe by ITM (`probe_itm`)."""
    from xmodal.eval import evaluate
    from xmodal.models import load_encoder
    from xmodal.models.captioner import is_coca
    from xmodal.models.fusion import has_fusion

    enc = load_encoder(str(run), device="cpu")
    enc.autocast_dtype = dtype
    test = tests.get(ds.test, enc.image_size)
    tasks = ["retrieval", "gap"]
    tasks += ["zeroshot"] if any(x is not None for x in test.labels) else []
    probe = any((e or {}).get("negatives") for e in test.extras)
    tasks += ["probe"] if probe else []
    fusion = has_fusion(enc.model) and rerank_k > 0
    extra = {"rerank": "itm", "rerank_k": rerank_k} if fusion else {}
    out = evaluate(enc, test, tasks=tasks, positives=ds.positives, skip_unavailable=True, **extra)
    if fusion and probe:
        out["probe_itm"] = evaluate(enc, test, tasks=["probe"], score="itm")["probe"]
    if is_coca(enc.model) and caption_images_n > 0:
        out.update(captioning_eval(enc, run, ds, test, caption_images_n))
    return out


def captioning_eval(enc, run: Path, ds: DataSet, test, n: int) -> dict:
    """CIDEr/BLEU of the run's greedy (and beam-3) captions, only if it trained a caption objective (an
    untrained decoder's output means nothing), and of the nearest-training-caption baseline, on the first
    n test images."""
    import yaml

    from xmodal.eval.captioning import caption_metrics, nearest_caption_baseline
    from xmodal.models.captioner import Decoding, caption_images

    images = test.images[:n]
    refs = {i: list(test.captions[i]) for i in range(len(images))}
    train = [c for row in C.manifest_rows(ds.train) for c in _as_list(row.get("caption"))]
    nearest = nearest_caption_baseline(enc, train, images)
    out = {"captioning_baseline": caption_metrics(dict(enumerate(nearest)), refs)}
    if "caption" in str(yaml.safe_load((run / "config.yaml").read_text())["train"]["objective"]):
        t0 = time.perf_counter()
        gen = caption_images(enc, images, Decoding())
        out["captioning"] = caption_metrics(dict(enumerate(gen)), refs)
        out["captioning"]["ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(images)
        out["captioning"]["examples"] = [[gen[i], nearest[i], refs[i][0]] for i in range(min(3, len(gen)))]
        beam = caption_images(enc, images, Decoding(beam=3))
        out["captioning_beam3"] = caption_metrics(dict(enumerate(beam)), refs)
    return out


def _as_list(x) -> list[str]:
    return [x] if isinstance(x, str) else list(x or [])


def search_latency(run: Path, ds: DataSet, work: Path, depth: int, queries: int = 20) -> dict | None:
    """Median ms of one text query against an index of the test images, plain and with `--rerank depth`
    (the index's model loaded once; candidate images decoded from disk per query, as `xmodal search`)."""
    from xmodal.index import build_index, open_index
    from xmodal.models import load_encoder

    enc = load_encoder(str(run), device="cpu")
    out = work / f"latency-{ds.name}"
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        build_index(enc, ds.test, out, model_source=str(run), progress=False, log=lambda _m: None)
    idx = open_index(out)
    texts = [str(t) for t in idx.meta.column("caption").to_pylist() if t][:queries]
    res = {}
    for label, r in (("plain", 0), ("rerank", depth)):
        idx.search_text(texts[0], k=10, rerank=r)  # the model's first call (and the page cache) untimed
        times = []
        for t in texts:
            t0 = time.perf_counter()
            idx.search_text(t, k=10, rerank=r)
            times.append((time.perf_counter() - t0) * 1000)
        res[f"{label}_ms"] = statistics.median(times)
    n_items = len(idx)
    shutil.rmtree(out, ignore_errors=True)
    return {**res, "depth": depth, "n_items": n_items, "queries": len(texts)}


# -- aggregation and the table ---------------------------------------------------------------------------


def run_metrics(r: dict) -> dict[str, float | None]:
    """One run's flat metrics: the table's columns."""
    out: dict[str, float | None] = {
        "steps": float(r["steps"]),
        "train s": r["train_s"],
        "samples/s": r["steps"] * r["batch_size"] / r["train_s"] if r["train_s"] > 0 else None,
    }
    for name, path, _ in METRICS:
        out[name] = dig(r.get("eval", {}), path)
    return out


def aggregate(runs: Sequence[dict]) -> dict[str, dict | None]:
    """Per metric, the median/min/max/spread over the candidate's runs (failed runs left out)."""
    flat = [run_metrics(r) for r in runs if "eval" in r]
    names = ["steps", "train s", "samples/s", *(m[0] for m in METRICS)]
    return {n: summarize([f[n] for f in flat]) for n in names}


def _num(x: float, integer: bool) -> str:
    return str(round(x)) if integer else C.fmt(x)


def cell(s: dict | None, mark: int = 0, integer: bool = False) -> str:
    """'median (min–max)' (just the value for one seed or equal values), then ▲ / ▼ for +1 / −1."""
    if s is None:
        return "–"
    text = _num(s["median"], integer)
    if s["n"] > 1 and _num(s["min"], integer) != _num(s["max"], integer):
        text += f" ({_num(s['min'], integer)}–{_num(s['max'], integer)})"
    return text + (" ▲" if mark > 0 else " ▼" if mark < 0 else "")


def dataset_table(ds_name: str, agg: dict[str, dict[str, dict | None]], baseline: str = BASELINE) -> str:
    """Markdown table: one row per candidate, median (min–max) per metric, ▲/▼ against the baseline."""
    columns = ["steps", "train s", "samples/s"] + [
        name for name, _, _ in METRICS if any(agg[c].get(name) is not None for c in agg)
    ]
    direction = {name: hb for name, _, hb in METRICS}
    base = agg.get(baseline)
    rows = []
    for cand, metrics in agg.items():
        marks = {
            n: compare(metrics.get(n), base.get(n), direction.get(n)) if base and cand != baseline else 0
            for n in columns
        }
        better = [n for n in columns if marks[n] > 0]
        verdict = "(baseline)" if cand == baseline else ", ".join(better) or "–"
        cells = [cell(metrics.get(n), marks[n], integer=n == "steps") for n in columns]
        rows.append([f"`{cand}`", *cells, verdict])
    headers = ["candidate", *columns, f"beats {baseline} by > spread on"]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- the ablation ---------------------------------------------------------------------------------------


def _warm_process(a: argparse.Namespace, ds: DataSet, bench: Path) -> None:
    """One untimed short run: the process's one-off start-up (imports, first allocations, kernel choice)
    is paid here, not by whichever candidate calibrates first."""
    out = bench / "warm-process"
    with contextlib.suppress(RunFailed):
        train_run(a, ds, Candidate(BASELINE, BASELINE), 0, max(2, a.calib_warmup + 1), out)
    shutil.rmtree(out, ignore_errors=True)


class Eta:
    """Time left for the whole ablation, from the mean time of the calibrations and runs done so far."""

    def __init__(self, n_sets: int, n_cands: int, seeds: int) -> None:
        self.left = {"calib": n_sets * n_cands, "run": n_sets * n_cands * seeds}
        self.spent = {"calib": 0.0, "run": 0.0}
        self.done = {"calib": 0, "run": 0}

    def add(self, kind: str, seconds: float) -> None:
        self.spent[kind] += seconds
        self.done[kind] += 1
        self.left[kind] -= 1

    def skip(self, runs: int) -> None:  # a candidate dropped at calibration: its runs never happen
        self.left["run"] -= runs

    def minutes(self) -> float:
        mean = {k: self.spent[k] / self.done[k] if self.done[k] else 0.0 for k in self.spent}
        mean["run"] = mean["run"] or 2 * mean["calib"]
        return sum(max(0, self.left[k]) * mean[k] for k in mean) / 60


def ablate_dataset(
    a: argparse.Namespace,
    ds: DataSet,
    cands: list[Candidate],
    bench: Path,
    tests: TestSets,
    notes: list[str],
    eta: Eta,
    save=lambda: None,
) -> dict:
    """Calibrate every candidate on `ds`, then train and evaluate each for every seed (seed-major)."""
    print(f"== {ds.name}: calibrating {len(cands)} candidates …", flush=True)
    res: dict[str, Any] = {"calibration": {}, "runs": {}, "aggregate": {}}
    calib, live = res["calibration"], []
    for c in cands:
        t = time.perf_counter()
        try:
            calib[c.label] = calibrate(a, ds, c, bench / f"calib-{ds.name}")
        except RunFailed as e:
            print(f"   {c.label}: skipped ({e})", flush=True)
            notes.append(f"{ds.name}: `{c.label}` skipped, calibration failed ({e})")
            eta.skip(a.seeds)
            continue
        finally:
            eta.add("calib", time.perf_counter() - t)
        k = calib[c.label]
        print(f"   {c.label}: {k['step_s']:.3f} s/step → {k['steps']} steps", flush=True)
        live.append(c)
    runs: dict[str, list[dict]] = res["runs"]
    runs.update({c.label: [] for c in live})
    total, done = len(live) * a.seeds, 0
    for seed in range(a.seeds):  # seed-major: background load drifts over all candidates alike
        for i, c in enumerate(live):
            t0 = time.perf_counter()
            steps = steps_now(a, calib[c.label], runs[c.label])
            out = bench / f"{ds.name}-c{i}-s{seed}"
            rec: dict[str, Any] = {"candidate": c.label, "seed": seed, "steps": steps}
            try:
                rec.update(train_run(a, ds, c, seed, steps, out))
                t = time.perf_counter()
                rec["eval"] = evaluate_run(
                    out, ds, tests, eval_dtype(a.eval_precision_resolved), a.rerank_k, a.caption_images
                )
                rec["eval_s"] = time.perf_counter() - t
                if seed == 0 and "rerank" in rec["eval"].get("retrieval", {}):
                    res.setdefault("latency", {})[c.label] = search_latency(out, ds, bench, a.rerank_k)
            except RunFailed as e:
                rec["error"] = str(e)
                notes.append(f"{ds.name}: `{c.label}` seed {seed} failed ({e})")
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
            runs[c.label].append(rec)
            res["aggregate"][c.label] = aggregate(runs[c.label])
            save()  # a crash keeps every finished run
            done += 1
            eta.add("run", time.perf_counter() - t0)
            r10 = dig(rec.get("eval"), ("retrieval", "t2i", "R@10"))
            print(
                f"   [{done}/{total}] {c.label} seed {seed}: {steps} steps in "
                f"{rec.get('train_s', float('nan')):.1f} s (budget {a.budget_s:g}), t2i R@10 "
                f"{'–' if r10 is None else f'{r10:.3f}'}; whole ablation ETA {eta.minutes():.1f} min",
                flush=True,
            )
    return res


def dataset_block(a: argparse.Namespace, ds: DataSet, res: dict, tests: TestSets, size: int) -> str:
    test = tests.get(ds.test, size)
    n_caps = sum(len(cs) for cs in test.captions)
    n_train = sum(1 for ln in ds.train.read_text(encoding="utf-8").splitlines() if ln.strip())
    probe = ""
    if ds.probe is not None and ds.probe.is_file():
        probe = f", probe {len(C.manifest_rows(ds.probe))} two-shape test images × 3 swap types"
    head = (
        f"**{ds.name}** — {n_train} training images; test {len(test)} images / {n_caps} captions{probe}; "
        f"retrieval positives: {'identical caption text' if ds.positives == 'caption' else 'the pair'}."
        + (f" {ds.note[0].upper() + ds.note[1:]}." if ds.note else "")
    )
    calib = ", ".join(
        f"`{k}` {v['step_s'] * 1000:.0f} ms → {v['steps']}" for k, v in res["calibration"].items()
    )
    latency = ""
    if res.get("latency"):
        first = next(iter(res["latency"].values()))
        latency = (
            f"\n\nSearch latency, one text query at a time against a flat index of the {first['n_items']} "
            f"test images (median of {first['queries']} queries, k = 10, the model loaded once): "
            + "; ".join(
                f"`{k}` {v['plain_ms']:.1f} ms plain, {v['rerank_ms']:.1f} ms with `--rerank {v['depth']}`"
                for k, v in res["latency"].items()
            )
            + "."
        )
    captions = ""
    for label, recs in res["runs"].items():  # CoCa runs: seed 0's first captions beside the baseline's
        cap = next((r["eval"]["captioning"] for r in recs if "captioning" in r.get("eval", {})), None)
        if cap:
            captions += f"\n\n`{label}` (greedy, {cap['ms_per_image']:.1f} ms/image), generated / nearest "
            captions += "training caption / first reference: " + "; ".join(
                " / ".join(f"“{t}”" for t in ex) for ex in cap["examples"]
            )
    return (
        head
        + f"\n\nCalibrated step time → steps for the {a.budget_s:g} s budget: {calib}.\n\n"
        + dataset_table(ds.name, res["aggregate"])
        + latency
        + captions
    )


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    started = time.time()
    machine = C.machine_line()
    _memoise_tokenising()
    cands, notes = pick_candidates(a)
    sets, data_notes = prepare_datasets(a)
    notes += data_notes
    print(f"candidates: {', '.join(c.label for c in cands)}", flush=True)
    bench = a.work_dir / "objectives" / f"run-{os.getpid()}"
    bench.mkdir(parents=True, exist_ok=True)
    tests = TestSets(a.work_dir / "cache")
    if sets:
        _warm_process(a, next(iter(sets.values())), bench)
    gc.collect()
    gc.freeze()  # what exists now lives to the end: the per-run collections need not scan it again
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = a.json or a.work_dir / "objectives" / f"results-{stamp}-{os.getpid()}.json"
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {
        "machine": machine,
        "command": C.command_line(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "candidates": [asdict(c) for c in cands],
        "datasets": {},
        "notes": notes,
    }

    def save() -> None:
        from xmodal.eval.suite import jsonable, write_json

        raw["datasets"] = {
            n: {
                "train": str(sets[n].train),
                "test": str(sets[n].test),
                "probe": str(sets[n].probe) if sets[n].probe else None,
                "positives": sets[n].positives,
                "note": sets[n].note,
                "info": sets[n].info,
                **r,
            }
            for n, r in results.items()
        }
        raw["seconds"] = time.time() - started
        write_json(json_path, jsonable(raw))

    eta = Eta(len(sets), len(cands), a.seeds)
    for ds in sets.values():
        results[ds.name] = ablate_dataset(a, ds, cands, bench, tests, notes, eta, save)
    save()
    print(f"raw results: {json_path}", flush=True)
    from xmodal.models import ModelSpec, resolve_model_config

    size = int(resolve_model_config(ModelSpec(a.model))["vision_cfg"]["image_size"])
    blocks = [dataset_block(a, sets[n], r, tests, size) for n, r in results.items()]
    intro = (
        f"Equal wall-clock: **{a.budget_s:g} s of training per run** (steps = budget / step time; the first "
        f"seed's step time from a calibration of {a.calib_warmup} warm-up + {a.calib_steps} timed steps, "
        f"later seeds' from the median step of the candidate's finished runs), {a.model}, "
        f"batch {a.batch_size}, AdamW lr {a.lr:g} with linear warm-up over "
        f"{a.warmup_frac:.0%} of the steps then cosine to 0, weight decay {a.weight_decay:g}, "
        f"`--precision {a.precision}` ({C.xmodal_precision(a.precision)}), {a.seeds} seed(s). Cells: median "
        "(min–max) over seeds; **train s** = the summed logged step times, to check that the budgets "
        "matched; samples/s = steps × batch / train s. ▲ / ▼: beats / trails plain `clip` by more than "
        "the seed spread (median difference > the larger min–max range of the two). Test metrics of the "
        f"final weights ({C.xmodal_precision(a.eval_precision_resolved)} autocast)."
        + (" With one seed there is no spread: every difference is marked." if a.seeds == 1 else "")
    )
    body = intro + "\n\n" + "\n\n".join(blocks)
    if notes:
        body += "\n\nNotes: " + "; ".join(notes) + "."
    C.record(
        "objectives",
        "Objectives ablation at equal wall-clock" + (" (--quick)" if a.quick else ""),
        body + f"\n\nRaw results (every run, calibration and step time): `{json_path}`.",
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )
    if not a.keep:
        shutil.rmtree(bench, ignore_errors=True)
    raw["json"] = str(json_path)
    raw["body"] = body
    return raw


if __name__ == "__main__":
    main()
