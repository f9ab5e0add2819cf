"""Caption every image of a manifest into a new manifest, in resumable chunks.

Decoding is slow (a decoder pass per token, beams multiply it), so a long run must survive a crash or a
Ctrl-C: as in `xmodal index build`, items are processed in chunks and each finished chunk is written
atomically to a work folder beside the output (`OUT.parts/chunk_NNNNNN.json`). A rerun of the same command
reuses every finished chunk and captions only the rest. The folder's `work.json` records the model, the
data and the decoding options; a rerun that differs in any of them is refused (one line naming what
differs) rather than mixing captions of two settings — `--restart` discards the old chunks. The output
manifest is written atomically at the end and the work folder removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xmodal import fsutil
from xmodal.errors import UserError

FORMAT = 1  # of the chunk files; bump when their content changes
# Test hook (tests/test_caption_cli.py only), shared with `xmodal index build`: seconds to sleep after
# each saved chunk, so that a test can kill the process part-way. Never set in normal use.
TEST_DELAY_ENV = "XMODAL_TEST_CHUNK_DELAY"
_IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Result:
    """What `caption_manifest` wrote."""

    out: Path
    rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    chunks_computed: int = 0
    chunks_reused: int = 0
    empty: int = 0  # captions that came out empty (xmodal train skips such rows)


def parts_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.parts"


def images_dir(out: Path) -> Path:
    """Where images from webdataset shards are written (a manifest row needs an image file)."""
    return out.parent / f"{out.stem}_images"


def check_out(out: Path, data: str | Path) -> None:
    """--out must be a new .jsonl manifest, not the input itself."""
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: give a .jsonl file (the output is a JSONL manifest)")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a .jsonl file")
    if Path(data).exists() and Path(data).resolve() == out.resolve():
        raise UserError(f"--out {out}: is the input manifest; write the captions to another file")


def decoding_key(decoding: Any, batch_size: int) -> dict[str, Any]:
    """The decoding options that change a caption (what a rerun must match): temperature and seed only
    for --top-p (with the batch size, since each batch is seeded), the length penalty only for beams."""
    d = asdict(decoding)
    if decoding.top_p is None:
        d.pop("temperature"), d.pop("seed")
    else:
        d["batch_size"] = batch_size
    if decoding.beam <= 1:
        d.pop("length_penalty")
    return d


def _image_names(records: list[Any], ids: list[str]) -> list[str | None]:
    """File names (without extension) for images held as bytes (shards): the sample key made safe, unique."""
    names: list[str | None] = []
    seen: set[str] = set()
    for rec, key in zip(records, ids, strict=True):
        if not isinstance(rec.image, bytes):
            names.append(None)
            continue
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "image"
        name, n = base, 0
        while name in seen:
            n += 1
            name = f"{base}_{n}"
        seen.add(name)
        names.append(name)
    return names


def _write_image(folder: Path, name: str, data: bytes) -> Path:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        ext = _IMAGE_EXT.get(img.format or "", (img.format or "img").lower())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{ext}"
    if not (path.is_file() and path.stat().st_size == len(data)):
        fsutil.write_bytes_atomic(path, data)
    return path


def _stamp(model: str, data: str, decoding: Any, batch_size: int, chunk_size: int, items: int) -> dict:
    return {
        "format": FORMAT,
        "model": model,
        "data": data,
        "decoding": decoding_key(decoding, batch_size),
        "options": {**asdict(decoding), "batch_size": batch_size},  # for the message only
        "chunk_size": chunk_size,
        "items": items,
    }


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether chunks made under `old` are this job's (a `new` model of None: not known yet, not compared)."""
    return all(old.get(k) == v for k, v in new.items() if k != "options" and not (k == "model" and v is None))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    if old.get("format") != new["format"]:
        out.append("another xmodal version")
    if new["model"] is not None and old.get("model") != new["model"]:
        out.append("another model")
    if old.get("data") != new["data"] or old.get("items") != new["items"]:
        out.append("other data (the manifest or its images changed)")
    if old.get("chunk_size") != new["chunk_size"]:
        out.append(f"--chunk-size {old.get('chunk_size')}")
    if old.get("decoding") != new["decoding"]:
        was, now = old.get("options") or {}, new["options"]
        keys = [k for k in now if was.get(k) != now[k] and (k != "batch_size" or now["top_p"] is not None)]
        shown = "; ".join(f"--{k.replace('_', '-')} {_show(was.get(k))}, now {_show(now[k])}" for k in keys)
        out.append(f"other decoding options ({shown})")
    return out


def _show(value: Any) -> str:
    return "off" if value is None else str(value)


