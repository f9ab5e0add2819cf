"""Modality gap and the geometry of the embedding space (Liang et al. 2022; Wang & Isola 2020)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xmodal.eval.core import EvalContext
from xmodal.eval.metrics import alignment, modality_gap, uniformity


def unavailable(ctx: EvalContext) -> str | None:
    if ctx.cache.n_images < 2 or ctx.cache.n_texts < 2:
        return "the modality gap needs at least 2 images and 2 captions"
    return None


def _subsample(x: torch.Tensor, n: int, gen: np.random.Generator) -> torch.Tensor:
    if len(x) <= n:
        return x
    return x[torch.from_numpy(np.sort(gen.choice(len(x), n, replace=False)))]


def linear_separability(img: np.ndarray, txt: np.ndarray, test_size: float, seed: int) -> float | None:
    """Held-out accuracy of logistic regression telling image from text embeddings (balanced classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    n = min(len(img), len(txt))
    if n < 5:
        return None
    gen = np.random.default_rng(seed)
    img = img[gen.choice(len(img), n, replace=False)]
    txt = txt[gen.choice(len(txt), n, replace=False)]
    x = np.concatenate([img, txt])
    y = np.r_[np.zeros(n), np.ones(n)]
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    clf = LogisticRegression(max_iter=1000).fit(xtr, ytr)
    return float(clf.score(xte, yte))


def run(ctx: EvalContext) -> dict[str, Any]:
    c, o = ctx.cache, ctx.options
    img, cap = c.images, c.caption_embs
    gen = np.random.default_rng(o.seed)
    img_s = _subsample(img, o.gap_max_items, gen)
    txt_s = _subsample(c.texts(c.unique_captions), o.gap_max_items, gen)
    ctx.artifacts["gap_points"] = (img_s.numpy(), txt_s.numpy())
    return {
        "gap": modality_gap(img, cap),
        "alignment": alignment(img[c.caption_image], cap),
        "uniformity_image": uniformity(img_s),
        "uniformity_text": uniformity(txt_s),
        "mean_cosine_positive": float((img[c.caption_image] * cap).sum(1).double().mean()),
        "linear_separability": linear_separability(img_s.numpy(), txt_s.numpy(), o.gap_test_size, o.seed),
    }
