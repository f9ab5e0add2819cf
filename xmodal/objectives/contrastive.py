"""Contrastive objectives: CLIP's InfoNCE and SigLIP's pairwise sigmoid loss (registered as `clip`, `siglip`).

Both are exact under data parallelism: each rank scores its own rows against the features of the
whole global batch, gathered *with* gradients, and returns the mean over its rows. Averaging the
gradients over ranks (as the trainer does) then gives exactly the gradient of the single-process
loss on the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.objectives.registry import Features, Objective, register


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE. Local rows (b) against all columns (B); row i's positive is column offset+i.

    With no `all_*` given, this is the ordinary single-batch CLIP loss. `label_smoothing` ε is torch's
    cross_entropy smoothing over the B columns of the global batch: each row's target is 1−ε on its
    positive plus ε/B on every column (the positive included).
    """
    all_img = image_features if all_image_features is None else all_image_features
    all_txt = text_features if all_text_features is None else all_text_features
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    logits_i2t = logit_scale * image_features @ all_txt.T
    logits_t2i = logit_scale * text_features @ all_img.T
    ls = label_smoothing
    return (
        F.cross_entropy(logits_i2t, labels, label_smoothing=ls)
        + F.cross_entropy(logits_t2i, labels, label_smoothing=ls)
    ) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SigLIP: −(1/b) Σ_i Σ_j log σ(z_ij (t·x_i·y_j + bias)), z_ij = +1 on the diagonal, −1 elsewhere.

    Each (image, text) pair of the global batch is counted exactly once: by the rank owning the image.
    """
    all_txt = text_features if all_text_features is None else all_text_features
    logits = logit_scale * image_features @ all_txt.T + logit_bias
    b = image_features.shape[0]
    signs = -torch.ones_like(logits)
    idx = torch.arange(b, device=logits.device)
    signs[idx, idx + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b


@dataclass
class ClipParams:
    # torch's cross_entropy label smoothing over the global batch's columns (CLIP🚀, Fini et al. 2023: 0.1)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing <= 1:
            raise ValueError(f"label_smoothing {self.label_smoothing} is not in [0, 1]")


@register
class Clip(Objective):
    name = "clip"
    description = "symmetric InfoNCE over the global batch (image→text and text→image cross-entropy)"
    paper = "Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision"
    Params = ClipParams

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        return {
            "clip": clip_loss(
                f.image,
                f.text,
                f.logit_scale,
                f.all_image,
                f.all_text,
                f.offset,
                label_smoothing=self.params.label_smoothing,
            )
        }


@register
class SigLIP(Objective):
    name = "siglip"
    description = "pairwise sigmoid loss over every (image, text) pair of the global batch, learned bias"
    paper = "Zhai et al. 2023, Sigmoid Loss for Language Image Pre-Training"
    model_init = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        if f.logit_bias is None:
            raise ValueError("siglip needs a model with logit_bias (init_logit_bias in the model config)")
        return {"siglip": siglip_loss(f.image, f.text, f.logit_scale, f.logit_bias, f.all_text, f.offset)}
