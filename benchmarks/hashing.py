"""Learned hash codes against ITQ and LSH at equal bits, on labelled data sets.

Per data set (shapes: label = the first shape's kind; emoji: label = the emoji group, held out by emoji;
digits: label = the digit):
1. a base model (`--model`, xm-tiny) trained with `clip` for `--base-steps` steps;
2. hash heads on its frozen embeddings, one run per code length in `--bits` (`xmodal hash train`, dcmh with
   `--objective`, `--hash-steps` steps each);
3. `xmodal eval --task hashing` on the test split: text → image and image → text mAP@`--k` with label
   relevance, precision within Hamming radius 2, and ITQ / LSH codes of the same embeddings at the same
   code lengths; memory per item beside the float embedding's.

The learned codes see the training split's labels (DCMH is supervised where labels exist); ITQ and LSH see
no labels: a win for the learned codes is partly the labels' doing, which is what a user with labels gets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402
from benchmarks import objectives as O  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="shapes,emoji,digits")
    p.add_argument("--model", default="xm-tiny")
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--bits", default="32,64,128")
    p.add_argument("--objective", default="dcmh(gamma=0.1)")
    p.add_argument("--hash-steps", type=int, default=300)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/xmodal-bench-hashing"))
    C.add_record_args(p)
    a = p.parse_args(argv)
    a.datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    a.bits = [int(b) for b in a.bits.split(",")]
    a.shapes_images, a.quick_sizes, a.noise_fraction = 5000, False, 0.3  # for objectives.prepare_datasets
    return a


def common(a, out: Path, steps: int) -> list:
    return [
        "--out",
        out,
        "--steps",
        steps,
        "--batch-size",
        a.batch_size,
        "--lr",
        "1e-3",
        "--warmup",
        max(1, steps // 10),
        "--log-every",
        10,
        "--save-every",
        10**9,
        "--keep-checkpoints",
        1,
        "--no-progress",
        "--cache-dir",
        a.work_dir / "cache",
    ]


def bench_dataset(a, ds) -> dict:
    work = a.work_dir / "runs" / ds.name  # (the data sets live in work_dir/<name>)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = work / "base"
    res: dict = {
        "base_s": C.run_xmodal_quiet(
            ["train", "--data", ds.train, "--model", a.model, *common(a, base, a.base_steps)]
        )
    }
    res["runs"] = {}
    for bits in a.bits:
        hrun = work / f"hash-{bits}"
        t = C.run_xmodal_quiet(
            [
                "hash",
                "train",
                base,
                "--bits",
                bits,
                "--objective",
                a.objective,
                "--data",
                ds.train,
                *common(a, hrun, a.hash_steps),
            ]
        )
        out = work / f"eval-{bits}.json"
        C.run_xmodal_quiet(
            [
                "eval",
                hrun,
                "--data",
                ds.test,
                "--task",
                "hashing",
                "--hash-bits",
                bits,
                "--hash-k",
                a.k,
                "--json",
                out,
            ]
        )
        res["runs"][bits] = {"hash_train_s": t, **json.loads(out.read_text())["hashing"]}
        m = res["runs"][bits]["methods"]
        t2i = {name: m[name]["t2i"][f"mAP@{a.k}"] for name in ("learned", f"itq-{bits}", f"lsh-{bits}")}
        print(
            f"   {bits} bits: t2i mAP@{a.k} " + ", ".join(f"{n} {v:.3f}" for n, v in t2i.items()), flush=True
        )
    return res


def dataset_block(a, name: str, res: dict) -> str:
    k = f"mAP@{a.k}"
    rows = []
    for bits, r in res["runs"].items():
        for method in ("learned", f"itq-{bits}", f"lsh-{bits}"):
            m = r["methods"][method]
            rows.append(
                [
                    method.split("-")[0],
                    bits,
                    m["bytes_per_item"],
                    C.fmt(m["t2i"][k]),
                    C.fmt(m["i2t"][k]),
                    C.fmt(m["t2i"]["P@H<=2"]),
                    C.fmt(m["i2t"]["P@H<=2"]),
                ]
            )
    floats = next(iter(res["runs"].values()))["float_bytes_per_item"]
    table = C.table(["codes", "bits", "bytes/item", f"t2i {k}", f"i2t {k}", "t2i P@H≤2", "i2t P@H≤2"], rows)
    wins = []
    for bits, r in res["runs"].items():
        m = r["methods"]
        best = max(m[f"itq-{bits}"]["t2i"][k], m[f"lsh-{bits}"]["t2i"][k])
        wins.append(f"{bits} bits {m['learned']['t2i'][k] - best:+.3f}")
    return (
        f"**{name}** — float embeddings: {floats} bytes/item.\n\n{table}\n\n"
        f"t2i {k}, learned minus the better of ITQ and LSH: " + ", ".join(wins) + "."
    )


def main(argv=None) -> dict:
    a = parse_args(argv)
    started = time.time()
    machine = C.machine_line()
    a.work_dir.mkdir(parents=True, exist_ok=True)
    sets, notes = O.prepare_datasets(a)
    results = {}
    for ds in sets.values():
        print(f"== {ds.name}", flush=True)
        results[ds.name] = bench_dataset(a, ds)
        (a.work_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    intro = (
        f"Base model {a.model} trained with `clip` for {a.base_steps} steps (batch {a.batch_size}) per data "
        f"set; hash heads `{a.objective}` for {a.hash_steps} steps on its frozen embeddings, one run per "
        "code length; ITQ and LSH fitted on the test images' embeddings of the same model. Relevance = "
        "a shared label; text → image (every caption a query) and image → text."
    )
    body = intro + "\n\n" + "\n\n".join(dataset_block(a, n, r) for n, r in results.items())
    if notes:
        body += "\n\nNotes: " + "; ".join(notes) + "."
    C.record(
        "hashing",
        "Learned hash codes against ITQ and LSH",
        body,
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )
    return results


if __name__ == "__main__":
    main()
