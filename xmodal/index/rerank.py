"""ITM re-ranking (`xmodal search --rerank N`, `xmodal serve --rerank N`): the top N candidates of a query
are re-scored by the model's fusion encoder (ALBEF-style image–text matching head) and put in the order of
its match log-odds.

Text → images: the query's text states are computed once, the N candidates' images are decoded from their
stored paths (`meta.parquet` → `path`, with `xmodal.data.load_image` and `resize_center_crop`, as the
index build did), their patch states computed in one batch, and the N aligned (query, image) pairs go
through the fusion encoder in one batched pass. Image → captions: the query image's states once, the N
candidate captions' text states in one batch, N fusion passes. Image → images has no text side, so it
cannot be ITM re-ranked. Nothing is cached per query; the model and its `PairScorer` are loaded once.

A candidate whose image cannot be read (file missing, unreadable, corrupt, no stored path) is skipped with
one warning line: it is not re-scored and keeps its retrieval order after the re-scored ones.

Result dicts keep `score` (the retrieval score: cosine, or the hubness-corrected log score) and gain
`itm` (match log-odds; None where not re-scored) and `retrieval_rank` (the rank before re-ranking); `rank`
is the new order. With k > N, ranks N+1…k are the plain results N+1…k, in their order, with `itm` None.

This module imports torch (through `xmodal.models.fusion`); `xmodal.index.search` imports it lazily.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from xmodal.errors import UserError

MAX_PIXELS = 64_000_000  # as `xmodal index build` decodes (xmodal.index.embed.MAX_PIXELS)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def check_fusion(encoder: Any, flag: str = "--rerank") -> None:
    """A one-line UserError naming `flag` unless the encoder's model has a fusion (ITM) head."""
    from xmodal.models.fusion import has_fusion

    if not has_fusion(encoder.model):
        raise UserError(
            f"{flag}: the model {getattr(encoder, 'name', '')} has no fusion (ITM) head to re-rank with; "
            f"train it with --objective clip+itm and rebuild the index (or pass --model RUN), or drop {flag}"
        )


def scorer_of(idx: Any) -> Any:
    """The index's `PairScorer`, built once per encoder (a new one after `idx.encoder = ...`)."""
    from xmodal.models.fusion import PairScorer

    enc = idx.encoder
    sc = getattr(idx, "_pair_scorer", None)
    if sc is None or sc.encoder is not enc:
        sc = PairScorer(enc)
        idx._pair_scorer = sc
    return sc


def _load_one(path: str | None, size: int) -> tuple[torch.Tensor | None, str]:
    """A stored image path → (uint8 3×size×size, "") or (None, why)."""
    from xmodal.data import load_image, resize_center_crop
    from xmodal.data.records import DataStats

    if not path:
        return None, "the index stores no image path for it"
    stats = DataStats()
    img = load_image(path, stats, MAX_PIXELS)
    if img is None:
        return None, f"{path}: {', '.join(stats.as_dict()) or 'unreadable'}"
    try:
        return resize_center_crop(img, size), ""
    except Exception:  # noqa: BLE001 - an image PIL opened but cannot resize counts as corrupt
        return None, f"{path}: corrupt_image"


def load_candidate_images(
    paths: Sequence[str | None], size: int
) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode the candidates' images (a few threads: PIL releases the GIL while decoding)."""
    if not paths:
        return [], []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1, len(paths))) as pool:
        out = list(pool.map(lambda p: _load_one(p, size), paths))
    return [t for t, _ in out], [w for _, w in out]


def _reorder(hits: list[dict[str, Any]], itm: list[float | None], depth: int, k: int) -> list[dict[str, Any]]:
    """Re-scored candidates by ITM (ties: retrieval order), then skipped ones, then the tail; top k."""
    head = [dict(h, itm=s, retrieval_rank=h["rank"]) for h, s in zip(hits[:depth], itm, strict=True)]
    scored = sorted((h for h in head if h["itm"] is not None), key=lambda h: -h["itm"])  # stable
    rest = [h for h in head if h["itm"] is None]
    tail = [dict(h, itm=None, retrieval_rank=h["rank"]) for h in hits[depth:]]
    out = (scored + rest + tail)[:k]
    for rank, h in enumerate(out, start=1):
        h["rank"] = rank
    return out


def _report(
    hits: list[dict[str, Any]], depth: int, skipped: list[tuple[str, str]], log: Callable[[str], None]
) -> dict[str, Any]:
    if skipped:
        first = "; ".join(f"{i} ({why})" for i, why in skipped[:3]) + (" …" if len(skipped) > 3 else "")
        log(
            f"--rerank: {len(skipped)} of {depth} candidate(s) could not be read and keep their retrieval "
            f"order after the re-ranked ones: {first}"
        )
    return {"depth": depth, "scored": depth - len(skipped), "skipped": [i for i, _ in skipped]}


def rerank_images(
    idx: Any,
    text: str,
    hits: list[dict[str, Any]],
    depth: int,
    k: int,
    log: Callable[[str], None] = _warn,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Text → images: re-score the first `depth` of `hits` (result dicts with `path`) against `text`."""
    check_fusion(idx.encoder)
    sc = scorer_of(idx)
    cands = hits[:depth]
    depth = len(cands)
    images, why = load_candidate_images([h.get("path") for h in cands], int(idx.encoder.image_size))
    ok = [i for i, t in enumerate(images) if t is not None]
    skipped = [(str(cands[i]["id"]), why[i]) for i, t in enumerate(images) if t is None]
    itm: list[float | None] = [None] * depth
    if ok:
        ts, ta = sc.text_states([text])
        n = len(ok)
        scores = sc.score(
            ts.expand(n, -1, -1), ta.expand(n, -1), sc.image_states(torch.stack([images[i] for i in ok]))
        )
        for i, s in zip(ok, scores.tolist(), strict=True):
            itm[i] = float(s)
    return _reorder(hits, itm, depth, k), _report(hits, depth, skipped, log)


def query_pixels(idx: Any, image: Any) -> torch.Tensor:
    """A query image (PIL, or uint8 3×S×S / 1×3×S×S tensor) → uint8 1×3×S×S at the model's size."""
    from xmodal.data import resize_center_crop

    if isinstance(image, torch.Tensor):
        return image if image.ndim == 4 else image[None]
    return resize_center_crop(image.convert("RGB"), int(idx.encoder.image_size))[None]


def rerank_captions(
    idx: Any,
    image: Any,
    hits: list[dict[str, Any]],
    depth: int,
    k: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Image → captions: re-score the first `depth` caption hits against the query image."""
    check_fusion(idx.encoder)
    sc = scorer_of(idx)
    cands = hits[:depth]
    depth = len(cands)
    itm: list[float | None] = [None] * depth
    if depth:
        ims = sc.image_states(query_pixels(idx, image))
        # each distinct caption is scored once, so repeated captions tie exactly (retrieval order breaks it)
        texts = [str(h.get("caption") or "") for h in cands]
        distinct = list(dict.fromkeys(texts))
        ts, ta = sc.text_states(distinct)
        by_text = dict(
            zip(distinct, sc.score(ts, ta, ims.expand(len(distinct), -1, -1)).tolist(), strict=True)
        )
        itm = [float(by_text[t]) for t in texts]
    return _reorder(hits, itm, depth, k), {"depth": depth, "scored": depth, "skipped": []}
