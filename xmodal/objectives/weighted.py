"""CWCL: contrastive targets weighted continuously by intra-modal similarity (registered as `cwcl`).

Srinivasa et al. 2023 (NeurIPS), "CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive Loss".
Plain CLIP treats every non-matching pair of the batch as equally negative. CWCL instead lets column j
count as a partial positive of row i in proportion to how similar items i and j are *within* one modality,
measured by a model whose similarities are trusted (in the paper: the frozen, pre-trained tower of a
locked-image / LiT-style transfer):

    i2t:  L = −(1/b) Σ_i Σ_j  w_ij / (Σ_k w_ik) · log softmax_j(t · <x_i, y_j>),   w_ij = (1 + <u_i, u_j>) / 2
    t2i:  the same with rows y_i, columns x_j and w_ij = (1 + <v_i, v_j>) / 2
    cwcl = (i2t + t2i) / 2

x, y are the trained image/text features, t the learned logit scale, and u, v the image/text features the
weights come from: `targets=self` uses the model's own features, detached (no gradient flows through the
targets); `targets=teacher` uses the frozen teacher's (`f.teacher_image`, `f.teacher_text`, which the
trainer fills when `needs` contains "teacher" — so with targets=teacher this objective's instance `needs`
adds "teacher"; the class-level `needs` that `xmodal objectives` lists is the default's, {"pooled"}).
w_ij = <u_i, u_j>/2 + 0.5 maps cosine similarity [−1, 1] onto [0, 1] with w_ii = 1 (the mapping that the
CellCLIP paper, 2025, quotes when it adopts CWCL: "w_ij = <·,·>/2 + 0.5, ensuring w_ij ∈ [0, 1]").

`directions` picks which directions use the continuous weights; the others are ordinary one-hot InfoNCE.
The paper trains with one frozen modality, whose similarities are the meaningful ones: with a frozen image
tower (LiT-style) that is `directions=i2t` (CellCLIP likewise uses CWCL profile→text and CLIP text→profile).

Deviations: the directional losses are averaged (as `clip` does here) where CellCLIP writes their sum, so
the objective is on CLIP's scale and equals `clip` when every weight row is one-hot — only the weight you give
it differs by the factor 2. The paper's body text was not retrievable through this project's search (only
abstracts and the CellCLIP re-implementation), so the formula follows the abstract's description, the
CellCLIP text and the task brief. Each rank scores its own rows against the gathered global batch and returns
the mean over its rows, so the average over ranks is exactly the one-process loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.registry import Features, Objective, register

TARGETS = ("self", "teacher")
DIRECTIONS = ("both", "i2t", "t2i")


@dataclass
class CwclParams:
    targets: str = "self"  # whose intra-modal similarities weight the targets: self (detached) | teacher
    directions: str = "both"  # which directions use the continuous weights: both | i2t | t2i


def continuous_targets(u: torch.Tensor, all_u: torch.Tensor) -> torch.Tensor:
    """b×B row-normalised weights w_ij / Σ_k w_ik with w_ij = (1 + <u_i, u_j>) / 2 (no gradient)."""
    w = (1 + u.detach() @ all_u.detach().T) / 2
    return w / w.sum(1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ_j target_ij log softmax_j(logits_i)."""
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


@register
class Cwcl(Objective):
    name = "cwcl"
    description = (
        "InfoNCE whose targets are continuous, from intra-modal similarity (1+cos)/2 of the model's "
        "detached features or (targets=teacher, adds the teacher need) a frozen teacher's"
    )
    paper = (
        "Srinivasa et al. 2023, CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive Loss "
        "(NeurIPS)"
    )
    Params = CwclParams

    def __init__(self, params: CwclParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        if p.targets not in TARGETS:
            raise UserError(
                f"--objective cwcl: targets must be one of {', '.join(TARGETS)}, not {p.targets!r}"
            )
        if p.directions not in DIRECTIONS:
            raise UserError(
                f"--objective cwcl: directions must be one of {', '.join(DIRECTIONS)}, not {p.directions!r}"
            )
        # the trainer reads `needs` on the instance: the teacher's features are asked for only when used
        self.needs = frozenset({"pooled", "teacher"} if p.targets == "teacher" else {"pooled"})

    def _sources(self, f: Features) -> tuple[torch.Tensor, ...]:
        """(image-side u, global U, text-side v, global V) that the weights come from."""
        if self.params.targets == "self":
            return f.image, f.all_image, f.text, f.all_text
        sources = (f.teacher_image, f.all_teacher_image, f.teacher_text, f.all_teacher_text)
        if any(x is None for x in sources):
            raise ValueError(
                "cwcl(targets=teacher) needs the teacher's features (teacher_image, teacher_text)"
            )
        return sources  # type: ignore[return-value]

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        u, all_u, v, all_v = self._sources(f)
        b = len(f.image)
        onehot = torch.zeros(b, len(f.all_image), device=f.image.device, dtype=f.image.dtype)
        onehot[torch.arange(b), torch.arange(b) + f.offset] = 1.0
        d = self.params.directions
        target_i2t = continuous_targets(u, all_u).to(onehot.dtype) if d in ("both", "i2t") else onehot
        target_t2i = continuous_targets(v, all_v).to(onehot.dtype) if d in ("both", "t2i") else onehot
        i2t = soft_cross_entropy(f.logit_scale * f.image @ f.all_text.T, target_i2t)
        t2i = soft_cross_entropy(f.logit_scale * f.text @ f.all_image.T, target_t2i)
        return {"cwcl": (i2t + t2i) / 2}
