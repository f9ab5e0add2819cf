"""Embed a collection for indexing, in resumable chunks.

Items come from a manifest (read with `xmodal.data.read_records`, decoded one chunk at a time so the first
vectors appear at once and memory stays flat), from an already decoded `ImageTextData`, or from a list of
`Record`s. Each finished chunk is saved as `chunk_NNNNNN.npz` in a work folder (written atomically); a
rerun after a crash or Ctrl-C reuses every finished chunk whose fingerprint (collection, model, settings)
still matches, and recomputes only the rest.

The chunks are also the unit of scale-out: `plan_chunks` cuts a collection into them (the same list in
every process), `embed_chunk` computes one, `assemble_chunks` reads them all back in order — what torchrun
ranks (`xmodal.index.scaleout`) and Ray/Spark map steps do.
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

    def caption_table(self) -> Any:
        """The caption gallery's rows (item id, caption) as a pyarrow table, aligned with caption_vectors."""
        import pyarrow as pa

        return pa.table(
            {
                "id": pa.array([self.rows[i]["id"] for i in self.caption_items], pa.string()),
                "caption": pa.array(self.caption_texts, pa.string()),
            }
        )


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


# -- chunk plans: the unit that processes (torchrun ranks, Ray/Spark tasks) share ----------------------


class StaleWork(UserError):
    """The work folder was planned for another collection, model or settings, or not planned at all."""

    def __init__(self, msg: str, *, no_stamp: bool) -> None:
        super().__init__(msg)
        self.no_stamp = no_stamp


@dataclass
class ChunkPlan:
    """A collection's embedding cut into chunks in a work folder: `chunk_NNNNNN.npz` holds items
    [c·chunk_size, (c+1)·chunk_size). `plan_chunks` derives it from the collection and settings alone, so
    every process that plans the same arguments gets the same chunks and can take its share unasked."""

    encoder: Any
    collection: Collection
    work_dir: Path
    fingerprint: str
    chunk_size: int
    caption_gallery: bool = False
    thumb_size: int = 128
    decoding: Any = None  # the Decoding with captions="generate", else None
    batch_size: int = 256

    @property
    def generate(self) -> bool:
        return self.decoding is not None

    def __len__(self) -> int:
        return (len(self.collection) + self.chunk_size - 1) // self.chunk_size

    @property
    def chunks(self) -> range:
        return range(len(self))

    def bounds(self, c: int) -> tuple[int, int]:
        """Item range [i0, i1) of chunk c."""
        return c * self.chunk_size, min(len(self.collection), (c + 1) * self.chunk_size)

    def path(self, c: int) -> Path:
        return self.work_dir / f"chunk_{c:06d}.npz"

    def share(self, rank: int, world: int) -> list[int]:
        """The chunks of process `rank` of `world`: chunk c goes to rank c % world (strided, so shares differ
        by at most one chunk, however many chunks an earlier run already finished in order)."""
        return [c for c in self.chunks if c % world == rank]

    def missing(self) -> list[int]:
        """Chunks with no file yet."""
        return [c for c in self.chunks if not self.path(c).is_file()]

    def load(self, c: int) -> dict[str, np.ndarray] | None:
        """Chunk c from the work folder; None when it is absent or damaged (then it is recomputed)."""
        i0, i1 = self.bounds(c)
        return _load_chunk(self.path(c), i1 - i0, int(self.encoder.dim), self.generate)


