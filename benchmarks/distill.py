"""Distillation at equal student wall-clock: small students from scratch, by `affinity`, by `feature`, and by
weight inheritance (+ `affinity`), each given the same seconds, the teacher-cache build counted.

Per data set (shapes: the built-in procedural set; emoji: held out by emoji, as in benchmarks/objectives.py):
1. a teacher, `--teacher-model` (xm-small) trained with `clip` for `--teacher-s` seconds, evaluated too;
2. students at `--budget-s` seconds each (steps = (budget − charged s) / step time, the step time from a
   short calibration run of each candidate):
   - xm-micro from scratch (`xmodal train`), by `clip+affinity` and by `clip+feature` (`xmodal distill`;
     xm-micro's 32-d embedding is projected into the teacher's 256-d space for `feature`);
   - the half-depth, half-width teacher (`inherit:TEACHER:layers=L/2,width=0.5`) from scratch, with the
     inherited weights and `clip` alone, and with them and `clip+affinity`.
   The distilled students are charged the teacher cache's build (embedding the training set once, measured
   in a fresh cache folder), the inherited ones the inheritance (loading the teacher and slicing it).
3. test R@1/5/10 both ways and zero-shot top-1 (labelled data) of the final weights, parameters, embedding
   throughput (test images per second, batch 256) and query latency (one text query, median of 50).

Training runs in-process through the CLI, so the per-run fixed cost (model construction, reading the
cached data, tokenising, the final checkpoint) lies outside the budgets and the one-off process start-up is
paid once. One seed per candidate unless `--seeds`: with one seed, differences below a few points of R@1
are within run-to-run noise (see the objectives ablation's seed spreads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402
from benchmarks import objectives as O  # noqa: E402

CANDIDATES = (  # (label, student, how)
    ("xm-micro scratch", "micro", "scratch"),
    ("xm-micro affinity", "micro", "affinity"),
    ("xm-micro feature", "micro", "feature"),
    ("half scratch", "half", "scratch"),
    ("half inherited, clip", "half", "inherit"),
    ("half inherited + affinity", "half", "inherit+affinity"),
)
COLUMNS = ("t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10", "zero-shot top-1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="shapes,emoji")
    p.add_argument("--teacher-model", default="xm-small")
    p.add_argument("--teacher-s", type=float, default=480.0, help="teacher training seconds per data set")
    p.add_argument("--budget-s", type=float, default=120.0, help="student seconds, charges included")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--precision", default="auto")
    p.add_argument("--calib-steps", type=int, default=8)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/xmodal-bench-distill"))
    C.add_record_args(p)
    a = p.parse_args(argv)
    a.datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    # what benchmarks/objectives.prepare_datasets reads
    a.shapes_images, a.quick_sizes, a.noise_fraction = 5000, False, 0.3
    return a


def step_times(run: Path, batch: int) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [batch / r["samples_per_s"] for r in rows if "samples_per_s" in r]


def common(a, steps: int, out: Path, seed: int) -> list[str]:
    warm = max(1, steps // 10)
    return [
        "--out",
        out,
        "--steps",
        steps,
        "--batch-size",
        a.batch_size,
        "--lr",
        a.lr,
        "--warmup",
        warm,
        "--weight-decay",
        a.weight_decay,
        "--precision",
        a.precision,
        "--log-every",
        1,
        "--save-every",
        10**9,
        "--keep-checkpoints",
        1,
        "--no-progress",
        "--cache-dir",
        a.work_dir / "cache",
        "--seed",
        seed,
    ]


def student_cmd(a, ds, how: str, student: str, half: tuple[Path, Path], teacher: Path) -> list:
    """The command (without --out/--steps) of one candidate."""
    model = {"micro": "xm-micro", "half": str(half[0])}[student]
    if how == "scratch":
        return ["train", "--data", ds.train, "--model", model, "--objective", "clip"]
    if how == "inherit":  # the inherited weights, trained with clip alone: inheritance without distillation
        return [
            "train",
            "--data",
            ds.train,
            "--model",
            half[0],
            "--pretrained",
            half[1],
            "--objective",
            "clip",
        ]
    if how == "inherit+affinity":
        return [
            "distill",
            "--teacher",
            teacher,
            "--student",
            f"inherit:{teacher}:{half_spec(teacher)}",
            "--data",
            ds.train,
        ]
    objective = {"affinity": "clip+affinity", "feature": "clip+feature"}[how]
    return ["distill", "--teacher", teacher, "--student", model, "--data", ds.train, "--objective", objective]


def half_spec(teacher: Path) -> str:
    import yaml

    layers = yaml.safe_load((teacher / "config.yaml").read_text())["model_config"]["vision_cfg"]["layers"]
    return f"layers={max(1, layers // 2)},width=0.5"


def calibrate(a, cmd: list, out: Path) -> float:
    """Median step time over `--calib-steps` timed steps after 3 warm-up ones."""
    shutil.rmtree(out, ignore_errors=True)
    C.run_xmodal_quiet([*cmd, *common(a, 3 + a.calib_steps, out, 0)])
    t = statistics.median(step_times(out, a.batch_size)[3:])
    shutil.rmtree(out, ignore_errors=True)
    return t


def measure_model(enc, test) -> dict:
    """Parameters, test images embedded per second (batch 256) and one text query's latency (median ms)."""
    enc.encode_images(test.images[:256])  # warm
    t0 = time.perf_counter()
    enc.encode_images(test.images)
    ips = len(test.images) / (time.perf_counter() - t0)
    queries = [c[0] for c in test.captions[:51]]
    enc.encode_texts(queries[:1])
    times = []
    for q in queries[1:]:
        t0 = time.perf_counter()
        enc.encode_texts([q])
        times.append(1000 * (time.perf_counter() - t0))
    params = sum(p.numel() for p in enc.model.parameters())
    return {"params": params, "images_per_s": ips, "query_ms": statistics.median(times)}


