"""`xmodal data reduce`: TL;DR-style data reduction (Wang et al., "Too Large; Data Reduction for
Vision-Language Pre-Training", ICCV 2023) — keep a smaller manifest that still covers the whole collection.

The selection rule (also in `xmodal data reduce --help`):

1. (optional, `--drop-misaligned Q`) Drop the fraction Q of pairs whose image–text cosine is lowest (the mean
   over an image's captions, embedded with the same model). The paper removes low image–text-matching pairs
   the same way: its released selection keeps only the pairs in the better half by BLIP's ITM score (Q = 0.5).
2. Cluster the L2-normalised image embeddings into K groups with FAISS spherical k-means (seeded); K defaults
   to round(√N). (The paper clusters its captioner's codebook vectors into 3000 groups for CC3M's 2.8M pairs;
   √N is the same order there.)
3. Give every cluster its share of the kept items: quota_c = n_keep · |c| / N, rounded by largest remainder
   (ties: larger cluster, then lower id), so the quotas sum to exactly n_keep and the reduced set keeps the
   collection's distribution over clusters. This is the paper's "sample M% of every cluster".
4. Inside a cluster keep the quota_c members that represent it best: the highest cosine to the centroid
   (`pick="nearest"`, the default; ties by manifest order). `pick="uniform"` instead takes evenly spaced ranks
   of that ordering, so the kept part spans the cluster from its core to its edge as the paper's uniform
   per-cluster sample does (its code strides through each cluster's members).

`select` and `select_in_clusters` are pure functions over numpy arrays (unit-testable without a model);
`reduce_manifest` embeds a manifest with a trained run, selects, and writes the reduced manifest: every field
of the kept rows unchanged except relative image paths, rewritten relative to the new manifest's folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmodal.errors import UserError

PICKS = ("nearest", "uniform")
KMEANS_ITERS = 20
KMEANS_REDO = 3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- parameters ---------------------------------------------------------------------------------------------


def parse_keep(text: str) -> float | int:
    """'0.5' or '50%' → a fraction in (0, 1]; '2500' (an integer) → a count ≥ 1. UserError names --keep."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            value: float | int = float(s[:-1]) / 100
        elif re.fullmatch(r"[+]?\d+", s):
            value = int(s)
        else:
            value = float(s)
    except ValueError:
        raise UserError(
            f"--keep {text}: not a number; give a fraction such as 0.5 (or 50%) or a count such as 2500"
        ) from None
    if isinstance(value, int):
        if value < 1:
            raise UserError(f"--keep {text}: a count must be at least 1; or give a fraction such as 0.5")
        return value
    if not (0 < value <= 1) or math.isnan(value):
        raise UserError(f"--keep {text}: a fraction must be in (0, 1], e.g. 0.5; or give an integer count")
    return value


def resolve_keep(keep: float | int, n: int, what: str = "usable items") -> int:
    """How many items to keep of n: a count as given (≤ n), a fraction rounded half up (≥ 1)."""
    if isinstance(keep, int):
        if keep > n:
            raise UserError(f"--keep {keep}: more than the {n} {what}; give at most {n} or a fraction")
        return keep
    return max(1, min(n, math.floor(keep * n + 0.5)))


def default_clusters(n: int) -> int:
    """round(√N), at least 1."""
    return max(1, round(math.sqrt(n)))


# -- the pure selection -------------------------------------------------------------------------------------


