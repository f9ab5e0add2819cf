"""What makes xmodal's training step faster on the CPU at hand (issue 15, point 2): variants of the same step,
each a Trainer in this process on the same real batches, timed in interleaved rounds.

- `default`: the trainer as it ships (`--precision auto`, attention written out on CPUs, text trimmed);
- `SDPA attention`: open_clip's nn.MultiheadAttention path instead (scaled_dot_product_attention's math
  kernel, what the trainer ran before xmodal/models/attention.py);
- `unpacked text`: the text tower on the trimmed padded batch, without packing each caption's own rows
  (xmodal/models/text.py); it matters on data whose captions differ in length (`--dataset emoji`);
- `1 thread`: torch.set_num_threads(1) (the default uses every core);
- `--compile`: torch.compile (inductor) of the feature forward; its compile seconds are the first steps'
  excess over its steady step, and the break-even is compile seconds / seconds saved per step;
- `--patch-dropout`, `--tome`: cheaper steps that change what is trained (quality at equal wall-clock is
  measured by benchmarks/objectives.py, and against open_clip by train_vs_open_clip.py `--xm-variant`).

Model FLOP/s of the default step against the measured matmul peak at the dtype used.

    python benchmarks/step_variants.py                 # xm-tiny, batch 128, shapes
    python benchmarks/step_variants.py --dataset emoji --variants default,"unpacked text"
    python benchmarks/step_variants.py --quick --no-write
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from profile_train import step_flops_of  # noqa: E402

VARIANTS = {
    "default": {},
    "SDPA attention": {},
    "unpacked text": {},
    "1 thread": {},
    "--compile": {"compile": True},
    "--patch-dropout 0.5": {"patch_dropout": 0.5},
    "--patch-dropout 0.75": {"patch_dropout": 0.75},
    "--tome 8": {"tome": 8},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="xm-tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dataset", default="shapes", choices=["shapes", "emoji"])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --steps timed steps each")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 steps, batch 32")
    p.add_argument("--work", type=Path, default=C.DEFAULT_WORK / "step_variants")
    C.add_record_args(p)
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.steps, a.batch_size = 2, 2, 32
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return a


def make_trainer(a, data: Path, name: str):
    from xmodal.train.batcher import Batcher
    from xmodal.train.config import resolve_config
    from xmodal.train.trainer import Trainer

    out = a.work / name.replace(" ", "_").strip("-")
    shutil.rmtree(out, ignore_errors=True)
    flags = {"data": str(data), "out": str(out), "model": a.model, "batch_size": a.batch_size, "steps": 10**6}
    cfg = resolve_config(None, {**flags, "cache_dir": str(a.work / "cache"), **VARIANTS[name]})
    trainer = Trainer(cfg)
    trainer.batcher = Batcher(trainer._load(cfg.data), trainer.tokenizer, cfg, trainer.dist)
    trainer._masked_until = 10**9  # what fit() sets: every step masks
    if name == "SDPA attention":
        from xmodal.models.attention import remove_explicit_attention

        remove_explicit_attention(trainer.model)
    return trainer


def main(argv: list[str] | None = None) -> None:
    import torch

    a = parse_args(argv)
    started = time.time()
    dirs = C.dataset_dirs(C.DEFAULT_WORK, [a.dataset])
    if a.dataset not in dirs:
        raise SystemExit(f"--dataset {a.dataset}: its data could not be built here (see the line above)")
    data = dirs[a.dataset] / "train.jsonl"
    cores = torch.get_num_threads()
    trainers, first, steady, step = {}, {}, {v: [] for v in a.variants}, 0
    for name in a.variants:  # build, then the first two steps (compilation happens here)
        trainers[name] = make_trainer(a, data, name)
        t0 = time.perf_counter()
        for _ in range(2):
            trainers[name].train_step(step, *trainers[name].batcher.get(step))
            step += 1
        first[name] = time.perf_counter() - t0
        print(f"  {name}: first 2 steps {first[name]:.1f} s", flush=True)
    import xmodal.models.text as text_tower

    pack_below = text_tower.PACK_BELOW
    for r in range(a.rounds):
        for name, trainer in trainers.items():
            torch.set_num_threads(1 if name == "1 thread" else cores)
            text_tower.PACK_BELOW = 0.0 if name == "unpacked text" else pack_below
            for _ in range(a.steps):
                batch = trainer.batcher.get(step)
                t0 = time.perf_counter()
                trainer.train_step(step, *batch)
                steady[name].append(time.perf_counter() - t0)
                step += 1
        torch.set_num_threads(cores)
        text_tower.PACK_BELOW = pack_below
        print(f"  round {r + 1}/{a.rounds}", flush=True)
    flops = step_flops_of(trainers["default"]) if "default" in trainers else None
    dtype = C.xmodal_precision("auto")
    peak = C.peak_at(dtype)
    base = statistics.median(steady["default"]) if "default" in steady else None
    rows = []
    for name in a.variants:
        s = statistics.median(steady[name])
        compile_s = max(0.0, first[name] - 2 * s) if name == "--compile" else None
        saved = (base - s) if base is not None else None
        breakeven = (
            f"{compile_s / saved:.0f} steps" if compile_s is not None and saved and saved > 0 else "never"
        ) if compile_s is not None else ""  # fmt: skip
        rows.append(
            [
                f"`{name}`" if name.startswith("--") else name,
                f"{1000 * s:.0f}",
                f"{a.batch_size / s:.0f}",
                f"{base / s:.2f}×" if base else "",
                f"{compile_s:.0f}" if compile_s is not None else "",
                breakeven,
            ]
        )
    body = (
        f"`{a.model}`, batch {a.batch_size}, `--precision auto` ({dtype}), {a.dataset} batches; {a.rounds} "
        f"interleaved rounds of {a.steps} steps per variant, median step; {cores} threads unless said.\n\n"
        + C.table(["variant", "step ms", "samples/s", "vs default", "compile s", "compile pays after"], rows)
    )
    if flops and base:
        body += (
            f"\n\nDefault step: {flops / 1e9:.1f} GFLOP (FlopCounterMode, forward + backward) in "
            f"{1000 * base:.0f} ms = {flops / base / 1e9:.0f} GFLOP/s, **{100 * flops / base / peak:.0f} % "
            f"of the measured {dtype} matmul peak** ({peak / 1e9:.0f} GFLOP/s, 2048³, best of 10)."
        )
    C.record("step_variants", "Training-step variants", body, C.machine_line(), started=started,
             write=not a.no_write, path=a.record_to)  # fmt: skip


if __name__ == "__main__":
    main()
