"""Generated captions for indexed items (`xmodal index build --captions generate`).

Items whose caption is missing or empty get one from the index's own model, a CoCa run's caption
decoder (`xmodal.models.captioner`), inside the chunked embedding pass of `xmodal.index.embed`: each
chunk's generated captions are saved in the chunk file together with its vectors, so a killed build keeps
the captions of every finished chunk and a rerun recomputes only the rest. They are stored in
meta.parquet's `caption`/`captions` columns, marked by the boolean column `caption_generated`, and join
the caption gallery (image → text search) like the collection's own captions. index.json records
`captions: {"mode": "generate", "generated": N, "decoding": {...}}`, so that `index add` generates
captions for new items with the same decoding.

The manifest readers of `xmodal.data` drop items without a caption (training needs one); for an image
folder and a JSONL manifest this module reads those items back (`read_for_captions`). CSV/TSV rows and
shard samples without a caption are still skipped, as the readers count them.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from xmodal.errors import UserError

MODES = ("keep", "generate")
FLAG = "--captions generate"
# the reader's skip reasons that `--captions generate` turns into items to caption
CAPTIONLESS_SKIPS = ("missing_caption", "no_valid_caption")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"--captions {mode}: use keep (the collection's captions only) or generate")
    return mode


def check_captioner(encoder: Any) -> None:
    """One line naming --captions when the model cannot caption (it is not a CoCa model)."""
    from xmodal.models.captioner import check_coca

    check_coca(encoder.model, FLAG)


def decoding_of(spec: Any = None) -> Any:
    """A `Decoding` from None (the defaults), a Decoding, or its dict as index.json records it."""
    from xmodal.models.captioner import Decoding

    if spec is None:
        return Decoding()
    if isinstance(spec, Decoding):
        return spec
    known = {f.name for f in fields(Decoding)}
    return Decoding(**{k: v for k, v in dict(spec).items() if k in known})


def decoding_dict(d: Any) -> dict[str, Any]:
    return asdict(decoding_of(d))


def make_decoding(max_len: int = 30, beam: int = 1) -> Any:
    """The decoding `index build --caption-max-len/--caption-beam` ask for, checked with their flag names."""
    if max_len < 2:
        raise UserError(f"--caption-max-len {max_len}: give at least 2 tokens (start and end included)")
    if beam < 1:
        raise UserError(f"--caption-beam {beam}: give 1 (greedy) or more beams")
    d = decoding_of(None)
    d.max_len, d.beam = int(max_len), int(beam)
    d.min_len = min(d.min_len, d.max_len - 1)
    return d


def recorded(info: dict[str, Any]) -> tuple[str, Any]:
    """(mode, decoding) as index.json records them: what `index add` must do for new items."""
    c = info.get("captions") or {}
    mode = c.get("mode", "keep") if isinstance(c, dict) else "keep"
    if mode != "generate":
        return "keep", None
    return mode, decoding_of(c.get("decoding"))


def caption_chunk(encoder: Any, images: Any, need: Any, decoding: Any, batch_size: int) -> list[str]:
    """Captions for the images where `need` (bool array) is true; "" elsewhere."""
    import numpy as np
    import torch

    from xmodal.models.captioner import caption_images

    out = [""] * len(need)
    idx = np.flatnonzero(need)
    if len(idx):
        texts = caption_images(encoder, images[torch.from_numpy(idx)], decoding, batch_size=batch_size)
        for i, t in zip(idx, texts, strict=True):
            out[int(i)] = t.strip()
    return out


# -- reading the items the manifest readers drop ------------------------------------------------------


def read_for_captions(
    source: str | Path,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
    stats: Any = None,
) -> list[Any]:
    """Like `xmodal.data.read_records`, but an image folder's or a JSONL manifest's items without a
    caption are kept (with `captions=[]`) instead of skipped. Other sources read as usual."""
    from xmodal.data import read_records
    from xmodal.data.records import DataStats, source_kind

    stats = stats if stats is not None else DataStats()
    kind = source_kind(source)
    p = Path(source)

    def read(src: Any) -> list[Any]:
        keys = {"image_key": image_key, "caption_key": caption_key, "label_key": label_key}
        return read_records(src, **keys, stats=stats)

    if kind == "folder":
        records = read_records(p, label_key=label_key, stats=stats)
        extra = _folder_captionless(p, {r.key for r in records}, label_key)
    elif kind == "jsonl":
        found = _jsonl_captionless(p, image_key, caption_key, label_key)
        if found is None:  # a malformed manifest: read_records says what is wrong with it
            return read(p)
        extra, all_captionless = found
        records = [] if all_captionless else read(p)
        keys = {r.key for r in records}
        extra = [r for r in extra if r.key not in keys]
        kept = [r for r in extra if os.path.isfile(r.image)]
        if len(kept) < len(extra):
            stats.add("missing_image", len(extra) - len(kept))
        extra = kept
    else:
        return read(source)
    for reason in CAPTIONLESS_SKIPS:  # those items are indexed now, not skipped
        stats.counts.pop(reason, None)
    return records + extra


def _folder_captionless(root: Path, have: set[str], label_key: str | None) -> list[Any]:
    from xmodal.data.records import IMAGE_EXTS, Record, folder_files

    lkey = label_key or "label"
    out = []
    for img in folder_files(root):
        if img.suffix.lower() not in IMAGE_EXTS:
            continue
        key = img.relative_to(root).as_posix()
        if key in have:
            continue
        meta = _sidecar(img.with_suffix(".json"))
        out.append(
            Record(
                key,
                str(img),
                [],
                _opt(meta.get(lkey)),
                _opt(meta.get("lang")),
                {k: v for k, v in meta.items() if k not in (lkey, "lang")},
            )
        )
    return out


def _sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or delete it") from e
    return meta if isinstance(meta, dict) else {}


def _opt(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return json.dumps(value, sort_keys=True)
    return str(value).strip()


def _has_caption(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return any(isinstance(c, str) and c.strip() for c in items)


def _jsonl_captionless(
    path: Path, image_key: str | None, caption_key: str | None, label_key: str | None
) -> tuple[list[Any], bool] | None:
    """(records of the lines without a usable caption, whether every line is one), or None when a line is
    malformed (read_records then reports it)."""
    from xmodal.data.records import Record

    ikey, lkey = image_key or "image", label_key or "label"
    out, n_lines, n_without = [], 0, 0
    seen: set[str] = set()
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get(ikey), str) or not obj[ikey].strip():
                    return None
                n_lines += 1
                ckey = caption_key or ("caption" if "caption" in obj or "captions" not in obj else "captions")
                if ckey in obj and _has_caption(obj[ckey]):
                    continue
                n_without += 1
                key, abspath = _image_path(path.parent, obj[ikey])
                if key in seen:
                    continue
                seen.add(key)
                extra = {k: v for k, v in obj.items() if k not in (ikey, ckey, lkey, "lang")}
                out.append(Record(key, abspath, [], _opt(obj.get(lkey)), _opt(obj.get("lang")), extra))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return out, bool(n_lines) and n_without == n_lines


def _image_path(base: Path, value: str) -> tuple[str, str]:
    """Manifest image field → (key, absolute path), as the JSONL reader forms them."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return p.as_posix(), str(p)
    key = posixpath.normpath(value.replace("\\", "/"))
    return key, str(base / key)