def cluster_quotas(sizes: np.ndarray, n_keep: int) -> np.ndarray:
    """Largest-remainder apportionment of n_keep over clusters of the given sizes: proportional to size,
    summing to exactly n_keep, never above a cluster's size. Ties go to the larger, then lower-id cluster."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if not 0 <= n_keep <= total:
        raise ValueError(f"n_keep {n_keep} not in [0, {total}]")
    if total == 0:
        return np.zeros_like(sizes)
    exact = sizes * n_keep  # quota·total, in integers: exact remainders, no float ties
    quotas = exact // total
    short = n_keep - int(quotas.sum())
    rem = exact - quotas * total
    order = np.lexsort((np.arange(len(sizes)), -sizes, -rem))  # last key is primary
    quotas[order[:short]] += 1
    return quotas


def _order_in_cluster(sim: np.ndarray, members: np.ndarray) -> np.ndarray:
    """members sorted by cosine to their centroid, highest first; ties by index (manifest order)."""
    return members[np.lexsort((members, -sim[members]))]


def select_in_clusters(
    x: np.ndarray, assign: np.ndarray, centroids: np.ndarray, n_keep: int, pick: str = "nearest"
) -> np.ndarray:
    """Steps 3–4 of the rule: indices (sorted) of the n_keep items kept, given each item's cluster `assign`
    and the cluster centroids. Cosine similarity (x and centroids are L2-normalised here)."""
    if pick not in PICKS:
        raise UserError(f"--pick {pick}: use one of {', '.join(PICKS)}")
    x = _unit(np.asarray(x, dtype=np.float32))
    c = _unit(np.asarray(centroids, dtype=np.float32))
    assign = np.asarray(assign, dtype=np.int64)
    sim = np.einsum("nd,nd->n", x, c[assign])
    sizes = np.bincount(assign, minlength=len(c))
    quotas = cluster_quotas(sizes, n_keep)
    kept = []
    for j in np.flatnonzero(quotas):
        ranked = _order_in_cluster(sim, np.flatnonzero(assign == j))
        q, m = int(quotas[j]), len(ranked)
        if pick == "nearest":
            kept.append(ranked[:q])
        else:  # evenly spaced ranks: the centre of each of q equal slices of the ranking
            kept.append(ranked[((np.arange(q) + 0.5) * m / q).astype(np.int64)])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, niter: int = KMEANS_ITERS, nredo: int = KMEANS_REDO
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS spherical k-means of L2-normalised rows → (centroids k×D, assignment N): each item goes to the
    centroid of highest cosine, and each centroid is then the normalised mean of its final members. Best of
    `nredo` seeded runs (lowest objective): one random start now and then merges two well-separated groups.
    FAISS trains on at most 256·k sampled rows (its default) and assigns all; same input and seed, same
    clusters."""
    import faiss

    x = np.ascontiguousarray(_unit(np.asarray(x, dtype=np.float32)))
    n, d = x.shape
    if not 1 <= k <= n:
        raise UserError(f"--clusters {k}: must be between 1 and the {n} items to cluster")
    km = faiss.Kmeans(
        d, k, niter=niter, nredo=nredo, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    km.train(x)
    _, idx = km.index.search(x, 1)
    assign = idx[:, 0].astype(np.int64)
    centroids = np.asarray(km.centroids, dtype=np.float32).copy()
    sums = np.zeros_like(centroids)
    np.add.at(sums, assign, x)
    filled = np.bincount(assign, minlength=k) > 0
    centroids[filled] = _unit(sums[filled])
    return centroids, assign


@dataclass
class Selection:
    """What `select` decided: kept indices (sorted, into the input rows) and how it got there."""

    kept: np.ndarray
    assign: np.ndarray  # cluster of each eligible item (-1 for dropped-as-misaligned ones)
    n_clusters: int
    quotas: np.ndarray  # per cluster
    dropped: np.ndarray  # indices dropped in step 1 (empty without drop_misaligned)


def select(
    x: np.ndarray,
    n_keep: int,
    n_clusters: int | None = None,
    *,
    seed: int = 0,
    pick: str = "nearest",
    alignment: np.ndarray | None = None,
    drop_misaligned: float = 0.0,
) -> Selection:
    """The whole rule (module docstring) over image embeddings x (N×D) and, for step 1, each pair's
    image–text cosine `alignment` (N). n_keep counts items of the whole input."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    eligible = np.arange(n)
    dropped = np.zeros(0, np.int64)
    if drop_misaligned:
        if not 0 <= drop_misaligned < 1:
            raise UserError(f"--drop-misaligned {drop_misaligned}: a fraction in [0, 1), e.g. 0.5")
        if alignment is None or len(alignment) != n:
            raise ValueError("drop_misaligned needs one alignment score per item")
        n_drop = math.floor(drop_misaligned * n + 0.5)
        order = np.lexsort((np.arange(n), np.asarray(alignment, dtype=np.float64)))  # lowest first
        dropped, eligible = np.sort(order[:n_drop]), np.sort(order[n_drop:])
    if not 1 <= n_keep <= len(eligible):
        why = f" left after --drop-misaligned {drop_misaligned}" if drop_misaligned else ""
        raise UserError(
            f"--keep: {n_keep} items asked for but only {len(eligible)} items{why}; keep fewer"
            + (" or drop fewer" if drop_misaligned else "")
        )
    k = default_clusters(len(eligible)) if n_clusters is None else n_clusters
    centroids, assign = kmeans(x[eligible], k, seed=seed)
    kept_local = select_in_clusters(x[eligible], assign, centroids, n_keep, pick=pick)
    full_assign = np.full(n, -1, np.int64)
    full_assign[eligible] = assign
    quotas = cluster_quotas(np.bincount(assign, minlength=k), n_keep)
    return Selection(
        kept=eligible[kept_local], assign=full_assign, n_clusters=k, quotas=quotas, dropped=dropped
    )


# -- the manifest side --------------------------------------------------------------------------------------


@dataclass
class ReduceResult:
    out: Path
    n_items: int  # usable images in the manifest
    n_kept: int
    n_rows: int  # manifest lines written (several lines may name one image)
    n_clusters: int
    n_dropped: int  # dropped as misaligned (step 1)
    skipped: str  # the reader's/decoder's skip summary ("" when nothing was skipped)

    def summary(self) -> str:
        pct = 100 * self.n_kept / max(self.n_items, 1)
        line = (
            f"kept {self.n_kept} of {self.n_items} images ({pct:.1f}%) from {self.n_clusters} clusters "
            f"→ {self.out} ({self.n_rows} rows)"
        )
        if self.n_dropped:
            line += f"; {self.n_dropped} least-aligned pairs dropped first"
        return line


def check_inputs(manifest: str | Path, out: str | Path) -> None:
    """Fail fast (before any model loads) on a missing/non-JSONL MANIFEST or a bad --out."""
    m, o = Path(manifest), Path(out)
    if not m.is_file():
        raise UserError(f"MANIFEST {manifest}: not found; give the path of a .jsonl dataset manifest")
    if m.suffix.lower() != ".jsonl":
        raise UserError(
            f"MANIFEST {manifest}: xmodal data reduce reads .jsonl manifests; convert it to JSONL "
            '(one {"image": ..., "caption": ...} object per line)'
        )
    if o.suffix.lower() != ".jsonl":
        raise UserError(
            f"--out {out}: must end in .jsonl, so that xmodal train --data reads it as a manifest"
        )
    if o.exists() and o.resolve() == m.resolve():
        raise UserError(f"--out {out}: is the input manifest itself; write the reduced one to a new file")
    if o.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name ending in .jsonl")


def check_model(model: str | Path) -> None:
    """A trained xmodal run (with checkpoints/latest.pt) or an exported open_clip folder, else UserError."""
    p = Path(model)
    if not p.is_dir():
        raise UserError(
            f"--model {model}: not a folder; give a trained xmodal run directory "
            "(xmodal train --out RUN) or an exported open_clip folder"
        )
    if (p / "config.yaml").is_file():
        if not (p / "checkpoints" / "latest.pt").is_file():
            raise UserError(
                f"--model {model}: the run has no checkpoints/latest.pt; train it first (xmodal "
                f"train --out {model}) or point --model at a trained run"
            )
    elif not (p / "model.json").is_file():
        raise UserError(
            f"--model {model}: not an xmodal run (config.yaml) nor an open_clip export "
            "(model.json); give a trained run directory"
        )


def rewrite_path(value: str, src_dir: Path, out_dir: Path) -> str:
    """An image path as the source manifest wrote it → the same file, as seen from the new manifest's
    folder: absolute (and ~) paths unchanged, relative ones re-based (absolute where no relative path
    exists)."""
    if os.path.isabs(os.path.expanduser(value)):
        return value
    target = Path(os.path.abspath(src_dir / value.replace("\\", "/")))
    # physical folders, so ".." in the new path walks the same way the OS will (symlinked folders)
    tdir, odir = os.path.realpath(target.parent), os.path.realpath(out_dir)
    try:
        rel = os.path.relpath(os.path.join(tdir, target.name), odir)
    except ValueError:  # another drive (Windows): no relative path
        return str(target)
    return Path(rel).as_posix()


def _embed(encoder, images, batch_size: int, progress: bool, log: Callable[[str], None]) -> np.ndarray:
    """uint8 N×3×S×S → N×D float32, batch by batch with a progress bar (and rate lines) on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    n = len(images)
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (progress and console.is_terminal),
    )
    out = np.zeros((n, encoder.dim), np.float32)
    t0, step = time.perf_counter(), max(batch_size, -(-n // 10))  # a log line about every 10%
    next_log = step
    with bar:
        task = bar.add_task("embed", total=n)
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            out[i:j] = encoder.encode_images(images[i:j], batch_size=batch_size).numpy()
            bar.advance(task, j - i)
            if progress and j >= next_log and j < n:
                log(f"embedded {j}/{n} images ({j / max(time.perf_counter() - t0, 1e-9):.0f}/s)")
                next_log += step
    return out


def _alignment(encoder, img: np.ndarray, captions: list[list[str]], batch_size: int) -> np.ndarray:
    """Each image's mean cosine to its own captions."""
    flat = [c for cs in captions for c in cs]
    owner = np.array([i for i, cs in enumerate(captions) for _ in cs], dtype=np.int64)
    txt = encoder.encode_texts(flat, batch_size=batch_size).numpy()
    cos = np.einsum("td,td->t", txt, img[owner])
    return np.bincount(owner, weights=cos, minlength=len(img)) / np.maximum(
        np.bincount(owner, minlength=len(img)), 1
    )


def reduce_manifest(
    manifest: str | Path,
    model: str | Path,
    out: str | Path,
    keep: float | int,
    *,
    clusters: int | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 256,
    pick: str = "nearest",
    drop_misaligned: float = 0.0,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _log,
) -> ReduceResult:
    """Embed MANIFEST's images with `model`, select by the rule above, write the reduced manifest `out`
    (atomically). Lines naming a kept image are written as they were (only a relative image path re-based)."""
    from xmodal.data.dataset import load_dataset
    from xmodal.data.records import DataStats, _image_path, read_records
    from xmodal.fsutil import write_text_atomic

    check_inputs(manifest, out)
    if pick not in PICKS:
        raise UserError(f"--pick {pick}: use one of {', '.join(PICKS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if not 0 <= drop_misaligned < 1:
        raise UserError(f"--drop-misaligned {drop_misaligned}: a fraction in [0, 1), e.g. 0.5 (0 = off)")
    if clusters is not None and clusters < 1:
        raise UserError(f"--clusters {clusters}: must be at least 1")
    check_model(model)
    manifest, out = Path(manifest), Path(out)
    stats = DataStats()
    records = read_records(
        manifest, image_key=image_key, caption_key=caption_key, label_key=label_key, stats=stats
    )
    if not records:
        raise UserError(
            f"MANIFEST {manifest}: no usable rows ({stats.summary() or 'it is empty'}); check the "
            "image paths and captions"
        )
    _check_counts(keep, clusters, len(records), drop_misaligned)

    from xmodal.models.encoder import load_encoder

    encoder = load_encoder(model, device=device)
    data = load_dataset(
        manifest,
        encoder.image_size,
        cache_dir=cache_dir,
        image_key=image_key,
        caption_key=caption_key,
        label_key=label_key,
        progress=progress,
    )
    n = len(data)
    n_keep = _check_counts(keep, clusters, n, drop_misaligned)
    if progress:
        log(f"embedding {n} images with {model} (batch {batch_size}) …")
    img = _embed(encoder, data.images, batch_size, progress, log)
    align = _alignment(encoder, img, data.captions, batch_size) if drop_misaligned else None
    if progress:
        log(f"clustering {n} embeddings (k-means, seed {seed}) …")
    sel = select(
        img, n_keep, clusters, seed=seed, pick=pick, alignment=align, drop_misaligned=drop_misaligned
    )
    kept_keys = {data.keys[i] for i in sel.kept}

    lines, n_rows = _kept_lines(manifest, out.parent, kept_keys, image_key or "image", _image_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(lines))
    return ReduceResult(
        out=out,
        n_items=n,
        n_kept=len(sel.kept),
        n_rows=n_rows,
        n_clusters=sel.n_clusters,
        n_dropped=len(sel.dropped),
        skipped=data.stats.summary(),
    )


def _check_counts(keep: float | int, clusters: int | None, n: int, drop_misaligned: float) -> int:
    n_keep = resolve_keep(keep, n)
    pool = n - math.floor(drop_misaligned * n + 0.5)
    if n_keep > pool:
        raise UserError(
            f"--keep {keep}: {n_keep} images, but only {pool} of {n} are left after "
            f"--drop-misaligned {drop_misaligned}; keep fewer or drop fewer"
        )
    if clusters is not None and clusters > pool:
        raise UserError(
            f"--clusters {clusters}: more than the {pool} images to cluster; give at most {pool} (default √N)"
        )
    return n_keep


def _kept_lines(
    manifest: Path, out_dir: Path, kept_keys: set[str], ikey: str, image_path
) -> tuple[list[str], int]:
    """The manifest's lines whose image is kept, in their order; relative image paths re-based to out_dir.
    A line whose path needs no change is copied byte for byte."""
    base = manifest.parent
    lines: list[str] = []
    with manifest.open(encoding="utf-8-sig") as f:
        for raw in f:
            if not raw.strip():
                continue
            obj = json.loads(raw)  # read_records has already checked every line
            key, _ = image_path(base, obj[ikey])
            if key not in kept_keys:
                continue
            new = rewrite_path(obj[ikey], base, out_dir)
            if new == obj[ikey]:
                lines.append(raw if raw.endswith("\n") else raw + "\n")
            else:
                obj[ikey] = new
                lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return lines, len(lines)
