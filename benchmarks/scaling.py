"""Scaling: (1) xmodal training samples/s and peak memory vs batch size, including batches accumulated from
micro-batches (`--accum-steps`: cached-feature "GradCache" accumulation, the loss still sees the whole batch
as negatives) at sizes a direct batch would need far more memory for; (2) search latency and QPS vs
collection size for each index kind.

Each training configuration is a separate `xmodal train` process (xm-tiny on shapes, `--precision auto`:
bf16 where the CPU supports it, else fp32), measured from
outside: peak RSS (kernel high-water mark) and samples/s = batch / median step time after 2 warm-up steps.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --batches 64,128,256,512,1024,2048,4096 --accum 4096:32,16384:128
    python benchmarks/scaling.py --search-sizes 10000,100000,1000000 --skip-train
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import search as S  # noqa: E402

SEARCH_KINDS = [c for c in S.CONFIGS if c[0].startswith(("flat", "HNSW", "IVF-PQ +", "binary ITQ 256 bit +"))]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", default="64,128,256,512,1024", help="direct batch sizes")
    p.add_argument("--accum", default="1024:8,4096:32", help="accumulated batches as BATCH:ACCUM_STEPS")
    p.add_argument("--samples", type=int, default=3072, help="samples timed per training configuration")
    p.add_argument("--search-sizes", default="10000,30000,100000")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK)
    C.add_record_args(p)
    a = p.parse_args()
    if a.quick:
        a.batches, a.accum, a.samples, a.search_sizes, a.queries = "64,256", "512:4", 1024, "10000,30000", 200
    return a


def train_point(a, data: Path, batch: int, accum: int) -> tuple:
    skip = 2
    steps = skip + max(3, math.ceil(a.samples / batch))
    out = a.work_dir / "scaling" / f"b{batch}-a{accum}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "xmodal",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "xm-tiny",
        "--batch-size",
        str(batch),
        "--accum-steps",
        str(accum),
        "--steps",
        str(steps),
        "--warmup",
        "1",
        "--precision",
        "auto",
        "--log-every",
        "1",
        "--save-every",
        "1000000",
        "--no-progress",
        "--cache-dir",
        str(a.work_dir / "cache"),
    ]
    r = C.run_measured(cmd, out.parent / f"{out.name}.log", env=C.xmodal_env())
    if r.returncode:
        raise SystemExit(f"xmodal train failed for batch {batch} accum {accum}:\n{r.stdout[-2000:]}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    step_s = [batch / x["samples_per_s"] for x in recs if "samples_per_s" in x][skip:]
    shutil.rmtree(out, ignore_errors=True)
    return (
        batch,
        accum,
        batch // accum,
        len(step_s),
        C.median(step_s),
        batch / C.median(step_s),
        r.peak_rss_mib,
        f"{100 * r.background:.0f}%",
    )


def search_point(a, n: int) -> list[tuple]:
    from xmodal.index import SearchIndex

    ns = argparse.Namespace(dim=512, clusters=1000, latent_dim=64, noise=0.25, queries=a.queries)
    x, q = S.synthetic(n, ns)
    truth = S.exact_topk(x, q, 10)
    rows = []
    for label, kind, opts in SEARCH_KINDS:
        t = time.perf_counter()
        idx = SearchIndex.from_vectors(x, kind=kind, **opts)
        build = time.perf_counter() - t
        lat = []
        with C.Background() as bg:
            for i in range(len(q)):
                t = time.perf_counter()
                idx.search_rows(q[i : i + 1], 10)
                lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            _, found = idx.search_rows(q, 10)
            batch_s = time.perf_counter() - t
        rows.append(
            (
                f"{n:,}",
                label,
                build,
                C.median(lat) * 1000,
                float(np.percentile(lat, 95)) * 1000,
                len(q) / batch_s,
                S.recall(found, truth),
                f"{100 * bg.share:.0f}%",
            )
        )
        print(f"   search {n:,} {label}: p50 {rows[-1][3]:.2f} ms", flush=True)
        del idx
        gc.collect()
    return rows


def main() -> None:
    a = parse_args()
    started = time.time()
    machine = C.machine_line()
    parts = []
    if not a.skip_train:
        shapes = C.ensure_shapes(a.work_dir)
        points = [(int(b), 1) for b in a.batches.split(",") if b.strip()]
        points += [tuple(int(v) for v in x.split(":")) for x in a.accum.split(",") if x.strip()]
        rows = []
        for batch, accum in points:
            print(f"== train batch {batch}, accum {accum}", flush=True)
            rows.append(train_point(a, shapes / "train.jsonl", batch, accum))
            print("   " + ", ".join(C.fmt(v) for v in rows[-1]), flush=True)
        parts.append(
            f"**Training** (xm-tiny, shapes 5,000 images, `--precision auto` ({C.xmodal_precision()}), "
            "one process per row, ~"
            f"{a.samples} samples timed after 2 warm-up steps):\n\n"
            + C.table(
                [
                    "batch (negatives)",
                    "accum steps",
                    "micro-batch",
                    "timed steps",
                    "s/step",
                    "samples/s",
                    "peak RSS MiB",
                    "other procs' CPU",
                ],
                rows,
            )
        )
    if not a.skip_search:
        rows = []
        for n in [int(s) for s in a.search_sizes.split(",") if s.strip()]:
            print(f"== search {n:,}", flush=True)
            rows += search_point(a, n)
        parts.append(
            f"**Search latency vs collection size** (synthetic 512-d mixture as in search.py, {a.queries} "
            "queries, k = 10; latency = one query per call):\n\n"
            + C.table(
                ["N", "index", "build s", "p50 ms", "p95 ms", "QPS (batch)", "recall@10", "other procs' CPU"],
                rows,
            )
        )
    C.record(
        "scaling",
        "Scaling" + (" (--quick)" if a.quick else ""),
        "\n\n".join(parts),
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )


if __name__ == "__main__":
    main()