def cache_build_s(a, ds, teacher: Path) -> float:
    """Seconds to embed the training set with the teacher from nothing (what a first distillation pays;
    later runs reuse it): the teacher log of a one-step distillation after the cached features are removed.
    The data decoded at the teacher's size is in the data cache already (the teacher trained on it)."""
    out = a.work_dir / "cache-probe"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(a.work_dir / "cache" / "teacher-features", ignore_errors=True)
    C.run_xmodal_quiet(
        ["distill", "--teacher", teacher, "--student", "xm-micro", "--data", ds.train, *common(a, 1, out, 0)]
    )
    info = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["teacher"]
    assert info["chunks_computed"] > 0, info
    shutil.rmtree(out, ignore_errors=True)
    return float(info["seconds"])


def bench_dataset(a, ds, tests, log) -> dict:
    from xmodal.distill.inherit import parse_inherit, write_student
    from xmodal.eval import evaluate

    work = a.work_dir / ds.name
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"candidates": {}}

    def evaluate_run(run: Path) -> dict:
        from xmodal.models import load_encoder

        enc = load_encoder(str(run), device="cpu")
        enc.autocast_dtype = O.eval_dtype(a.precision)
        test = tests.get(ds.test, enc.image_size)
        tasks = ["retrieval"] + (["zeroshot"] if any(x is not None for x in test.labels) else [])
        ev = evaluate(enc, test, tasks=tasks, positives=ds.positives, skip_unavailable=True)
        return {c: O.dig(ev, p) for c, p, _ in O.METRICS if c in COLUMNS} | measure_model(enc, test)

    # 1. the teacher
    teacher = work / "teacher"
    t_cmd = ["train", "--data", ds.train, "--model", a.teacher_model, "--objective", "clip"]
    step = calibrate(a, t_cmd, work / "calib")
    t_steps = max(1, round(a.teacher_s / step))
    log(f"   teacher {a.teacher_model}: {step:.3f} s/step → {t_steps} steps")
    shutil.rmtree(teacher, ignore_errors=True)
    wall = C.run_xmodal_quiet([*t_cmd, *common(a, t_steps, teacher, 0)])
    res["teacher"] = {
        "steps": t_steps,
        "train_s": sum(step_times(teacher, a.batch_size)),
        "wall_s": wall,
        **evaluate_run(teacher),
    }
    log(f"   teacher t2i R@1 {res['teacher']['t2i R@1']:.3f}")
    # 2. the charges: the teacher cache's build, and the inheritance
    res["cache_s"] = cache_build_s(a, ds, teacher)
    t0 = time.perf_counter()
    half = write_student(parse_inherit(f"inherit:{teacher}:{half_spec(teacher)}"), work / "half")
    res["inherit_s"] = time.perf_counter() - t0
    log(f"   teacher cache build {res['cache_s']:.1f} s, inheritance {res['inherit_s']:.2f} s")
    # 3. the students
    for label, student, how in CANDIDATES:
        cmd = student_cmd(a, ds, how, student, half, teacher)
        charge = res["cache_s"] if cmd[0] == "distill" else 0.0
        charge += res["inherit_s"] if how.startswith("inherit") else 0.0
        step = calibrate(a, cmd, work / "calib")
        steps = max(1, round((a.budget_s - charge) / step))
        runs = []
        for seed in range(a.seeds):
            out = work / f"{label.replace(' ', '_').replace(',', '').replace('+', 'plus')}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            wall = C.run_xmodal_quiet([*cmd, *common(a, steps, out, seed)])
            train_s = sum(step_times(out, a.batch_size))
            runs.append(
                {"steps": steps, "train_s": train_s, "charge_s": charge, "wall_s": wall, **evaluate_run(out)}
            )
            log(
                f"   {label} seed {seed}: {steps} steps, {train_s + charge:.0f} s charged, "
                f"t2i R@1 {runs[-1]['t2i R@1']:.3f}"
            )
        res["candidates"][label] = runs
    return res


