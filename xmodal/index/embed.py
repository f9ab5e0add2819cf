"""Embed a collection for indexing, in resumable chunks.

Items come from a manifest (read with `xmodal.data.read_records`, decoded one chunk at a time so the first
vectors appear at once and memory stays flat), from an already decoded `ImageTextData`, or from a list of
`Record`s. Each finished chunk is saved as `chunk_NNNNNN.npz` in a work folder (written atomically); a
rerun after a crash or Ctrl-C reuses every finished chunk whose fingerprint (collection, model, settings)
still matches, and recomputes only the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xmodal.errors import UserError
from xmodal.fsutil import write_atomic

# Test hook (used by tests/test_index_crash.py only): seconds to sleep after each saved chunk, so a test can
# kill `xmodal index build` part-way through. Never set in normal use.
TEST_DELAY_ENV = "XMODAL_TEST_CHUNK_DELAY"

RESERVED = ("id", "path", "caption", "captions", "label", "lang")
MAX_PIXELS = 64_000_000


@dataclass
class Collection:
    """Items to index: metadata rows plus a loader for chunks of images (uint8 3×S×S) and thumbnails."""

    rows: list[dict[str, Any]]
    load: Callable[[int, int, int, int], tuple[torch.Tensor, np.ndarray, list[bytes | None], dict[str, int]]]
    fingerprint: str
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]


@dataclass
class Embedded:
    """Output of `embed_collection`, already restricted to the items that decoded."""

    rows: list[dict[str, Any]]
    vectors: np.ndarray  # N×D float32, L2-normalised
    thumbs: list[bytes | None]
    caption_vectors: np.ndarray | None  # C×D, or None without a caption gallery
    caption_items: list[int] = field(default_factory=list)  # row index (into rows) of each caption vector
    caption_texts: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    generated: int = 0  # rows whose caption the model generated (`captions="generate"`)
    chunks_computed: int = 0
    chunks_reused: int = 0


# -- thumbnails ---------------------------------------------------------------------------------------


def make_thumb(img: Image.Image, size: int) -> bytes:
    """A JPEG thumbnail (longest side ≤ size) of an RGB image."""
    t = img.convert("RGB")
    t.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")


# -- collections --------------------------------------------------------------------------------------


def _clean_value(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)


def _row(
    key: str, path: str | None, captions: Sequence[str], label: Any, lang: Any, extra: dict | None
) -> dict:
    row: dict[str, Any] = {
        "id": key,
        "path": path,
        "caption": captions[0] if captions else "",
        "captions": list(captions),
        "label": None if label is None else str(label),
        "lang": None if lang is None else str(lang),
    }
    for k, v in (extra or {}).items():
        name = f"extra_{k}" if k in RESERVED else str(k)
        row[name] = _clean_value(v)
    return row


def _unique_ids(rows: list[dict]) -> None:
    seen: dict[str, int] = {}
    for r in rows:
        base = r["id"]
        if base in seen:
            seen[base] += 1
            r["id"] = f"{base}#{seen[base]}"
        else:
            seen[base] = 0


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _file_stamp(p: str) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def collection_from_records(
    records: Sequence[Any], source: str = "records", max_pixels: int = MAX_PIXELS
) -> Collection:
    """Records (from read_records) → Collection; images are decoded chunk by chunk with load_image."""
    from xmodal.data import load_image, resize_center_crop
    from xmodal.data.records import DataStats

    records = list(records)
    rows = [
        # absolute, so that `search --rerank` finds the image again from any working directory
        _row(
            r.key,
            os.path.abspath(r.image) if isinstance(r.image, str) else None,
            r.captions,
            r.label,
            r.lang,
            r.extra,
        )
        for r in records
    ]
    _unique_ids(rows)
    stamps = [
        (_file_stamp(r.image) if isinstance(r.image, str) else hashlib.sha1(r.image).hexdigest())
        for r in records
    ]
    fp = _hash("records", rows, stamps)

    def load(i0: int, i1: int, size: int, thumb_size: int):
        stats = DataStats()

        def one(rec):
            img = load_image(rec.image, stats, max_pixels)
            if img is None:
                return None, None
            try:
                return resize_center_crop(img, size), (make_thumb(img, thumb_size) if thumb_size else None)
            except Exception:  # noqa: BLE001 - an image PIL opened but cannot resize counts as corrupt
                stats.add("corrupt_image")
                return None, None

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            out = list(pool.map(one, records[i0:i1]))
        ok = np.array([t is not None for t, _ in out], dtype=bool)
        zeros = torch.zeros(3, size, size, dtype=torch.uint8)
        images = (
            torch.stack([t if t is not None else zeros for t, _ in out])
            if out
            else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        )
        return images, ok, [th for _, th in out], stats.as_dict()

    return Collection(rows=rows, load=load, fingerprint=fp, source=source)


def collection_from_dataset(data: Any) -> Collection:
    """An ImageTextData (images already decoded at the model's size) → Collection."""
    src = Path(str(getattr(data, "source", "")))
    base = src.parent if src.suffix else src
    rows = []
    for i, key in enumerate(data.keys):
        p = Path(key) if Path(key).is_absolute() else base / key
        rows.append(
            _row(
                key,
                str(p.absolute()) if p.is_file() else None,
                data.captions[i],
                data.labels[i],
                (data.langs[i] if getattr(data, "langs", None) else None),
                (data.extras[i] if getattr(data, "extras", None) else None),
            )
        )
    _unique_ids(rows)
    images = data.images
    # Fingerprint: metadata plus a cheap content sample (a strided subset of pixels of every image).
    sample = (
        images[:, :, ::7, ::7].reshape(len(images), -1).to(torch.int64).sum(dim=1).tolist()
        if len(images)
        else []
    )
    fp = _hash("dataset", rows, sample, int(data.image_size))

    def load(i0: int, i1: int, size: int, thumb_size: int):
        x = images[i0:i1]
        if x.shape[-1] != size:
            raise UserError(
                f"dataset images are {x.shape[-1]} px but the model needs {size} px; load the data "
                f"with load_dataset(source, {size})"
            )
        thumbs = [make_thumb(tensor_to_image(t), thumb_size) if thumb_size else None for t in x]
        return torch.as_tensor(x), np.ones(len(x), dtype=bool), thumbs, {}

    return Collection(rows=rows, load=load, fingerprint=fp, source=str(getattr(data, "source", "dataset")))


def to_collection(
    data: Any,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
    max_pixels: int = MAX_PIXELS,
    captions: str = "keep",
) -> tuple[Collection, dict]:
    """Anything `build_index` accepts → (Collection, reader skip counts). captions="generate" keeps the
    items without a caption (`xmodal.index.captions` captions them)."""
    if isinstance(data, Collection):
        return data, {}
    if isinstance(data, (str, Path)):
        from xmodal.data import read_records
        from xmodal.data.records import DataStats

        stats = DataStats()
        records = read_records(
            data,
            image_key=image_key,
            caption_key=caption_key,
            label_key=label_key,
            stats=stats,
            keep_uncaptioned=captions == "generate",
        )
        if not records:
            why = stats.summary() or "it is empty"
            raise UserError(f"{data}: no usable items ({why}); check the image paths and captions")
        return collection_from_records(records, str(data), max_pixels), stats.as_dict()
    if hasattr(data, "images") and hasattr(data, "keys"):
        return collection_from_dataset(data), {}
    if isinstance(data, (list, tuple)) and all(hasattr(r, "key") and hasattr(r, "image") for r in data):
        return collection_from_records(data, "records", max_pixels), {}
    raise UserError(f"cannot index {type(data).__name__}: pass a manifest path, an ImageTextData or Records")


# -- the chunked embedding loop ------------------------------------------------------------------------


def progress_bar(verb: str, unit: str, enabled: bool):
    """The chunked loops' rich progress line on stderr (count, rate, ETA); off without a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn(f"[bold]{verb}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


def encoder_fingerprint(encoder: Any) -> str:
    """Identifies the weights cheaply: a checksum of every parameter tensor's sum and shape."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in encoder.model.state_dict().items():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            if p.is_floating_point():
                h.update(np.float64(p.double().sum().item()).tobytes())
    return h.hexdigest()[:24]


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_atomic(path, lambda f: np.savez(f, **arrays))


def _load_chunk(path: Path, n: int, dim: int, generate: bool = False) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - a damaged chunk is simply recomputed
        return None
    if arrays.get("vectors") is None or arrays["vectors"].shape != (n, dim) or len(arrays.get("ok", [])) != n:
        return None
    if generate and (len(arrays.get("gen_mask", [])) != n or len(arrays.get("gen_text", [])) != n):
        return None
    return arrays


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def embed_collection(
    encoder: Any,
    coll: Collection,
    work_dir: str | Path,
    *,
    chunk_size: int = 4096,
    caption_gallery: bool = False,
    thumb_size: int = 128,
    progress: bool = True,
    batch_size: int = 256,
    log: Callable[[str], None] = _log,
    captions: str = "keep",
    decoding: Any = None,
) -> Embedded:
    """Embed every item of `coll`, chunk by chunk, reusing finished chunks in `work_dir`.

    captions="generate": items without a caption get one from the model's caption decoder (a CoCa
    model; `decoding` is a `Decoding` or its dict), in the same chunk (saved with its vectors), and the
    rows gain `caption_generated`."""
    if chunk_size < 1:
        raise UserError(f"--chunk-size {chunk_size}: must be at least 1")
    from xmodal.index import captions as gen_captions

    generate = gen_captions.check_mode(captions) == "generate"
    dec = None
    if generate:
        gen_captions.check_captioner(encoder)
        dec = gen_captions.decoding_of(decoding)
    work = Path(work_dir)
    n, dim, size = len(coll), int(encoder.dim), int(encoder.image_size)
    fp = _hash(
        coll.fingerprint,
        encoder_fingerprint(encoder),
        size,
        dim,
        chunk_size,
        caption_gallery,
        thumb_size,
        *([gen_captions.decoding_dict(dec)] if generate else []),  # old work folders stay valid for keep
    )
    stamp = work / "work.json"
    try:
        same = json.loads(stamp.read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        same = False
    if not same:
        if work.exists():
            log(f"{work}: left from a different collection, model or settings; starting afresh")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        write_atomic(
            stamp,
            lambda f: f.write(
                json.dumps(
                    {"fingerprint": fp, "items": n, "chunk_size": chunk_size, "source": coll.source}
                ).encode()
            ),
        )
    n_chunks = (n + chunk_size - 1) // chunk_size
    paths = [work / f"chunk_{c:06d}.npz" for c in range(n_chunks)]
    done = {c for c, p in enumerate(paths) if p.is_file()}
    log(
        f"embedding {n} items in {n_chunks} chunk(s) of {chunk_size}: {len(done)} already done, "
        f"{n_chunks - len(done)} to compute"
    )
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)

    bar = progress_bar("embedding", "items", progress)
    results: list[dict[str, np.ndarray]] = []
    computed = reused = 0
    with bar:
        task = bar.add_task("embed", total=n, rate="")
        t_start, items_done = time.perf_counter(), 0
        for c, path in enumerate(paths):
            i0, i1 = c * chunk_size, min(n, (c + 1) * chunk_size)
            arrays = _load_chunk(path, i1 - i0, dim, generate) if c in done else None
            if arrays is not None:
                reused += 1
                results.append(arrays)
                bar.advance(task, i1 - i0)
                continue
            images, ok, thumbs, skipped = coll.load(i0, i1, size, thumb_size)
            vecs = np.zeros((i1 - i0, dim), dtype=np.float32)
            if ok.any():
                vecs[ok] = encoder.encode_images(images[torch.from_numpy(ok)], batch_size=batch_size).numpy()
            lens = np.array(
                [len(t) if (t is not None and o) else 0 for t, o in zip(thumbs, ok, strict=True)],
                dtype=np.int64,
            )
            blob = b"".join(t for t, o in zip(thumbs, ok, strict=True) if t is not None and o)
            arrays = {
                "vectors": vecs,
                "ok": ok,
                "thumb_len": lens,
                "thumb_data": np.frombuffer(blob, dtype=np.uint8),
                "skipped": np.array(json.dumps(skipped)),
            }
            gen = [""] * (i1 - i0)
            if generate:
                need = ok & np.array([not coll.rows[i]["captions"] for i in range(i0, i1)], dtype=bool)
                gen = gen_captions.caption_chunk(encoder, images, need, dec, min(batch_size, 64))
                arrays["gen_mask"] = np.array([bool(t) for t in gen], dtype=bool)
                arrays["gen_text"] = np.array(gen, dtype=str)
            if caption_gallery:
                caps = [
                    (coll.rows[i]["captions"] or ([gen[i - i0]] if gen[i - i0] else [])) if ok[i - i0] else []
                    for i in range(i0, i1)
                ]
                flat = [t for cs in caps for t in cs]
                arrays["cap_count"] = np.array([len(cs) for cs in caps], dtype=np.int64)
                arrays["cap_vectors"] = (
                    encoder.encode_texts(flat, batch_size=batch_size).numpy()
                    if flat
                    else np.zeros((0, dim), np.float32)
                )
            _save_chunk(path, arrays)
            computed += 1
            results.append(arrays)
            items_done += i1 - i0
            rate = items_done / max(time.perf_counter() - t_start, 1e-9)
            bar.update(task, advance=i1 - i0, rate=f"{rate:.0f}/s")
            log(f"chunk {c + 1}/{n_chunks} computed ({i1 - i0} items, {rate:.0f} items/s)")
            if delay:
                time.sleep(delay)
    log(f"embedding done: {computed} chunk(s) computed, {reused} reused")

    ok_all = np.concatenate([a["ok"] for a in results]) if results else np.zeros(0, bool)
    vectors = (
        np.concatenate([a["vectors"] for a in results])[ok_all] if results else np.zeros((0, dim), np.float32)
    )
    thumbs: list[bytes | None] = []
    for a in results:
        data, off = a["thumb_data"].tobytes(), 0
        for ln, o in zip(a["thumb_len"], a["ok"], strict=True):
            if o:
                thumbs.append(data[off : off + ln] if ln else None)
            off += int(ln)
    skipped: dict[str, int] = {}
    for a in results:
        for k, v in json.loads(str(a["skipped"])).items():
            skipped[k] = skipped.get(k, 0) + int(v)
    all_rows = coll.rows
    generated = 0
    if generate:
        # generated captions replace the empty ones (new dicts: the collection's rows stay as read)
        mask = np.concatenate([a["gen_mask"] for a in results]) if results else np.zeros(0, bool)
        texts = [str(t) for a in results for t in a["gen_text"].tolist()]
        all_rows = [
            {**r, "caption": t, "captions": [t], "caption_generated": True}
            if g
            else {**r, "caption_generated": False}
            for r, g, t in zip(coll.rows, mask, texts, strict=True)
        ]
        generated = int((mask & ok_all).sum())
        log(f"captions generated: {generated} item(s) had none")
    rows = [r for r, o in zip(all_rows, ok_all, strict=True) if o]
    emb = Embedded(
        rows=rows,
        vectors=vectors,
        thumbs=thumbs,
        caption_vectors=None,
        skipped=skipped,
        chunks_computed=computed,
        chunks_reused=reused,
        generated=generated,
    )
    if caption_gallery:
        emb.caption_vectors = (
            np.concatenate([a["cap_vectors"] for a in results]) if results else np.zeros((0, dim), np.float32)
        )
        counts = np.concatenate([a["cap_count"] for a in results])
        kept_row = np.cumsum(ok_all) - 1
        for i, cnt in enumerate(counts):
            if cnt:
                emb.caption_items.extend([int(kept_row[i])] * int(cnt))
                emb.caption_texts.extend(all_rows[i]["captions"][: int(cnt)])
    return emb
