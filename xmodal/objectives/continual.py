"""Continual pre-training without forgetting and backward-compatible training (registered as `modx`,
`bct`): the frozen previous model is the teacher (`xmodal train --init-from OLD_RUN --objective
clip+modx`: the trainer's frozen copy of the initial weights, i.e. OLD_RUN's, also when resuming).

`modx` — Mod-X's off-diagonal information distillation (Ni et al., ICML 2023), as the authors' code
(`ModX_Training/continue_train_model.py`) computes it. With S = X Yᵀ the new model's cosine similarities
(image rows, text columns; no temperature) and S° = U Vᵀ the old model's:

    row i of S° is replaced by row i of S where the old model's row maximum is not on the diagonal
        ("cognition align": the old model got that pair wrong, so it teaches nothing there);
    modx = ½ [ Σ_i KL(softmax(S°_i) ‖ softmax(S_i))  +  the same for text rows, Sᵀ and S°ᵀ ]

The whole row takes part, its diagonal included (the authors' code keeps it, despite the name), and a
replaced row contributes exactly 0 with zero gradient (KL of a distribution to itself), so it is simply
left out here. The sum runs over the rows (the code's `reduction='sum'`), so the term grows with the
batch; the authors weigh it by α = `--alpha` (0.1–… in their scripts): give the weight in the objective
string (`clip+modx:0.1`). `t` divides both similarity matrices (1 = the authors' raw cosines).

Exact under data parallelism: each rank scores its own rows against the gathered global batch and
returns B/b times its rows' sum, whose average over the ranks is the one-process sum.

`bct` — BCT's influence loss (Shen et al., CVPR 2020) made cross-modal: see `BCT.terms`. Added to the new
model's own `clip` loss (`clip+bct`), it keeps the new embeddings scoreable against an index built with
the old model, the compatibility BCT states as M(new, old) > M(old, old).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.registry import Features, Objective, register


@dataclass
class ModXParams:
    t: float = 1.0  # temperature dividing both models' cosines (1: the authors' code)


def _aligned_kl(new: torch.Tensor, old: torch.Tensor, offset: int) -> torch.Tensor:
    """Σ over the rows the old model ranks correctly (its row maximum on the diagonal, column offset+i)
    of KL(softmax(old_i) ‖ softmax(new_i))."""
    keep = old.argmax(1) == torch.arange(len(old), device=old.device) + offset
    log_p_old = F.log_softmax(old, 1)
    kl = (log_p_old.exp() * (log_p_old - F.log_softmax(new, 1))).sum(1)
    return (kl * keep).sum()


@register
class ModX(Objective):
    name = "modx"
    description = (
        "Mod-X continual pre-training: KL between the frozen old model's and the new model's in-batch "
        "similarity rows, rows the old model gets wrong left out (train with --init-from OLD_RUN)"
    )
    paper = "Ni et al. 2023, Continual Vision-Language Representation Learning with Off-Diagonal Information"
    Params = ModXParams
    needs = frozenset({"pooled", "teacher"})

    def __init__(self, params: ModXParams | None = None) -> None:
        super().__init__(params)
        if self.params.t <= 0:
            raise UserError(f"--objective modx: t={self.params.t}; give a temperature > 0")

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        if f.teacher_image is None or f.teacher_text is None:
            raise ValueError("modx needs the old model's features (teacher_image, teacher_text)")
        t, o = self.params.t, f.offset
        i2t = _aligned_kl(f.image @ f.all_text.T / t, f.teacher_image @ f.all_teacher_text.T / t, o)
        t2i = _aligned_kl(f.text @ f.all_image.T / t, f.teacher_text @ f.all_teacher_image.T / t, o)
        scale = len(f.all_image) / len(f.image)  # this rank's share of the global row sum
        return {"modx": scale * (i2t + t2i) / 2}


@dataclass
class BCTParams:
    t: float = 0.0  # temperature; 0 = the old model's own logit scale (its "classifier", as BCT uses it)


@register
class BCT(Objective):
    name = "bct"
    description = (
        "BCT backward-compatible training, cross-modal: the new model's images are scored against the frozen "
        "old model's texts and back (its influence loss), so new queries work on an old gallery"
    )
    paper = "Shen et al. 2020, Towards Backward-Compatible Representation Learning (CVPR)"
    Params = BCTParams
    needs = frozenset({"pooled", "teacher"})

    def __init__(self, params: BCTParams | None = None) -> None:
        super().__init__(params)
        if self.params.t < 0:
            raise UserError(
                f"--objective bct: t={self.params.t}; give a temperature > 0, or 0 for the old model's"
            )

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        """BCT's influence loss L(w_new, w_old°): the old model's classifier applied to the new features.
        For image–text pairs the old "classifier" of an image is the old model's text embeddings of the
        batch (and back), so with s the old logit scale (or 1/t) and targets the pairs:
            bct = ½ [ CE(s · x_i · V°ᵀ, i) + CE(s · y_i · U°ᵀ, i) ]   (mean over this rank's rows)."""
        if f.teacher_image is None or f.teacher_text is None:
            raise ValueError("bct needs the old model's features (teacher_image, teacher_text)")
        if f.image.shape[1] != f.teacher_image.shape[1]:
            raise UserError(
                f"--objective bct: the new model's embeddings are {f.image.shape[1]}-d, the old model's "
                f"{f.teacher_image.shape[1]}-d; a compatible model needs the old width"
            )
        if self.params.t > 0:
            s = 1.0 / self.params.t
        elif f.teacher_logit_scale is None:
            raise ValueError("bct with t=0 needs the old model's logit scale")
        else:
            s = f.teacher_logit_scale
        target = torch.arange(len(f.image), device=f.image.device) + f.offset
        i2t = F.cross_entropy(s * f.image @ f.all_teacher_text.T, target)
        t2i = F.cross_entropy(s * f.text @ f.all_teacher_image.T, target)
        return {"bct": (i2t + t2i) / 2}
