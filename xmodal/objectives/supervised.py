"""Label-aware contrast: pairs that share a class label count as positives too.

multipos (UniCL / SupCon style): each row's target is uniform over its positives — its own pair and every
item of the global batch with the same label — and the loss is the cross-entropy to that target, in both
directions. With no labels it is exactly CLIP.

sdm (IRRA's similarity-distribution matching): KL(p ‖ q) between the softmax of the scaled similarities p
and the normalised label-match matrix q (ε = 1e-8 inside the log), image→text plus text→image, as the
authors' `compute_sdm`.

Unlabelled items (label id −1) are only positive with themselves. Both are means over this rank's rows
against the gathered global batch, so they are exact under data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.objectives.registry import Features, Objective, register


def positives(f: Features) -> torch.Tensor:
    """b×B float mask: row i's positives among the global batch (itself, and its label's other items)."""
    b, n = len(f.image), len(f.all_image)
    own = torch.zeros(b, n, device=f.image.device, dtype=f.image.dtype)
    own[torch.arange(b), torch.arange(b) + f.offset] = 1.0
    if f.labels is None:
        return own
    same = (f.labels[:, None] == f.all_labels[None, :]) & (f.labels[:, None] >= 0)
    return torch.maximum(own, same.to(own.dtype))


@register
class MultiPositive(Objective):
    name = "multipos"
    description = (
        "CLIP whose targets are uniform over every same-label item of the global batch (and the pair)"
    )
    paper = (
        "Yang et al. 2022, Unified Contrastive Learning in Image-Text-Label Space (UniCL); Khosla et al. 2020"
    )
    needs = frozenset({"pooled", "labels"})

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        pos = positives(f)
        target = pos / pos.sum(1, keepdim=True)
        i2t = -(target * F.log_softmax(f.logit_scale * f.image @ f.all_text.T, 1)).sum(1).mean()
        t2i = -(target * F.log_softmax(f.logit_scale * f.text @ f.all_image.T, 1)).sum(1).mean()
        return {"multipos": (i2t + t2i) / 2}


@dataclass
class SdmParams:
    epsilon: float = 1e-8


@register
class SimilarityDistributionMatching(Objective):
    name = "sdm"
    description = "KL divergence from the similarity softmax to the normalised label-match matrix, both ways"
    paper = (
        "Jiang & Ye 2023, Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image Person "
        "Retrieval (IRRA)"
    )
    Params = SdmParams
    needs = frozenset({"pooled", "labels"})

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        pos = positives(f)
        log_q = torch.log(pos / pos.sum(1, keepdim=True) + self.params.epsilon)
        total = 0.0
        for logits in (f.logit_scale * f.image @ f.all_text.T, f.logit_scale * f.text @ f.all_image.T):
            log_p = F.log_softmax(logits, 1)
            total = total + (log_p.exp() * (log_p - log_q)).sum(1).mean()
        return {"sdm": total}
