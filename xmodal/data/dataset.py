"""Decoded, resized datasets and their on-disk cache.

Every image is decoded and resized once, to exactly what open_clip's eval transform gives before Normalize,
and kept as one uint8 N×3×S×S array (`images.npy`) that later runs memory-map instead of decoding again:
training epochs, evaluation and indexing then cost no JPEG work at all. A cache entry is keyed by everything
that changes its content, and written to a temp folder first so a crash never leaves half an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xmodal.data.decode import load_image
from xmodal.data.records import DataStats, Record, expand_shards, folder_files, read_records, source_kind
from xmodal.errors import UserError

FORMAT_VERSION = 1  # bump when decoding/resizing changes, so old cache entries are not reused
MAX_PIXELS = 64_000_000
_MAX_ASPECT = 64  # longer/shorter side; beyond it the source is centre-cropped first (bounds memory)
_PROGRESS_MIN = 256
AUTO_WORKERS = -1  # load_dataset(workers=AUTO_WORKERS): a pool of every core for big sets
POOL_MIN_RECORDS = 512  # below this a process pool's start costs more than it saves


def resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image → uint8 3×size×size, equal to open_clip's eval transform (Resize shortest side, bicubic;
    CenterCrop) before ToTensor's /255 and Normalize."""
    return torch.from_numpy(_resize_np(img, size))


def _resize_np(img: Image.Image, size: int) -> np.ndarray:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if max(w, h) > _MAX_ASPECT * min(w, h):  # a 1×100000 banner would resize to gigabytes; crop it first
        cw, ch = min(w, _MAX_ASPECT * h), min(h, _MAX_ASPECT * w)
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
    img = TF.center_crop(img, [size, size])
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


@dataclass
class ImageTextData:
    """A decoded dataset: row i of `images` goes with captions[i], labels[i], keys[i], langs[i], extras[i]."""

    images: torch.Tensor  # uint8 N×3×S×S; memory-mapped when it came from the cache
    captions: list[list[str]]
    labels: list[str | None]
    keys: list[str]
    langs: list[str | None]
    extras: list[dict]
    stats: DataStats
    image_size: int
    source: str
    from_cache: bool = False  # True when this load decoded nothing (the cache entry was valid)
    cache_path: Path | None = None  # the cache entry folder, None with use_cache=False

    def __len__(self) -> int:
        return len(self.keys)


# -- decoding ---------------------------------------------------------------------------------------------


def _decode_one(job: tuple[str | bytes, int | None, int]) -> tuple[np.ndarray | None, dict[str, int]]:
    """Worker: one image source → (uint8 3×S×S or None, skip counts). Top-level so a pool can pickle it.
    With size None it only decodes (for `xmodal data check`) and returns an empty array on success."""
    src, size, max_pixels = job
    stats = DataStats()
    img = load_image(src, stats, max_pixels)
    if img is None:
        return None, stats.counts
    if size is None:
        return np.empty(0, np.uint8), stats.counts
    try:
        return _resize_np(img, size), stats.counts
    except Exception:  # noqa: BLE001 - a decoder may hand over an image PIL then cannot resize
        return None, {"corrupt_image": 1}


def decode_workers(n_records: int, workers: int) -> int:
    """Decoding processes: `workers` as given, or for AUTO_WORKERS (-1) every core this process may use once
    the set is big enough for a pool to pay for its start (else 0: decode in this process)."""
    if workers != AUTO_WORKERS:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores > 1 and n_records >= POOL_MIN_RECORDS else 0


def _decode_all(records: list[Record], size: int | None, workers: int, progress: bool,
                label: str) -> Iterator[tuple[np.ndarray | None, dict[str, int]]]:
    """Decode records in order, in a process pool when workers > 0, with a progress bar for big sets."""
    workers = decode_workers(len(records), workers)
    jobs = ((r.image, size, MAX_PIXELS) for r in records)
    show = progress and len(records) >= _PROGRESS_MIN
    with contextlib.ExitStack() as stack:
        if workers > 0:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = stack.enter_context(ctx.Pool(workers))
            results = pool.imap(_decode_one, jobs, chunksize=16)
        else:
            results = map(_decode_one, jobs)
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = stack.enter_context(Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True))
            task = bar.add_task(f"decoding {label}", total=len(records))
        for res in results:
            if show:
                bar.advance(task)
            yield res


def check_images(records: list[Record], stats: DataStats, *, workers: int = 0, progress: bool = True,
                 label: str = "") -> int:
    """Decode (without resizing) every record's image; count failures in stats; return how many decoded."""
    ok = 0
    for pix, skipped in _decode_all(records, None, workers, progress, label):
        stats.update(skipped)
        ok += pix is not None
    return ok


# -- cache key ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("XMODAL_CACHE") or Path.home() / ".cache" / "xmodal")


def _stat_line(p: Path | str) -> str:
    st = os.stat(p)
    return f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n"


def _fingerprint(source: str | Path, kind: str, image_size: int, keys: tuple, stats: DataStats
                 ) -> tuple[str, str, list[Record] | None]:
    """(entry name prefix, content hash, records if reading them was needed to compute the hash)."""
    src = Path(source)
    ident = json.dumps([FORMAT_VERSION, kind, os.path.abspath(source), image_size, MAX_PIXELS, *keys])
    h = hashlib.sha256(ident.encode())
    records = None
    if kind in ("jsonl", "csv"):
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        records = read_records(source, image_key=keys[0], caption_key=keys[1], label_key=keys[2], stats=stats)
        for r in records:
            h.update(_stat_line(r.image).encode())
    elif kind == "folder":
        for p in folder_files(src):
            h.update(_stat_line(p).encode())
    else:
        for p in expand_shards(source):
            h.update(_stat_line(p.resolve()).encode())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.stem or src.name or "data")[:40]
    prefix = f"{stem}-{image_size}px-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"
    return prefix, h.hexdigest()[:16], records