def _refusal(work: Path, stamp: dict[str, Any]) -> UserError | None:
    """The error for a work folder holding finished chunks of another job; None where they are this job's
    (or there are none)."""
    chunks = sorted(work.glob("chunk_*.json")) if work.is_dir() else []
    if not chunks:
        return None
    try:
        old = json.loads((work / "work.json").read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and _same(old, stamp):
        return None
    why = ", ".join(_differences(old, stamp)) if isinstance(old, dict) else "an unknown earlier run"
    return UserError(
        f"{work}: holds {len(chunks)} finished chunk(s) made with {why}; rerun with the same options to "
        "resume, or add --restart to discard them"
    )


def _prepare_work(work: Path, stamp: dict[str, Any], restart: bool, log: Callable[[str], None]) -> None:
    """Make `work` hold chunks of exactly this job: reuse it, refuse another job's, or (restart) clear it."""
    err = _refusal(work, stamp)
    if err is not None and not restart:
        raise err
    stamp_path = work / "work.json"
    if err is None and work.is_dir() and stamp_path.is_file():
        try:
            if _same(json.loads(stamp_path.read_text()), stamp):
                return
        except (OSError, ValueError):
            pass
    if work.exists():
        if err is not None:
            log(f"{work}: --restart: discarding the finished chunks of an earlier, different run")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    fsutil.write_text_atomic(stamp_path, json.dumps(stamp, sort_keys=True))


def _load_chunk(path: Path, n: int) -> dict[str, Any] | None:
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(got, dict) or got.get("items") != n or not isinstance(got.get("rows"), list):
        return None
    return got


def _progress_bar(progress: bool):
    from xmodal.index.embed import progress_bar

    return progress_bar("captioning", "images", progress)


def caption_manifest(
    encoder: Any,
    data: str | Path,
    out: str | Path,
    decoding: Any,
    *,
    batch_size: int = 64,
    chunk_size: int = 256,
    progress: bool = True,
    restart: bool = False,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
    log: Callable[[str], None] = _log,
) -> Result:
    """Caption every image of the manifest `data` and write the manifest `out` (JSONL, atomically): per
    image {"image", "caption" (generated), "label" (if any), "reference" (the input's captions)}, image
    paths relative to `out`'s folder (absolute ones stay absolute). Resumable; see the module docstring."""
    from xmodal.caption.images import caption_uint8
    from xmodal.data import DataStats, read_records
    from xmodal.index.embed import collection_from_records, encoder_fingerprint
    from xmodal.models.captioner import check_coca

    if chunk_size < 1:
        raise UserError(f"--chunk-size {chunk_size}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    out = Path(out).absolute()
    check_out(out, data)
    read_stats = DataStats()
    records = read_records(
        data,
        image_key=image_key,
        caption_key=caption_key,
        label_key=label_key,
        stats=read_stats,
        keep_uncaptioned=True,  # an uncaptioned collection is what captioning is for
    )
    if not records:
        raise UserError(f"{data}: no usable items ({read_stats.summary() or 'it is empty'})")
    coll = collection_from_records(records, str(data))
    names = _image_names(records, coll.ids)
    n = len(records)
    work, img_dir = parts_dir(out), images_dir(out)
    stamp = _stamp(None, coll.fingerprint, decoding, batch_size, chunk_size, n)
    if not restart and (err := _refusal(work, stamp)) is not None:
        raise err  # before the (slow) model load
    if callable(encoder):
        encoder = encoder()
    check_coca(encoder.model, getattr(encoder, "name", "caption"))
    decoding.check(int(encoder.model.text.context_length))
    stamp["model"], size = encoder_fingerprint(encoder), int(encoder.image_size)
    skipped = read_stats.as_dict()

    def image_field(i: int, rec: Any) -> str:
        if isinstance(rec.image, bytes):
            return os.path.relpath(_write_image(img_dir, names[i], rec.image), out.parent)
        if Path(rec.key).is_absolute():
            return rec.key
        return Path(os.path.relpath(os.path.abspath(rec.image), out.parent)).as_posix()

    with fsutil.locked(out):
        _prepare_work(work, stamp, restart, log)
        n_chunks = (n + chunk_size - 1) // chunk_size
        paths = [work / f"chunk_{c:06d}.json" for c in range(n_chunks)]
        done = [p.is_file() for p in paths]
        log(
            f"captioning {n} images in {n_chunks} chunk(s) of {chunk_size}: {sum(done)} already done "
            f"(skipped), {n_chunks - sum(done)} to caption"
        )
        delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
        rows: list[dict[str, Any]] = []
        computed = reused = 0
        with _progress_bar(progress) as bar:
            task = bar.add_task("caption", total=n, rate="")
            t0, captioned = time.perf_counter(), 0
            for c, path in enumerate(paths):
                i0, i1 = c * chunk_size, min(n, (c + 1) * chunk_size)
                got = _load_chunk(path, i1 - i0) if done[c] else None
                if got is None:
                    images, ok, _, bad = coll.load(i0, i1, size, 0)
                    import torch

                    caps = caption_uint8(
                        encoder, images[torch.from_numpy(ok)], decoding, batch_size, start=i0
                    )
                    it = iter(caps)
                    chunk_rows = []
                    for j in range(i0, i1):
                        if not ok[j - i0]:
                            continue
                        rec = records[j]
                        row: dict[str, Any] = {"image": image_field(j, rec), "caption": next(it)}
                        if rec.label is not None:
                            row["label"] = rec.label
                        row["reference"] = list(rec.captions)
                        chunk_rows.append(row)
                    got = {"items": i1 - i0, "rows": chunk_rows, "skipped": bad}
                    fsutil.write_text_atomic(path, json.dumps(got, ensure_ascii=False))
                    computed += 1
                    captioned += i1 - i0
                    rate = captioned / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=i1 - i0, rate=f"{rate:.1f}/s")
                    log(f"chunk {c + 1}/{n_chunks} captioned ({i1 - i0} images, {rate:.1f} images/s)")
                    if delay:
                        time.sleep(delay)
                else:
                    reused += 1
                    bar.advance(task, i1 - i0)
                rows += got["rows"]
                for k, v in (got.get("skipped") or {}).items():
                    skipped[k] = skipped.get(k, 0) + int(v)
        log(f"captioning done: {computed} chunk(s) captioned, {reused} reused")
        if skipped:
            log("skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
        if not rows:
            raise UserError(f"{data}: no image could be captioned ({', '.join(skipped) or 'no items'})")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        fsutil.write_text_atomic(out, text)
        shutil.rmtree(work, ignore_errors=True)
    empty = sum(1 for r in rows if not r["caption"].strip())
    if empty:
        log(f"warning: {empty} caption(s) came out empty; xmodal train skips those rows")
    log(f"wrote {out} ({len(rows)} captioned images)")
    return Result(out, len(rows), skipped, computed, reused, empty)
