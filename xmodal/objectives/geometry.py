"""Wang & Isola's alignment and uniformity terms, added to a contrastive loss to shape the embedding
geometry (as "It's Not a Modality Gap" and "Understanding contrastive representation learning through
alignment and uniformity on the hypersphere" use them).

alignment: E_i ||x_i − y_i||^α over the pairs of the batch (α = 2).
uniformity: log E_{i<j} exp(−t ||u_i − u_j||²) over the distinct pairs of the global batch, for the image
and the text embeddings, averaged (t = 2): the authors' `torch.pdist(x).pow(2).mul(-t).exp().mean().log()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xmodal.objectives.registry import Features, Objective, register

PAPER = (
    "Wang & Isola 2020, Understanding Contrastive Representation Learning through Alignment and Uniformity"
)


@dataclass
class AlignmentParams:
    alpha: float = 2.0


@register
class Alignment(Objective):
    name = "alignment"
    description = "pulls each image and its caption together: mean ||x - y||^alpha over the pairs"
    paper = PAPER
    Params = AlignmentParams

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        # a mean over this rank's rows: the ranks' average is the global batch's mean
        return {"alignment": (f.image - f.text).norm(dim=1).pow(self.params.alpha).mean()}


@dataclass
class UniformityParams:
    t: float = 2.0


def uniformity(x: torch.Tensor, t: float) -> torch.Tensor:
    """log of the mean Gaussian potential exp(−t‖x_i − x_j‖²) over the distinct pairs i < j."""
    n2 = (x * x).sum(1)
    sq = (n2[:, None] + n2[None, :] - 2 * x @ x.T).clamp_min(0)  # ‖x_i − x_j‖², with a plain backward
    i, j = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    return torch.logsumexp(-t * sq[i, j], 0) - math.log(len(i))


@register
class Uniformity(Objective):
    name = "uniformity"
    description = "spreads each modality over the sphere: log mean exp(-t ||u - v||^2) over the global batch"
    paper = PAPER
    Params = UniformityParams

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        # the global batch's value, computed on every rank: its average over ranks is itself
        t = self.params.t
        return {"uniformity": (uniformity(f.all_image, t) + uniformity(f.all_text, t)) / 2}
