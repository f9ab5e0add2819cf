"""Contrastive objectives: CLIP's InfoNCE and SigLIP's pairwise sigmoid loss.

Both are exact under data parallelism: each rank scores its own rows against the features of the
whole global batch, gathered *with* gradients, and returns the mean over its rows. Averaging the
gradients over ranks (as the trainer does) then gives exactly the gradient of the single-process
loss on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order; gradients flow back to every rank's slice
    (the backward of an all-gather is a reduce-scatter of the gradients)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE. Local rows (b) against all columns (B); row i's positive is column offset+i.

    With no `all_*` given, this is the ordinary single-batch CLIP loss.
    """
    all_img = image_features if all_image_features is None else all_image_features
    all_txt = text_features if all_text_features is None else all_text_features
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    logits_i2t = logit_scale * image_features @ all_txt.T
    logits_t2i = logit_scale * text_features @ all_img.T
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


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


def contrastive_loss(
    kind: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The trainer's entry point: gathers features across ranks (with gradients) and applies `kind`."""
    image_features = image_features.float()
    text_features = text_features.float()
    offset = _rank() * image_features.shape[0]
    all_txt = gather_with_grad(text_features)
    if kind == "clip":
        all_img = gather_with_grad(image_features)
        return clip_loss(image_features, text_features, logit_scale, all_img, all_txt, offset)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("siglip needs a model with logit_bias (init_logit_bias in the model config)")
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, all_txt, offset)
    raise ValueError(f"unknown objective {kind!r}")
