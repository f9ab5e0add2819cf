"""Embedding throughput: images/s of xmodal (`load_dataset` tensor cache + `Encoder.encode_images`) vs a plain
open_clip loop (a torch DataLoader that opens each PNG with PIL and applies open_clip's own eval preprocess,
then `model.encode_image`), same model weights, batch size, precision and worker count.

xmodal is timed twice: cold (empty cache: decode + resize every file, write the cache, then embed) and warm
(cache hit: memory-map the uint8 array, embed). The image files themselves are in the OS page cache in every
case after the first pass, so "cold" means xmodal's cache, not the disk. The three are interleaved
(open_clip, xmodal cold, xmodal warm, open_clip, …) and reported as medians, with ratios per repeat.

Sources: the shapes images at their native 64 px (decoding is cheap) and the same scenes rendered at 256 px
(decode + bicubic resize to the model's 64 px dominate, closer to real photo collections).

    python benchmarks/embed_throughput.py            # default: 2,000 images per source, 3 repeats
    python benchmarks/embed_throughput.py --quick
    python benchmarks/embed_throughput.py --images 10000 --source-sizes 64,256,512 --model xm-small
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="500 images, 1 repeat")
    p.add_argument("--images", type=int, default=2000, help="images per source")
    p.add_argument("--source-sizes", default="64,256", help="pixel sizes the source PNGs are rendered at")
    p.add_argument("--model", default="xm-tiny")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="decode workers (DataLoader / load_dataset)")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast for both sides; auto = bf16 where the CPU has native bf16 (AVX-512 BF16 / AMX), "
        "else fp32",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK)
    C.add_record_args(p)
    a = p.parse_args()
    if a.quick:
        a.images, a.repeats = 500, 1
    if a.precision == "auto":
        a.precision = "bf16" if C.native_bf16() else "fp32"
    return a


class PngDataset:
    """What an open_clip user writes: paths → PIL.Image.open → open_clip's preprocess."""

    def __init__(self, paths: list[str], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.preprocess(im)


def main() -> None:
    a = parse_args()
    started = time.time()
    machine = C.machine_line()
    import open_clip
    import torch

    from xmodal.data import load_dataset
    from xmodal.models import Encoder, ModelSpec, build_model, build_tokenizer, resolve_model_config

    cfg = resolve_model_config(ModelSpec(a.model))
    torch.manual_seed(0)
    model = build_model(ModelSpec(a.model), cfg).eval()
    size = int(cfg["vision_cfg"]["image_size"])
    _, _, preprocess = open_clip.create_model_and_transforms(a.model)  # open_clip's own eval transform
    dtype = torch.bfloat16 if a.precision == "bf16" else None
    enc = Encoder(model, build_tokenizer(cfg), cfg, "cpu", autocast_dtype=dtype)

    def autocast():
        return torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)

    rows = []
    for src_px in [int(s) for s in a.source_sizes.split(",") if s.strip()]:
        folder = a.work_dir / f"shapes-embed-{src_px}px-{a.images}"
        if not (folder / "train.jsonl").is_file():
            from xmodal.data import make_shapes

            print(f"rendering {a.images} shapes images at {src_px} px in {folder} …", flush=True)
            make_shapes(folder, n_train=a.images, n_val=0, n_test=0, image_size=src_px)
        manifest = folder / "train.jsonl"
        paths = [str(folder / r["image"]) for r in C.manifest_rows(manifest)]
        n = len(paths)

        def run_open_clip(paths: list[str] = paths, n: int = n) -> float:
            dl = torch.utils.data.DataLoader(
                PngDataset(paths, preprocess), batch_size=a.batch_size, num_workers=a.workers, shuffle=False
            )
            t = time.perf_counter()
            out = []
            with torch.no_grad():
                for x in dl:
                    with autocast():
                        f = model.encode_image(x)
                    out.append(torch.nn.functional.normalize(f.float(), dim=-1))
            assert sum(len(o) for o in out) == n
            return time.perf_counter() - t

        def run_xmodal(cold: bool, math: bool = False, manifest: Path = manifest, n: int = n) -> float:
            cache = a.work_dir / f"embed-cache-{os.getpid()}"
            if cold:
                shutil.rmtree(cache, ignore_errors=True)
            t = time.perf_counter()
            data = load_dataset(manifest, size, cache_dir=cache, workers=a.workers, progress=False)
            assert data.from_cache != cold, "cache state not as intended"
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]) if math else contextlib.nullcontext():
                emb = enc.encode_images(data.images, batch_size=a.batch_size)
            assert len(emb) == n
            return time.perf_counter() - t

        run_xmodal(cold=True)  # warm the page cache and the model once, untimed
        run_open_clip()
        times: dict[str, list[float]] = {
            "open_clip + PIL DataLoader": [],
            "xmodal cold (decode + cache)": [],
            "xmodal warm (cache hit)": [],
            "what-if: xmodal warm + SDPA math kernel": [],
        }
        with C.Background() as bg:
            for _ in range(a.repeats):
                times["open_clip + PIL DataLoader"].append(run_open_clip())
                times["xmodal cold (decode + cache)"].append(run_xmodal(cold=True))
                times["xmodal warm (cache hit)"].append(run_xmodal(cold=False))
                times["what-if: xmodal warm + SDPA math kernel"].append(run_xmodal(cold=False, math=True))
        oc = times["open_clip + PIL DataLoader"]
        for k, v in times.items():
            rows.append(
                (
                    f"{src_px} px PNG",
                    k,
                    n,
                    C.median(v),
                    n / C.median(v),
                    C.median([o / x for o, x in zip(oc, v, strict=True)]),
                    f"{100 * bg.share:.0f}%",
                )
            )
        print(
            C.table(
                [
                    "source",
                    "pipeline",
                    "images",
                    "median s",
                    "images/s",
                    "speed-up vs open_clip (paired)",
                    "other procs' CPU",
                ],
                rows[-len(times) :],
            ),
            flush=True,
        )

    body = (
        f"Model {a.model} ({size} px input, random weights: throughput does not depend on them), batch "
        f"{a.batch_size}, {a.precision + ' autocast' if a.precision != 'fp32' else 'fp32'} on both sides "
        f"({'native bf16 on this CPU' if C.native_bf16() else 'no native bf16 on this CPU'}), "
        f"{a.workers} decode workers on both sides, "
        f"{a.repeats} interleaved repeats.\n\n"
        + C.table(
            [
                "source",
                "pipeline",
                "images",
                "median s",
                "images/s",
                "speed-up vs open_clip (paired)",
                "other procs' CPU",
            ],
            rows,
        )
        + "\n\nThe what-if row runs the same warm xmodal pipeline inside "
        "`torch.nn.attention.sdpa_kernel([SDPBackend.MATH])` (not what xmodal does today; see the training "
        "profile)."
    )
    shutil.rmtree(a.work_dir / f"embed-cache-{os.getpid()}", ignore_errors=True)
    C.record(
        "embed_throughput",
        "Embedding throughput" + (" (--quick)" if a.quick else ""),
        body,
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )


if __name__ == "__main__":
    main()