def _med(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def dataset_block(a, name: str, res: dict) -> str:
    cols = [c for c in COLUMNS if res["teacher"].get(c) is not None]
    headers = ["model", "steps", "s (train + charged)", *cols, "params (M)", "images/s", "query ms"]

    def row(label: str, runs: list[dict]) -> list:
        return [
            label,
            round(_med(runs, "steps")),
            C.fmt(_med(runs, "train_s") + _med(runs, "charge_s"), 0),
            *(C.fmt(_med(runs, c)) for c in cols),
            C.fmt(_med(runs, "params") / 1e6, 2),
            C.fmt(_med(runs, "images_per_s"), 0),
            C.fmt(_med(runs, "query_ms"), 2),
        ]

    t = res["teacher"]
    rows = [row(f"teacher {a.teacher_model}", [{**t, "charge_s": 0.0}])]
    rows += [row(label, runs) for label, runs in res["candidates"].items()]
    lines = [
        f"**{name}** — teacher cache build {res['cache_s']:.1f} s (charged to each `xmodal distill` "
        f"student), inheritance {res['inherit_s']:.2f} s (charged to the inherited ones).",
        "",
        C.table(headers, rows),
        "",
    ]
    cands = res["candidates"]
    for base, others in (
        ("xm-micro scratch", ("xm-micro affinity", "xm-micro feature")),
        ("half scratch", ("half inherited, clip", "half inherited + affinity")),
    ):
        b = _med(cands[base], "t2i R@1")
        diffs = [f"{o} {_med(cands[o], 't2i R@1') - b:+.3f}" for o in others]
        lines.append(f"t2i R@1 against {base} ({b:.3f}): " + ", ".join(diffs) + ".")
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse_args(argv)
    started = time.time()
    machine = C.machine_line()
    a.work_dir.mkdir(parents=True, exist_ok=True)
    sets, notes = O.prepare_datasets(a)
    tests = O.TestSets(a.work_dir / "cache")
    results = {}
    for ds in sets.values():
        print(f"== {ds.name}", flush=True)
        results[ds.name] = bench_dataset(a, ds, tests, lambda m: print(m, flush=True))
        raw = a.work_dir / "results.json"
        raw.write_text(json.dumps(results, indent=1, default=str))
    intro = (
        f"Equal student wall-clock: **{a.budget_s:g} s per student**, the charges included (steps = "
        f"(budget − charge) / calibrated step time); batch {a.batch_size}, AdamW lr {a.lr:g}, warm-up 10 % "
        f"then cosine, weight decay {a.weight_decay:g}, `--precision {a.precision}` "
        f"({C.xmodal_precision(a.precision)}), {a.seeds} seed(s) (cells: median). Teacher: {a.teacher_model} "
        f"trained with `clip` for {a.teacher_s:g} s. Students: xm-micro (32 px, 1 layer of width 32 per "
        "tower, 32-d) and the teacher's half-depth, half-width inheritance "
        "(`inherit:TEACHER:layers=L/2,width=0.5`, magnitude selection); images/s embeds the test images "
        "(batch 256) and query ms is one text query, both on this CPU."
    )
    body = intro + "\n\n" + "\n\n".join(dataset_block(a, n, r) for n, r in results.items())
    if notes:
        body += "\n\nNotes: " + "; ".join(notes) + "."
    C.record(
        "distill",
        "Distillation at equal student wall-clock",
        body,
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )
    return results


if __name__ == "__main__":
    main()