def _read_stamp(work: Path) -> str | None:
    try:
        return json.loads((work / "work.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def plan_chunks(
    encoder: Any,
    data: Any,
    work_dir: str | Path,
    *,
    chunk_size: int = 4096,
    caption_gallery: bool = False,
    thumb_size: int = 128,
    captions: str = "keep",
    decoding: Any = None,
    batch_size: int = 256,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
    max_pixels: int = MAX_PIXELS,
    create: bool = True,
    replace_stale: bool = False,
    log: Callable[[str], None] = _log,
) -> ChunkPlan:
    """Plan the chunked embedding of `data` (what `build_index` accepts) by `encoder` in `work_dir`.

    The planner (one driver, torchrun's rank 0) keeps `create=True`: it makes the folder and its
    `work.json` (the fingerprint of collection, model and settings); `replace_stale=True` clears a folder
    left by a different plan, else that is a UserError, so a worker never deletes finished chunks. Workers
    plan the same arguments with `create=False` (the folder must already be planned: a worker on a node
    that does not see it fails at once). Settings must equal the later `build_index` call's."""
    if chunk_size < 1:
        raise UserError(f"--chunk-size {chunk_size}: must be at least 1")
    from xmodal.index import captions as gen_captions

    dec = None
    if gen_captions.check_mode(captions) == "generate":
        gen_captions.check_captioner(encoder)
        dec = gen_captions.decoding_of(decoding)
    coll, _ = to_collection(
        data,
        image_key=image_key,
        caption_key=caption_key,
        label_key=label_key,
        max_pixels=max_pixels,
        captions=captions,
    )
    work = Path(work_dir)
    fp = _hash(
        coll.fingerprint,
        encoder_fingerprint(encoder),
        int(encoder.image_size),
        int(encoder.dim),
        chunk_size,
        caption_gallery,
        thumb_size,
        *(
            [gen_captions.decoding_dict(dec)] if dec is not None else []
        ),  # old work folders stay valid for keep
    )
    have = _read_stamp(work)
    if have != fp:
        if have is not None or (work.is_dir() and any(work.iterdir())):
            if not replace_stale:
                raise StaleWork(
                    f"{work}: holds chunks of a different collection, model or settings (work.json); give "
                    "the same data, model and settings, or delete the folder",
                    no_stamp=False,
                )
            log(f"{work}: left from a different collection, model or settings; starting afresh")
            shutil.rmtree(work)
        elif not create:
            raise StaleWork(
                f"{work / 'work.json'}: not found; plan the chunks first (plan_chunks with create=True) in a "
                "folder that every worker sees",
                no_stamp=True,
            )
        work.mkdir(parents=True, exist_ok=True)
        stamp = {"fingerprint": fp, "items": len(coll), "chunk_size": chunk_size, "source": coll.source}
        write_atomic(work / "work.json", lambda f: f.write(json.dumps(stamp).encode()))
    return ChunkPlan(
        encoder=encoder,
        collection=coll,
        work_dir=work,
        fingerprint=fp,
        chunk_size=chunk_size,
        caption_gallery=caption_gallery,
        thumb_size=thumb_size,
        decoding=dec,
        batch_size=batch_size,
    )


def _compute_chunk(plan: ChunkPlan, c: int) -> dict[str, np.ndarray]:
    """Decode and embed chunk c (and its captions: generated ones, the caption gallery)."""
    from xmodal.index import captions as gen_captions

    encoder, coll, batch_size = plan.encoder, plan.collection, plan.batch_size
    dim, size = int(encoder.dim), int(encoder.image_size)
    i0, i1 = plan.bounds(c)
    images, ok, thumbs, skipped = coll.load(i0, i1, size, plan.thumb_size)
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
    if plan.generate:
        need = ok & np.array([not coll.rows[i]["captions"] for i in range(i0, i1)], dtype=bool)
        gen = gen_captions.caption_chunk(encoder, images, need, plan.decoding, min(batch_size, 64))
        arrays["gen_mask"] = np.array([bool(t) for t in gen], dtype=bool)
        arrays["gen_text"] = np.array(gen, dtype=str)
    if plan.caption_gallery:
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
    return arrays


def embed_chunk(plan: ChunkPlan, c: int) -> bool:
    """Embed chunk `c` of `plan` into its work folder (written atomically) unless a finished copy is there;
    True when it computed the chunk. The map step of a Ray/Spark job (docs/search.md): each task plans the
    same arguments (`create=False`) and embeds its chunks; `build_index(..., work_dir=WORK,
    embed_missing=False)` then assembles them."""
    if c not in plan.chunks:
        raise ValueError(f"chunk {c}: the plan has chunks 0..{len(plan) - 1}")
    if _read_stamp(plan.work_dir) != plan.fingerprint:  # never write into a folder replanned meanwhile
        raise StaleWork(
            f"{plan.work_dir / 'work.json'}: missing or planned for something else now; plan the chunks "
            "again",
            no_stamp=False,
        )
    if plan.load(c) is not None:
        return False
    _save_chunk(plan.path(c), _compute_chunk(plan, c))
    return True


def embed_chunks(
    plan: ChunkPlan,
    chunks: Sequence[int],
    *,
    progress: bool = False,
    log: Callable[[str], None] = _log,
    keep: bool = False,
) -> tuple[int, int, dict[int, dict[str, np.ndarray]]]:
    """Embed `chunks` of `plan` in order with a progress bar and a log line per chunk, reusing finished
    ones: (computed, reused, their arrays when keep). A rank's or a task's share in one call."""
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    bar = progress_bar("embedding", "items", progress)
    results: dict[int, dict[str, np.ndarray]] = {}
    computed = reused = 0
    with bar:
        task = bar.add_task("embed", total=sum(i1 - i0 for i0, i1 in map(plan.bounds, chunks)), rate="")
        t_start, items_done = time.perf_counter(), 0
        for c in chunks:
            i0, i1 = plan.bounds(c)
            arrays = plan.load(c) if plan.path(c).is_file() else None
            if arrays is not None:
                reused += 1
                if keep:
                    results[c] = arrays
                bar.advance(task, i1 - i0)
                continue
            arrays = _compute_chunk(plan, c)
            _save_chunk(plan.path(c), arrays)
            computed += 1
            if keep:
                results[c] = arrays
            items_done += i1 - i0
            rate = items_done / max(time.perf_counter() - t_start, 1e-9)
            bar.update(task, advance=i1 - i0, rate=f"{rate:.0f}/s")
            log(f"chunk {c + 1}/{len(plan)} computed ({i1 - i0} items, {rate:.0f} items/s)")
            if delay:
                time.sleep(delay)
    return computed, reused, results


def missing_chunks_message(plan: ChunkPlan, missing: Sequence[int]) -> str:
    names = ", ".join(plan.path(c).name for c in missing[:4]) + (", …" if len(missing) > 4 else "")
    return (
        f"{plan.work_dir}: {len(missing)} of {len(plan)} chunk(s) missing ({names}): a rank or worker "
        "stopped before finishing them, or the nodes do not share this folder; rerun the same command "
        "(finished chunks are kept)"
    )


def assemble_chunks(
    plan: ChunkPlan,
    results: dict[int, dict[str, np.ndarray]] | None = None,
    *,
    embed_missing: bool = True,
    wait_s: float = 0.0,
    log: Callable[[str], None] = _log,
) -> Embedded:
    """Every chunk of `plan` in order (from `results`, else the work folder) as one `Embedded`. A chunk
    that is not there is embedded here with `embed_missing`; without it, after waiting up to `wait_s` for
    it (a shared filesystem can show another node's new files late), a UserError names the missing ones."""
    got = dict(results or {})
    deadline = time.monotonic() + wait_s
    while True:
        for c in plan.chunks:
            if c not in got and (a := plan.load(c)) is not None:
                got[c] = a
        missing = [c for c in plan.chunks if c not in got]
        if not missing or embed_missing or time.monotonic() >= deadline:
            break
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
    if missing:
        if not embed_missing:
            raise UserError(missing_chunks_message(plan, missing))
        got.update(embed_chunks(plan, missing, progress=False, log=log, keep=True)[2])
    return _combine(plan, [got[c] for c in plan.chunks], log)


def _combine(plan: ChunkPlan, results: list[dict[str, np.ndarray]], log: Callable[[str], None]) -> Embedded:
    """The chunks' arrays (in order) → Embedded, restricted to the items that decoded."""
    coll, dim = plan.collection, int(plan.encoder.dim)
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
    if plan.generate:
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
        generated=generated,
    )
    if plan.caption_gallery:
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
    plan = plan_chunks(
        encoder,
        coll,
        work_dir,
        chunk_size=chunk_size,
        caption_gallery=caption_gallery,
        thumb_size=thumb_size,
        captions=captions,
        decoding=decoding,
        batch_size=batch_size,
        replace_stale=True,
        log=log,
    )
    n_chunks, todo = len(plan), len(plan.missing())
    log(
        f"embedding {len(coll)} items in {n_chunks} chunk(s) of {chunk_size}: {n_chunks - todo} already "
        f"done, {todo} to compute"
    )
    computed, reused, results = embed_chunks(plan, plan.chunks, progress=progress, log=log, keep=True)
    log(f"embedding done: {computed} chunk(s) computed, {reused} reused")
    emb = assemble_chunks(plan, results, log=log)
    emb.chunks_computed, emb.chunks_reused = computed, reused
    return emb
