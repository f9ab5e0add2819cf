"""Search: queries/s, recall@10 against exact search, bytes per vector and build time of xmodal's index kinds
(flat, HNSW, IVF-PQ, binary codes with and without float re-ranking), through `xmodal.index`
(`SearchIndex.from_vectors` + `search_rows`, i.e. FAISS underneath with xmodal's parameters).

Collections: synthetic 512-d clustered vectors (a Gaussian mixture in a low-dimensional latent space, randomly
projected to 512-d plus isotropic noise, L2-normalised: clustered and of low intrinsic dimension like real
embeddings) at each `--sizes`, and real embeddings: the emoji images embedded by an xm-tiny model trained on
emoji (queries: the emoji captions).

Ground truth is exact inner-product top-10 (FAISS IndexFlatIP). QPS: all queries in one batch call, median of
`--repeats` rounds (interleaved: every kind once per round, while all indexes fit in memory); latency: one
query per call, median.
Bytes/vector: the serialised ANN structure / N (re-ranking also reads the float32 vectors, 4·D bytes, kept
memory-mapped in vectors.npy).

    python benchmarks/search.py                      # 100k synthetic + emoji (a few minutes)
    python benchmarks/search.py --sizes 100000,1000000
    python benchmarks/search.py --quick
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# (label, kind, options for SearchIndex.from_vectors). "defaults": xmodal's N-dependent parameters untouched.
CONFIGS = [
    ("flat (exact)", "flat", {}),
    ("HNSW, defaults", "hnsw", {}),
    ("IVF-PQ, defaults", "ivfpq", {}),
    ("IVF-PQ, PQ scores only", "ivfpq", {"rerank": 0}),
    ("binary ITQ 256 bit, defaults", "binary", {}),
    ("binary ITQ 256 bit, Hamming only", "binary", {"rerank": 0}),
    ("binary ITQ 256 bit, binary HNSW", "binary", {"binary_index": "hnsw"}),
    ("binary ITQ 256 bit, binary IVF", "binary", {"binary_index": "ivf"}),
    ("learned-binary BEBR 4×64 bit, defaults", "learned-binary", {}),
]
BEBR = {
    "bits": 64,
    "code_steps": 4,
    "hidden": 128,
    "train_steps": 200,
    "batch_size": 512,
}  # fit on the collection


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20k vectors, 200 queries, no emoji")
    p.add_argument("--sizes", default="100000", help="comma list of synthetic collection sizes")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.25, help="isotropic noise norm relative to the signal")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--latency-queries", type=int, default=200, help="single-query calls for the latency column"
    )
    p.add_argument("--no-emoji", action="store_true")
    p.add_argument(
        "--model-steps", type=int, default=300, help="training steps of the emoji model (trained once)"
    )
    p.add_argument("--work-dir", type=Path, default=C.DEFAULT_WORK)
    C.add_record_args(p)
    a = p.parse_args()
    if a.quick:
        a.sizes, a.queries, a.repeats, a.no_emoji, a.latency_queries = "20000", 200, 2, True, 50
    return a


def mixture(n: int, a, rng: np.random.Generator, centers: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """n points: latent centre + latent Gaussian, projected to dim, plus isotropic noise; L2-normalised."""
    out = np.empty((n, a.dim), np.float32)
    for i in range(0, n, 50_000):
        m = min(50_000, n - i)
        z = centers[rng.integers(len(centers), size=m)] + 0.5 * rng.standard_normal((m, a.latent_dim))
        x = z @ proj
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += a.noise * rng.standard_normal((m, a.dim)) / np.sqrt(a.dim)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def synthetic(n: int, a, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((a.clusters, a.latent_dim))
    proj = rng.standard_normal((a.latent_dim, a.dim)).astype(np.float32)
    return mixture(n, a, rng, centers, proj), mixture(a.queries, a, rng, centers, proj)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    idx = faiss.IndexFlatIP(x.shape[1])
    idx.add(x)
    return idx.search(q, k)[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def ann_bytes(idx) -> int:
    """The serialised ANN plus the code's own parameters (ITQ rotation, hash head weights)."""
    import faiss

    if idx.kind == "binary":
        coder = idx.coder.projection.nbytes + idx.coder.mean.nbytes
    elif idx.kind == "learned-binary":
        coder = sum(v.nbytes for v in idx.coder.state.values())
    else:
        return int(faiss.serialize_index(idx.ann).size)
    return int(faiss.serialize_index_binary(idx.ann).size) + coder


def params_text(kind: str, p: dict) -> str:
    """The concrete parameters the index chose (or was given), for the table."""
    parts = []
    if kind == "hnsw" or p.get("binary_index") == "hnsw":
        parts.append(f"M={p.get('hnsw_m')}, efSearch {p.get('ef_search')}")
    if "nlist" in p:
        parts.append(f"nlist={p['nlist']}, nprobe={p['nprobe']}")
    if kind == "ivfpq":
        parts.append(f"m={p.get('pq_m')}×{p.get('pq_nbits')} bit")
    if p.get("rerank"):
        parts.append(f"re-rank {p['rerank']}")
    return ", ".join(parts)


def _mem_total() -> int:
    try:
        return (
            int(
                next(
                    ln.split()[1]
                    for ln in Path("/proc/meminfo").read_text().splitlines()
                    if ln.startswith("MemTotal")
                )
            )
            * 1024
        )
    except (OSError, StopIteration):
        return 8 << 30


