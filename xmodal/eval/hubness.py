"""Hubness: skewness of the k-occurrence distribution N_k and the share of anti-hubs (N_k = 0).

t2i: queries = distinct captions, gallery = images; i2t: queries = images, gallery = distinct captions
(identical caption strings are one point, so duplicates do not split or fake anti-hubs).
"""

from __future__ import annotations

from typing import Any

from xmodal.eval.core import EvalContext
from xmodal.eval.metrics import hubness_stats, k_occurrence


def unavailable(ctx: EvalContext) -> str | None:
    if ctx.cache.n_images < 2 or ctx.cache.n_texts < 2:
        return "hubness needs at least 2 images and 2 captions"
    return None


def run(ctx: EvalContext) -> dict[str, Any]:
    c, o = ctx.cache, ctx.options
    k = int(o.hubness_k)
    txt = c.texts(c.unique_captions)
    s = txt @ c.images.T  # U×N
    ties = o.ties if o.ties == "topk" else "index"
    ctx.artifacts["nk"] = {"t2i": k_occurrence(s, k, ties), "i2t": k_occurrence(s.T, k, ties), "k": k}
    return {
        "k": k,
        "t2i": {**hubness_stats(s, k, ties), "n_gallery": c.n_images},
        "i2t": {**hubness_stats(s.T, k, ties), "n_gallery": len(c.unique_captions)},
    }
