"""GPU training speed and MFU: xmodal's trainer vs open_clip's trainer (open_clip_train.main) on one CUDA GPU.

For each model (xm-small, and open_clip's ViT-B-32: random init, nothing is downloaded) both trainers train
the same config on the same CSV (shapes images written at the model's own image size, one row per
image–caption pair, as benchmarks/train_vs_open_clip.py writes it), with the same batch, steps, optimiser
(AdamW, lr, betas, eps, weight decay, grad clip 1.0), schedule and augmentation (random resized crop, area ≥
0.9). Each side runs at its best GPU setting: xmodal `--precision bf16 --device cuda` (its uint8 image
cache, decoded into a new, empty cache folder each run), open_clip `--precision amp_bf16 --device cuda`
with `--oc-workers` DataLoader workers. `--compile` adds `torch.compile` to both (xmodal `--compile`,
open_clip `--torchcompile`); `--compile-both` runs each side both ways.

Per side: steps, median step time (the first `--skip` steps left out: warm-up, compilation), samples/s
(batch / median step), end-to-end process wall, peak GPU memory (polled with nvidia-smi: the memory the
trainer's processes hold, CUDA context and allocator cache included), and MFU: model FLOPs of one step
(torch.utils.flop_counter on one forward + backward of the model on the GPU, full text context) × steps/s ÷
the GPU's measured dense bf16 matmul peak (8192³, best of 10); the datasheet peak is shown beside it where
the GPU is in the table below. Both sides log, and so synchronise, every step (xmodal always does;
open_clip here because of `--log-every-n-steps 1`), which is where the per-step times come from.

    python benchmarks/gpu.py                      # xm-small and ViT-B-32, 200 steps × batch 256 per side
    python benchmarks/gpu.py --compile-both       # each side with and without torch.compile
    python benchmarks/gpu.py --dry-run            # no GPU needed: the commands, and FLOPs counted on CPU

Without a CUDA device it says so in one line and exits with status 2 (unless --dry-run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

NO_CUDA = "benchmarks/gpu.py: no CUDA device here; run it on a GPU machine"
MODELS = "xm-small,ViT-B-32"
# dense (no sparsity) bf16 tensor-core peak by torch.cuda.get_device_name, TFLOP/s; first match wins
DATASHEET_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # H200 SXM (and GH200)
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM and PCIe alike
)
# open_clip's per-step log line (--log-every-n-steps 1): data wait, step time, and the exact samples/s
OC_STEP = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.eE+]+)/s"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=MODELS, help="comma list of model configs (xmodal's or open_clip's)")
    C.add_training_run_args(p, steps=200, batch_size=256, min_skip=5, runs_dir="gpu")
    p.add_argument("--images", type=int, default=5000, help="training images of the shapes data set")
    p.add_argument(
        "--oc-workers",
        type=int,
        default=min(8, max(1, (os.cpu_count() or 2) - 2)),
        help="open_clip DataLoader workers (default: min(8, cores − 2))",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    p.add_argument("--compile-both", action="store_true", help="each side with and without torch.compile")
    p.add_argument("--timeout", type=float, default=900, help="seconds one training run may take")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU needed: print the commands both sides would run and the FLOPs of one step (on CPU)",
    )
    p.add_argument(
        "--dry-run-batch", type=int, default=2, help="--dry-run: the tiny batch FLOPs are counted at"
    )
    p.add_argument("--no-flops", action="store_true", help="--dry-run: the commands only")
    C.add_record_args(p)
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not a.models:
        p.error("--models: at least one model")
    if a.steps < 2 or a.batch_size < 1 or a.dry_run_batch < 1:
        p.error("--steps ≥ 2, --batch-size ≥ 1, --dry-run-batch ≥ 1")
    a.skip = a.skip if a.skip is not None else max(5, a.steps // 10)
    a.skip = min(a.skip, a.steps - 1)
    a.warmup = max(1, a.steps // 10)
    return a


# -- the runs ---------------------------------------------------------------------------------------------


@dataclass
class Side:
    trainer: str  # "xmodal" | "open_clip"
    model: str
    compile: bool

    @property
    def label(self) -> str:
        if self.trainer == "xmodal":
            return "xmodal --precision bf16" + (" --compile" if self.compile else "")
        return "open_clip --precision amp_bf16" + (" --torchcompile" if self.compile else "")

    @property
    def slug(self) -> str:
        return (
            f"{'xm' if self.trainer == 'xmodal' else 'oc'}-{self.model}{'-compiled' if self.compile else ''}"
        )


def sides(a: argparse.Namespace) -> list[Side]:
    ways = [False, True] if a.compile_both else [a.compile]
    return [Side(t, m, c) for m in a.models for t in ("xmodal", "open_clip") for c in ways]


def image_size(model: str) -> int:
    from xmodal.models import ModelSpec, resolve_model_config

    return int(resolve_model_config(ModelSpec(model))["vision_cfg"]["image_size"])


def paths(a: argparse.Namespace, model: str) -> dict[str, Path]:
    size = image_size(model)
    bench = a.work_dir / "gpu"
    return {
        "shapes": bench / "data" / f"shapes-{size}px-{a.images}",
        "csv": bench / "data" / f"shapes-{size}px-{a.images}-{a.steps}x{a.batch_size}.csv",
        "run": bench / f"run-{os.getpid()}",
    }


def command(a: argparse.Namespace, side: Side) -> list[str]:
    """The exact command line of one side (flags as `xmodal train --help` / open_clip_train's have them)."""
    p = paths(a, side.model)
    run = p["run"]
    if side.trainer == "xmodal":
        cmd = [sys.executable, "-m", "xmodal", "train", "--data", str(p["csv"]),
               "--out", str(run / side.slug), "--model", side.model, "--batch-size", str(a.batch_size),
               "--steps", str(a.steps),
               "--lr", str(a.lr), "--warmup", str(a.warmup), "--weight-decay", "0.2", "--grad-clip", "1.0",
               "--precision", "bf16", "--device", "cuda", "--aug-crop-scale", "0.9", "--log-every", "1",
               "--save-every", "1000000", "--no-progress", "--cache-dir", str(run / f"{side.slug}-cache"),
               "--seed", "0"]  # fmt: skip
        return cmd + (["--compile"] if side.compile else [])
    cmd = [sys.executable, str(HERE / "_open_clip_main.py"), "--train-data", str(p["csv"]),
           "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath",
           "--csv-caption-key", "title", "--model", side.model, "--batch-size", str(a.batch_size),
           "--lr", str(a.lr), "--wd", "0.2", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
           "--warmup", str(a.warmup), "--epochs", "1", "--precision", "amp_bf16",
           "--workers", str(a.oc_workers), "--device", "cuda", "--logs", str(run / "oclogs"),
           "--name", side.slug, "--log-every-n-steps", "1", "--save-frequency", "1",
           "--grad-clip-norm", "1.0", "--seed", "0"]  # fmt: skip
    return cmd + (["--torchcompile"] if side.compile else [])


def child_env() -> dict:
    env = C.xmodal_env()
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # random init: nothing may download weights
    return env


class GpuMemPoll:
    """Peak GPU memory of this process's children, polled with nvidia-smi: per process where nvidia-smi
    shows our PIDs, else the device's used memory above the baseline taken at the start."""

    def __init__(self, uuid: str | None, every_s: float = 0.5) -> None:
        self.uuid, self.every_s = uuid, every_s
        self.peak_procs = self.peak_device = 0.0
        self.base = self._device_used()
        self._done = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _smi(self, *query: str) -> list[list[str]]:
        cmd = ["nvidia-smi", *query, "--format=csv,noheader,nounits"] + (
            ["-i", self.uuid] if self.uuid else []
        )
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [[c.strip() for c in ln.split(",")] for ln in out.splitlines() if ln.strip()]

    def _device_used(self) -> float:
        rows = self._smi("--query-gpu=memory.used")
        try:
            return float(rows[0][0]) if rows else float("nan")
        except ValueError:
            return float("nan")

    def _run(self) -> None:
        me = os.getpid()
        while not self._done.is_set():
            tree = set(C._tree(me)) - {me}
            used = 0.0
            for row in self._smi("--query-compute-apps=pid,used_memory"):
                with contextlib.suppress(ValueError, IndexError):
                    if int(row[0]) in tree:
                        used += float(row[1])
            self.peak_procs = max(self.peak_procs, used)
            self.peak_device = max(self.peak_device, self._device_used() - self.base)
            self._done.wait(self.every_s)

    def __enter__(self) -> GpuMemPoll:
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._th.join()

    def result(self) -> tuple[float | None, str]:
        if self.peak_procs > 0:
            return self.peak_procs, "nvidia-smi, trainer processes"
        if self.peak_device == self.peak_device and self.peak_device > 0:  # not NaN
            return self.peak_device, "nvidia-smi, device used − baseline"
        return None, "not available (no nvidia-smi)"


def run_side(a: argparse.Namespace, side: Side, uuid: str | None) -> dict:
    """One training process, measured from outside: per-step times from the trainer's own log."""
    run = paths(a, side.model)["run"]
    cmd = command(a, side)
    log = run / f"{side.slug}.log"
    shutil.rmtree(run / side.slug, ignore_errors=True)
    shutil.rmtree(run / f"{side.slug}-cache", ignore_errors=True)  # xmodal starts from an empty cache
    shutil.rmtree(run / "oclogs" / side.slug, ignore_errors=True)
    print(f"   {side.model}: {side.label} …", flush=True)
    with GpuMemPoll(uuid) as mem:
        r = C.run_measured(cmd, log, env=child_env(), cwd=C.REPO, timeout=a.timeout)
    shutil.rmtree(run / f"{side.slug}-cache", ignore_errors=True)
    out = {"side": side, "run": r, "mem": mem.result(), "log": log}
    if r.returncode:
        last = [ln for ln in r.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
        out["error"] = f"exit {r.returncode}: {last[0].strip()[:160]}"
        print(f"      failed ({out['error']}); see {log}", flush=True)
        return out
    if side.trainer == "xmodal":
        rows = [json.loads(ln) for ln in (run / side.slug / "metrics.jsonl").read_text().splitlines() if ln]
        out["step_s"] = [a.batch_size / x["samples_per_s"] for x in rows if "samples_per_s" in x]
        out["data_s"] = []
    else:
        m = OC_STEP.findall(r.stdout)
        out["step_s"] = [a.batch_size / float(x[3]) for x in m]
        out["data_s"] = [float(x[1]) for x in m]
    if len(out["step_s"]) < 2:
        out["error"] = f"{len(out['step_s'])} steps logged"
        return out
    steady = out["step_s"][a.skip :] or out["step_s"]
    out["median_step_s"] = C.median(steady)
    print(
        f"      {a.batch_size / out['median_step_s']:.0f} samples/s (median step "
        f"{1000 * out['median_step_s']:.1f} ms), {r.wall_s:.1f} s end to end",
        flush=True,
    )
    return out


# -- FLOPs and peak ---------------------------------------------------------------------------------------


def step_flops(model: str, batch: int, device: str = "cpu", bf16: bool = False) -> float:
    """Model FLOPs of one training step (forward + backward of both towers at the full text context, and
    the CLIP loss), as torch.utils.flop_counter counts them (matmuls, convolutions, attention products)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from xmodal.models import ModelSpec, build_model, resolve_model_config
    from xmodal.objectives import clip_loss

    spec = ModelSpec(model)
    cfg = resolve_model_config(spec)
    torch.manual_seed(0)
    net = build_model(spec, cfg, load_hf_weights=False).to(device).train()
    size = int(cfg["vision_cfg"]["image_size"])
    x = torch.rand(batch, 3, size, size, device=device)
    tok = torch.randint(1, 1000, (batch, int(cfg["text_cfg"].get("context_length", 77))), device=device)
    # the math kernel: FlopCounterMode has no formula for some fused attention kernels (the CPU flash one);
    # the FLOPs are the same whichever kernel and dtype run them
    cast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with FlopCounterMode(display=False) as fc, sdpa_kernel([SDPBackend.MATH]):
        with cast:
            img = net.encode_image(x, normalize=True)
            txt = net.encode_text(tok, normalize=True)
        loss = clip_loss(img.float(), txt.float(), net.logit_scale.exp())
        loss.backward()
    del net, x, tok, img, txt, loss
    return float(fc.get_total_flops())


def matmul_peak_cuda(n: int = 8192, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of an n×n @ n×n bf16 matmul on the current GPU (CUDA events)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        torch.matmul(a, b)
        t1.record()
        t1.synchronize()
        best = min(best, t0.elapsed_time(t1) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / best


def datasheet_bf16(name: str) -> float | None:
    """The dense bf16 datasheet peak (FLOP/s) of a GPU by its torch.cuda.get_device_name, if known."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def gpu_line() -> tuple[str, str | None]:
    """(one line on the GPU and the software, the GPU's UUID for nvidia-smi -i or None)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    uuid = getattr(props, "uuid", None)
    uuid = f"GPU-{uuid}" if uuid is not None and not str(uuid).startswith("GPU-") else uuid
    line = (
        f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
        f"{torch.cuda.device_count()} visible), CUDA {torch.version.cuda}, {C.machine_line()}"
    )
    return line, (str(uuid) if uuid else None)


# -- dry run ----------------------------------------------------------------------------------------------


def dry_run(a: argparse.Namespace) -> None:
    print(f"benchmarks/gpu.py --dry-run: {a.steps} steps × batch {a.batch_size} per side; commands:")
    for side in sides(a):
        print(f"[{side.model}] {side.label}:\n  {shlex.join(command(a, side))}")
    if a.no_flops:
        return
    for model in a.models:
        b = a.dry_run_batch
        f_b = step_flops(model, b)
        # FLOPs are a·B + c·B² (per-sample towers; the B×B logits): two batches fix a and c exactly
        f_1 = step_flops(model, 1) if b != 1 else f_b
        f_2 = f_b if b == 2 else step_flops(model, 2)
        c = (f_2 - 2 * f_1) / 2
        full = (f_1 - c) * a.batch_size + c * a.batch_size**2
        print(f"flops {model} batch={b}: {f_b:.0f} (one step, forward + backward, counted on cpu)")
        print(f"flops {model} batch={a.batch_size}: {full:.0f} (a·B + c·B², from batches 1 and 2)")


# -- the report -------------------------------------------------------------------------------------------


def report(a: argparse.Namespace, results: list[dict], flops: dict[str, float], peak: float, sheet) -> str:
    rows, best = [], {}
    for res in results:
        side = res["side"]
        mem, how = res["mem"]
        if "error" in res:
            rows.append([side.model, side.label, "failed: " + res["error"], *[None] * 9])
            continue
        step = res["median_step_s"]
        sps = a.batch_size / step
        fl = flops[side.model]
        data_ms = 1000 * C.median(res["data_s"][a.skip :]) if res["data_s"] else None
        rows.append(
            [
                side.model,
                side.label,
                len(res["step_s"]),
                1000 * step,
                sps,
                data_ms,
                res["run"].wall_s,
                res["run"].wall_s - sum(res["step_s"]),
                f"{mem:,.0f} ({how})" if mem else how,
                100 * fl / step / peak,
                100 * fl / step / sheet if sheet else None,
                fl / step / 1e12,
            ]
        )
        key = (side.model, side.trainer)
        if key not in best or sps > best[key][0]:
            best[key] = (sps, res["run"].wall_s, side.label)
    headers = [
        "model",
        "trainer",
        "steps",
        f"median step ms (first {a.skip} skipped)",
        "samples/s",
        "data wait ms/step (open_clip's log)",
        "end to end: process wall s",
        "of which outside the steps s",
        "peak GPU MiB",
        "MFU (measured peak)",
        "MFU (datasheet peak)",
        "model TFLOP/s",
    ]
    ratio_rows = []
    for model in a.models:
        xm, oc = best.get((model, "xmodal")), best.get((model, "open_clip"))
        if xm and oc:
            ratio_rows.append([model, f"{xm[2]} vs {oc[2]}", xm[0] / oc[0], oc[1] / xm[1]])
    flop_rows = [[m, f / 1e9, f / a.batch_size / 1e9] for m, f in flops.items()]
    body = (
        f"{a.steps} steps × batch {a.batch_size} per side on the shapes training set ({a.images} images at "
        "each model's image size; one CSV row per pair, the same file for both). xmodal decodes the images "
        "into a new, empty cache folder each run (in its end-to-end wall); open_clip decodes them in "
        f"{a.oc_workers} DataLoader workers. Dense bf16 matmul peak of this GPU (8192³, best of 10): "
        f"**{peak / 1e12:.0f} TFLOP/s** measured"
        + (f", {sheet / 1e12:.0f} TFLOP/s datasheet" if sheet else " (GPU not in the datasheet table)")
        + ".\n\n"
        + C.table(headers, rows)
        + "\n\nModel FLOPs of one step (torch.utils.flop_counter, forward + backward at the full text "
        "context; xmodal's eager step trims text padding, so it computes somewhat fewer):\n\n"
        + C.table(["model", "GFLOP per step", "GFLOP per sample"], flop_rows)
        + "\n\n"
        + C.table(
            [
                "model",
                "fastest of each side",
                "samples/s xmodal / open_clip",
                "end to end: open_clip wall / xmodal wall",
            ],
            ratio_rows,
        )
    )
    return body


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.dry_run:
        dry_run(a)
        return
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        raise SystemExit(2)
    started = time.time()
    machine, uuid = gpu_line()
    print(f"== {machine}", flush=True)
    peak = matmul_peak_cuda()
    sheet = datasheet_bf16(torch.cuda.get_device_name(0))
    print(f"   bf16 matmul peak {peak / 1e12:.0f} TFLOP/s measured", flush=True)
    flops = {}
    for model in a.models:
        flops[model] = step_flops(model, a.batch_size, "cuda", bf16=True)
        torch.cuda.empty_cache()
        p = paths(a, model)
        if not (p["shapes"] / "train.jsonl").is_file():
            from xmodal.data import make_shapes

            print(f"   generating shapes at {image_size(model)} px in {p['shapes']} …", flush=True)
            make_shapes(p["shapes"], n_train=a.images, n_val=0, n_test=0, image_size=image_size(model))
        from train_vs_open_clip import pairs_csv, warm_page_cache

        pairs_csv(p["shapes"] / "train.jsonl", p["csv"], a.steps * a.batch_size)
        warm_page_cache(p["csv"])
    results = [run_side(a, side, uuid) for side in sides(a)]
    body = report(a, results, flops, peak, sheet)
    C.record("gpu", "GPU training: xmodal vs open_clip_train", body, machine, started=started,
             write=not a.no_write, path=a.record_to)  # fmt: skip
    if not a.keep:
        shutil.rmtree(paths(a, a.models[0])["run"], ignore_errors=True)


if __name__ == "__main__":
    main()