def bench_collection(
    name: str, x: np.ndarray, q: np.ndarray, a, text: np.ndarray | None = None
) -> tuple[list[tuple], str]:
    """Build every kind, then time them. Small collections: all built first and timed interleaved (rounds);
    large ones (every index holds its own float copy): one kind at a time, built, timed, freed."""
    from xmodal.index import SearchIndex

    n = len(x)
    truth = exact_topk(x, q, a.k)
    together = 3 * len(CONFIGS) * x.nbytes < 0.4 * _mem_total()  # (each index keeps its own float copy)
    m = min(a.latency_queries, len(q))
    out: dict[str, dict] = {}

    def build(label, kind, opts):
        t = time.perf_counter()
        if kind == "learned-binary":  # heads fit on the collection itself (as ITQ is) and on `text`,
            from xmodal.hashing.fit import fit_bebr  # captions that are not queries, where queries are text
            from xmodal.index.binary import LearnedCoder

            opts = {**opts, "coder": LearnedCoder.from_heads(fit_bebr(x, text, **BEBR))}
        idx = SearchIndex.from_vectors(x, kind=kind, **opts)
        out[label] = {"build": time.perf_counter() - t, "times": [], "idx": idx}
        print(f"   {name}: built {label} in {out[label]['build']:.1f} s", flush=True)
        return idx

    def time_batch(label):
        idx = out[label]["idx"]
        t = time.perf_counter()
        _, rows = idx.search_rows(q, a.k)
        out[label]["times"].append(time.perf_counter() - t)
        out[label].setdefault("recall", recall(rows, truth))

    def finish(label):
        idx = out[label]["idx"]
        ts = []
        for i in range(m):
            t = time.perf_counter()
            idx.search_rows(q[i : i + 1], a.k)
            ts.append(time.perf_counter() - t)
        p = idx.info["params"]
        out[label]["lat"] = C.median(ts) * 1000
        out[label]["bytes"] = ann_bytes(idx) / n
        out[label]["detail"] = params_text(idx.kind, p)
        del out[label]["idx"]
        gc.collect()

    with C.Background() as bg:
        if together:
            for label, kind, opts in CONFIGS:
                build(label, kind, opts)
            for _ in range(a.repeats):
                for label, _, _ in CONFIGS:
                    time_batch(label)
            for label, _, _ in CONFIGS:
                finish(label)
        else:
            for label, kind, opts in CONFIGS:
                build(label, kind, opts)
                for _ in range(a.repeats):
                    time_batch(label)
                finish(label)
    rows = [
        (
            name,
            f"{n:,}",
            label,
            r["detail"],
            r["build"],
            r["bytes"],
            len(q) / C.median(r["times"]),
            r["lat"],
            r["recall"],
            f"{100 * bg.share:.0f}%",
        )
        for label, r in out.items()
    ]
    how = "interleaved rounds" if together else "one kind at a time (memory)"
    return rows, f"{name} {n:,}: {how}"


def main() -> None:
    a = parse_args()
    started = time.time()
    machine = C.machine_line()
    rows, hows = [], []
    for n in [int(s) for s in a.sizes.split(",") if s.strip()]:
        print(f"== synthetic {n:,} × {a.dim}", flush=True)
        x, q = synthetic(n, a)
        r, how = bench_collection("synthetic", x, q, a)
        rows += r
        hows.append(how)
        del x
        gc.collect()
    emoji_note = ""
    if not a.no_emoji:
        d = C.ensure_emoji(a.work_dir)
        if d is not None:
            from xmodal.models import load_encoder

            run = C.ensure_model(a.work_dir, d, steps=a.model_steps)
            enc = load_encoder(run)
            parts = [C.embed_split(enc, d, s, a.work_dir) for s in ("train", "val", "test")]
            x = np.concatenate([p[0] for p in parts])
            caps = np.concatenate([p[1] for p in parts])
            order = np.random.default_rng(0).permutation(len(caps))
            q, rest = caps[order[: a.queries]], caps[order[a.queries :]]
            print(f"== emoji: {len(x)} images, {len(q)} caption queries", flush=True)
            r, how = bench_collection("emoji (xm-tiny, 128-d)", x, q, a, text=rest)
            rows += r
            hows.append(how)
            emoji_note = (
                f" Emoji: all {len(x)} emoji images embedded by {run.name} (xm-tiny trained "
                f"{a.model_steps} steps on the emoji train split), {len(q)} caption queries (the learned "
                f"codes' heads are fit on the images and the other {len(rest)} captions)."
            )
    headers = [
        "collection",
        "N",
        "index",
        "params",
        "build s",
        "ANN bytes/vector",
        "QPS (batch)",
        "latency ms (1 query)",
        f"recall@{a.k} vs exact",
        "other procs' CPU",
    ]
    body = (
        f"Synthetic: {a.clusters} clusters in a {a.latent_dim}-d latent space → {a.dim}-d, noise {a.noise}, "
        f"{a.queries} queries from the same mixture.{emoji_note} QPS: median of {a.repeats} rounds "
        f"({'; '.join(hows)}). "
        "Float kinds are exact-inner-product FAISS structures built by xmodal's `SearchIndex.from_vectors` "
        "with its default parameters; re-ranking reads the float32 vectors (4·D bytes/vector more, "
        "memory-mapped)."
        "\n\n" + C.table(headers, rows)
    )
    C.record(
        "search",
        "Search" + (" (--quick)" if a.quick else ""),
        body,
        machine,
        started=started,
        write=not a.no_write,
        path=a.record_to,
    )


if __name__ == "__main__":
    main()
