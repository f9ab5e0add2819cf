"""Hubness correction: test-set retrieval R@1 (and R@10, N₁₀ skewness) with and without QB-Norm, DBNorm and
InvGC/LocalAdj, computed by `xmodal.index.hubness.corrected_similarities` on embeddings from one model per
data set. Banks come from the training split: its captions (query bank for text→image, gallery bank for
image→text) and its images (the other way round). Test queries are never in a bank.

A model per data set is trained once with xmodal (xm-tiny, `--model-steps`) and reused, or given with
`--run-emoji DIR` / `--run-shapes DIR` (any xmodal run directory).

    python benchmarks/hubness.py
    python benchmarks/hubness.py --beta 20,50 --bank-size 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("none", "qbnorm", "qbnorm-dynamic", "dbnorm", "dbnorm-dynamic", "invgc", "localadj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="emoji,shapes")
    p.add_argument("--run-emoji", type=Path, default=None)
    p.add_argument("--run-shapes", type=Path, default=None)
    p.add_argument("--model-steps", type=int, default=300)
    p.add_argument("--beta", default="20", help="comma list of inverted-softmax temperatures β")
    p.add_argument(
        "--bank-size", type=int, default=5000, help="max bank items (seeded sample of the train split)"
    )
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK)
    C.add_record_args(p)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    started = time.time()
    machine = C.machine_line()
    import torch

    from xmodal.eval.metrics import hubness_stats, retrieval_metrics
    from xmodal.index.hubness import corrected_similarities
    from xmodal.models import load_encoder

    betas = [float(b) for b in a.beta.split(",") if b.strip()]
    rows, notes = [], []
    for ds in [d.strip() for d in a.datasets.split(",") if d.strip()]:
        d = C.dataset_dirs(a.work_dir, [ds]).get(ds)
        if d is None:
            continue
        run = getattr(a, f"run_{ds}") or C.ensure_model(a.work_dir, d, steps=a.model_steps)
        enc = load_encoder(run)
        tr_img, tr_txt, _, _ = C.embed_split(enc, d, "train", a.work_dir)
        te_img, te_txt, owner, _ = C.embed_split(enc, d, "test", a.work_dir)
        rng = np.random.default_rng(0)

        def sample(x: np.ndarray, rng: np.random.Generator = rng) -> np.ndarray:
            return x[rng.permutation(len(x))[: a.bank_size]] if len(x) > a.bank_size else x

        bank_txt, bank_img = sample(tr_txt), sample(tr_img)
        pos_t2i = torch.zeros(len(te_txt), len(te_img), dtype=torch.bool)
        pos_t2i[torch.arange(len(te_txt)), torch.as_tensor(owner)] = True
        notes.append(
            f"{ds}: model `{run}` (logit scale {enc.logit_scale:.1f}); test {len(te_img)} images / "
            f"{len(te_txt)} captions; banks {len(bank_txt)} training captions, {len(bank_img)} training "
            "images"
        )
        for direction, q, g, qb, gb, pos in (
            ("t2i", te_txt, te_img, bank_txt, bank_img, pos_t2i),
            ("i2t", te_img, te_txt, bank_img, bank_txt, pos_t2i.T),
        ):
            base = None
            for beta in betas:
                for m in METHODS:
                    if m in ("none", "invgc", "localadj") and beta != betas[0]:  # β does not enter these
                        continue
                    t = time.perf_counter()
                    s = corrected_similarities(
                        q, g, m, query_bank=qb, gallery_bank=gb, beta=beta, beta_g=beta
                    )
                    ms = (time.perf_counter() - t) * 1000
                    s = torch.as_tensor(np.asarray(s, dtype=np.float64)).float()
                    r = retrieval_metrics(s, pos, ks=(1, 10))
                    skew = hubness_stats(s, 10)["skewness"]
                    if m == "none":
                        base = r["R@1"]
                    rows.append(
                        (
                            ds,
                            direction,
                            m,
                            "–" if m in ("none", "invgc", "localadj") else beta,
                            r["R@1"],
                            r["R@1"] - base,
                            r["R@10"],
                            skew,
                            ms,
                        )
                    )
    headers = ["data", "direction", "method", "β", "R@1", "ΔR@1 vs none", "R@10", "N₁₀ skewness", "ms"]
    body = (
        "; ".join(notes) + ". InvGC/LocalAdj use both banks with r = 0.1 (LocalAdj: top 1% of each bank). "
        "N₁₀ skewness: skewness of how often each gallery item is in a query's top 10 "
        "(lower = fewer hubs).\n\n" + C.table(headers, rows)
    )
    C.record(
        "hubness",
        "Hubness correction",
        body,
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )


if __name__ == "__main__":
    main()
