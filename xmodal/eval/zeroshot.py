"""Zero-shot classification over `label`: class embeddings from prompt templates (CLIP-style prompt
ensembling), top-1/top-5 accuracy, mean per-class recall, confusion matrix (for the report)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xmodal.errors import UserError
from xmodal.eval.core import DEFAULT_TEMPLATES_FILE, EvalContext, fill_template, read_templates
from xmodal.eval.metrics import mean_per_class_recall, topk_accuracy


def default_templates() -> list[str]:
    return read_templates(DEFAULT_TEMPLATES_FILE)


def class_embeddings(cache: Any, classes: list[str], templates: list[str]) -> torch.Tensor:
    """C×D: mean of the normalised template embeddings of each class, re-normalised."""
    texts = [fill_template(t, c) for c in classes for t in templates]
    e = cache.texts(texts).view(len(classes), len(templates), -1)
    w = e.mean(1)
    return w / w.norm(dim=-1, keepdim=True)


def unavailable(ctx: EvalContext) -> str | None:
    classes = {lab for lab in ctx.labels if lab is not None}
    if not classes:
        return 'the data has no labels (add a "label" to the manifest records)'
    if len(classes) < 2:
        return f"zero-shot needs at least 2 classes, the data has 1 ({next(iter(classes))!r})"
    return None


def run(ctx: EvalContext) -> dict[str, Any]:
    o = ctx.options
    if (why := unavailable(ctx)) is not None:
        raise UserError(f"--task zeroshot: {why}")
    templates = o.templates or default_templates()
    labels = ctx.labels
    classes = sorted({str(lab) for lab in labels if lab is not None})
    cid = {c: j for j, c in enumerate(classes)}
    idx = [i for i, lab in enumerate(labels) if lab is not None]
    target = torch.tensor([cid[str(labels[i])] for i in idx], dtype=torch.long)
    w = class_embeddings(ctx.cache, classes, templates)
    logits = ctx.cache.images[idx] @ w.T
    ks = (1, 5) if len(classes) >= 5 else (1,)  # CLIP_benchmark: top-5 undefined under 5 classes
    acc = topk_accuracy(logits, target, ks, o.ties)
    pred = logits.argmax(1).numpy()
    tgt = target.numpy()
    conf = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(conf, (tgt, pred), 1)
    ctx.artifacts["confusion"] = (conf, classes)
    return {
        "top1": acc[1],
        "top5": acc.get(5),  # null when there are fewer than 5 classes
        "mean_per_class_recall": mean_per_class_recall(pred, tgt),
        "n_classes": len(classes),
        "n_images": len(idx),
        "n_templates": len(templates),
    }
