"""Generated captions for indexed items (`xmodal index build --captions generate`).

Items whose caption is missing or empty get one from the index's own model, a CoCa run's caption
decoder (`xmodal.models.captioner`), inside the chunked embedding pass of `xmodal.index.embed`: each
chunk's generated captions are saved in the chunk file together with its vectors, so a killed build keeps
the captions of every finished chunk and a rerun recomputes only the rest. They are stored in
meta.parquet's `caption`/`captions` columns, marked by the boolean column `caption_generated`, and join
the caption gallery (image → text search) like the collection's own captions. index.json records
`captions: {"mode": "generate", "generated": N, "decoding": {...}}`, so that `index add` generates
captions for new items with the same decoding.

The collection is read with `read_records(keep_uncaptioned=True)`, which keeps the items without a caption
that training would skip (any source: image folders, JSONL, CSV/TSV, shards).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from xmodal.errors import UserError

MODES = ("keep", "generate")
FLAG = "--captions generate"


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
