"""Text→image and image→text retrieval: R@1/5/10, RSUM, median rank, MRR, mAP@K.

Several captions per image are handled as CLIP_benchmark does: every caption is one text query whose
positive is its own image; an image query is correct at K when ANY of its captions is in the top K.
`positives="caption"|"label"` widens the positive set (identical caption text / same label).
"""

from __future__ import annotations

from typing import Any

import torch

from xmodal.errors import UserError
from xmodal.eval.core import EvalContext
from xmodal.eval.metrics import retrieval_metrics


def label_ids(labels: list[str | None]) -> torch.Tensor:
    """Integer id per item; items without a label get a unique negative id (they only match themselves)."""
    table: dict[str, int] = {}
    out = []
    for i, lab in enumerate(labels):
        out.append(-1 - i if lab is None else table.setdefault(str(lab), len(table)))
    return torch.tensor(out, dtype=torch.long)


def build_positives(
    captions: list[str],
    caption_image: torch.Tensor,
    n_images: int,
    labels: list[str | None] | None = None,
    mode: str | None = None,
) -> torch.Tensor:
    """T×N bool: caption t (query) is a positive of image i (gallery). i2t uses the transpose."""
    T = len(captions)
    pos = torch.zeros(T, n_images, dtype=torch.bool)
    pos[torch.arange(T), caption_image] = True
    if mode == "caption":
        uid: dict[str, int] = {}
        cid = torch.tensor([uid.setdefault(c, len(uid)) for c in captions], dtype=torch.long)
        owns = torch.zeros(len(uid), n_images, dtype=torch.bool)  # unique caption u belongs to image i
        owns[cid, caption_image] = True
        pos |= owns[cid]
    elif mode == "label":
        if labels is None or all(lab is None for lab in labels):
            raise UserError('--positives label: the data has no labels (add a "label" to the manifest)')
        li = label_ids(labels)
        pos |= li[caption_image][:, None] == li[None, :]
    elif mode is not None:
        raise UserError(f"--positives {mode}: choose caption or label")
    return pos


def positives_for(ctx: EvalContext) -> torch.Tensor:
    key = ("positives", ctx.options.positives)
    if key not in ctx.artifacts:
        c = ctx.cache
        ctx.artifacts[key] = build_positives(
            c.captions, c.caption_image, c.n_images, ctx.labels, ctx.options.positives
        )
    return ctx.artifacts[key]


def unavailable(ctx: EvalContext) -> str | None:
    if ctx.cache.n_images == 0 or ctx.cache.n_texts == 0:
        return "no image-caption pairs in the data"
    return None


def run(ctx: EvalContext) -> dict[str, Any]:
    o, c = ctx.options, ctx.cache
    pos = positives_for(ctx)
    s = c.scores_t2i
    t2i = retrieval_metrics(s, pos, o.ks, o.map_k, o.ties)
    has = pos.any(0)  # images without any caption are no i2t query (they have no positive)
    i2t = retrieval_metrics(s.T[has], pos.T[has], o.ks, o.map_k, o.ties)
    out = {
        "t2i": t2i,
        "i2t": i2t,
        "RSUM": _rsum(t2i, i2t),
        "positives": o.positives or "pair",
        "ties": o.ties,
        "n_queries": {"t2i": c.n_texts, "i2t": int(has.sum())},
    }
    if o.hubness_norm not in (None, "none"):
        out["corrected"] = corrected_retrieval(ctx, pos, has)
    if o.rerank is not None:
        from xmodal.eval.rerank import rerank_retrieval

        out["rerank"] = rerank_retrieval(ctx, pos, has)
    return out


def _rsum(t2i: dict[str, float], i2t: dict[str, float]) -> float:
    return float(sum(d[f"R@{k}"] for d in (t2i, i2t) for k in (1, 5, 10) if f"R@{k}" in d))


def corrected_retrieval(ctx: EvalContext, pos: torch.Tensor, has: torch.Tensor) -> dict[str, Any]:
    """The same metrics on hubness-corrected scores (QB-Norm, DBNorm, InvGC… from xmodal.index.hubness),
    each direction normalised against banks in its own query and gallery modalities."""
    from xmodal.data import load_dataset
    from xmodal.index.hubness import corrected_similarities

    o, c, enc = ctx.options, ctx.cache, ctx.encoder
    bank = load_dataset(o.hubness_bank, enc.image_size, progress=False)
    ctx.log(f"hubness bank: {len(bank)} images from {o.hubness_bank}")
    bank_img = enc.encode_images(bank.images).numpy()
    bank_txt = enc.encode_texts(list(dict.fromkeys(t for caps in bank.captions for t in caps))).numpy()
    txt, img = c.caption_embs.numpy(), c.images.numpy()
    kw = {"beta": o.hubness_beta, "beta_g": o.hubness_beta}
    s_t2i = corrected_similarities(txt, img, o.hubness_norm, query_bank=bank_txt, gallery_bank=bank_img, **kw)
    s_i2t = corrected_similarities(img, txt, o.hubness_norm, query_bank=bank_img, gallery_bank=bank_txt, **kw)
    t2i = retrieval_metrics(torch.from_numpy(s_t2i), pos, o.ks, o.map_k, o.ties)
    i2t = retrieval_metrics(torch.from_numpy(s_i2t)[has], pos.T[has], o.ks, o.map_k, o.ties)
    return {
        "method": o.hubness_norm,
        "bank": str(o.hubness_bank),
        "beta": o.hubness_beta,
        "t2i": t2i,
        "i2t": i2t,
        "RSUM": _rsum(t2i, i2t),
    }