# -- cache entries ----------------------------------------------------------------------------------------


def _load_entry(path: Path, source: str) -> ImageTextData | None:
    """A complete cache entry → ImageTextData (images memory-mapped); None when missing or unreadable."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != FORMAT_VERSION:
            return None
        arr = np.load(path / "images.npy", mmap_mode="c")  # copy-on-write: writable view, file untouched
        n = int(meta["n"])
        if arr.ndim != 4 or arr.shape[0] < n:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return ImageTextData(
        images=torch.from_numpy(arr[:n]), captions=meta["captions"], labels=meta["labels"], keys=meta["keys"],
        langs=meta["langs"], extras=meta["extras"], stats=DataStats(dict(meta["stats"])),
        image_size=int(meta["image_size"]), source=source, from_cache=True, cache_path=path,
    )


def _build(records: list[Record], image_size: int, stats: DataStats, out: Path | None, workers: int,
           progress: bool, label: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode every record into one uint8 array (a .npy memmap in `out` when given); failed images are
    dropped. Returns (array with unused tail rows, meta)."""
    shape = (len(records), 3, image_size, image_size)
    if out is not None:
        arr = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
    else:
        arr = np.empty(shape, dtype=np.uint8)
    kept: list[Record] = []
    for rec, (pix, skipped) in zip(records, _decode_all(records, image_size, workers, progress, label),
                                   strict=True):
        stats.update(skipped)
        if pix is not None:
            arr[len(kept)] = pix
            kept.append(rec)
    if isinstance(arr, np.memmap):
        arr.flush()
    meta = {
        "version": FORMAT_VERSION, "n": len(kept), "image_size": image_size, "source": label,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "stats": stats.as_dict(),
        "keys": [r.key for r in kept], "captions": [r.captions for r in kept],
        "labels": [r.label for r in kept], "langs": [r.lang for r in kept], "extras": [r.extra for r in kept],
    }
    return arr, meta


@contextlib.contextmanager
def _entry_lock(root: Path, name: str) -> Iterator[None]:
    """Serialise builders of one entry (e.g. every torchrun rank): one decodes, the others then hit it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builders race; the atomic rename still keeps entries whole
        yield
        return
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:  # an equal entry appeared meanwhile (another process); keep that one
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path, prefix: str, keep: str) -> None:
    """Drop older entries of the same source and size: a changed dataset should not pile up caches."""
    for old in root.glob(f"{prefix}.*"):
        if old.name != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


# -- the public loader ----------------------------------------------------------------------------------


def load_dataset(source: str | Path, image_size: int, *, cache_dir: str | Path | None = None,
                 use_cache: bool = True, image_key: str | None = None, caption_key: str | None = None,
                 label_key: str | None = None, workers: int = 0, progress: bool = True) -> ImageTextData:
    """Read, decode and resize a dataset, through the preprocessed cache (a hit decodes nothing)."""
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"--image-size: must be a positive integer, got {image_size!r}")
    label = str(source)
    kind = source_kind(source)
    keys = (image_key, caption_key, label_key)
    stats = DataStats()
    if not use_cache:
        records = read_records(source, image_key=image_key, caption_key=caption_key, label_key=label_key,
                               stats=stats)
        _require(records, stats, label)
        arr, meta = _build(records, image_size, stats, None, workers, progress, label)
        _require(meta["keys"], stats, label)
        return _from_meta(torch.from_numpy(arr[: meta["n"]]), meta, stats, label)

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{root}: cannot create the cache folder ({e.strerror}); set --cache-dir or "
                        "XMODAL_CACHE to a writable folder") from e
    prefix, content, records = _fingerprint(source, kind, image_size, keys, stats)
    name = f"{prefix}.{content}"
    final = root / name
    hit = _load_entry(final, label)
    if hit is not None:
        return hit
    with _entry_lock(root, prefix):
        hit = _load_entry(final, label)  # built by another process while we waited
        if hit is not None:
            return hit
        if records is None:
            records = read_records(source, image_key=image_key, caption_key=caption_key, label_key=label_key,
                                   stats=stats)
        _require(records, stats, label)
        shutil.rmtree(final, ignore_errors=True)  # an unreadable entry of this name
        tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            arr, meta = _build(records, image_size, stats, tmp, workers, progress, label)
            del arr  # close the memmap before the folder moves
            _require(meta["keys"], stats, label)
            (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, default=str))
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(root, prefix, name)
    data = _load_entry(final, label)
    if data is None:
        raise UserError(f"{final}: the cache entry just written cannot be read; check the disk or use "
                        "another --cache-dir")
    data.from_cache = False
    return data


def _from_meta(images: torch.Tensor, meta: dict, stats: DataStats, source: str) -> ImageTextData:
    return ImageTextData(images=images, captions=meta["captions"], labels=meta["labels"], keys=meta["keys"],
                         langs=meta["langs"], extras=meta["extras"], stats=stats,
                         image_size=int(meta["image_size"]), source=source)


def _require(items: list, stats: DataStats, source: str) -> None:
    if not items:
        why = stats.summary() or "it is empty"
        raise UserError(f"{source}: no usable samples ({why}); check the image paths and captions")
