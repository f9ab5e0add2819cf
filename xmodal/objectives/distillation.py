"""Distillation from a frozen teacher (registered as `affinity`, `feature`), as `xmodal distill` trains.

`affinity` — TinyCLIP's affinity mimicking (Wu et al., ICCV 2023). The student's in-batch image→text and
text→image similarity distributions are pulled towards the teacher's:

    A_s = softmax_j(t_s · <x_i, y_j>),  A_t = softmax_j(t_t · <u_i, v_j>)   (rows: image i, columns: text j)
    affinity = ½ [ KL(A_t^i2t ‖ A_s^i2t) + KL(A_t^t2i ‖ A_s^t2i) ], each a mean over rows

x, y are the student's features, u, v the teacher's (L2-normalised, each in its own space). As in TinyCLIP's
code (`ClipSoftLoss`), t_s is the student's learned logit scale and t_t the teacher's own; `t=τ` instead
divides both similarity matrices by τ. TinyCLIP writes the soft cross-entropy −Σ A_t log A_s; we report the
KL divergence, which differs by the teacher's entropy (a constant), so the gradients are the same and the
term is 0 when the student mimics the teacher exactly.

`feature` — feature distillation (CLIP-KD, Yang et al., CVPR 2024): each student embedding, mapped into
the teacher's space by a learned linear projection P when the dimensions differ (the model's
`feature_proj`, trained with it and dropped on export), regresses the teacher's embedding of the same item:

    dist=l2:  ‖P(x_i) − u_i‖²   dist=cos:  1 − cos(P(x_i), u_i)      feature = ½ (image mean + text mean)

Both are exact under data parallelism: each rank scores its own rows against the gathered global batch
(affinity) or only its own rows (feature) and returns a mean over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.registry import Features, Objective, register


def require_teacher(f: Features, name: str, whose: str = "the teacher's") -> None:
    """The check every objective on a frozen model's features makes (distillation here, and the continual
    objectives, whose teacher is the previous model: `whose="the old model's"`)."""
    if f.teacher_image is None or f.teacher_text is None:
        raise ValueError(f"{name} needs {whose} features (teacher_image, teacher_text)")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student))."""
    log_p_t = F.log_softmax(teacher_logits, 1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(student_logits, 1))).sum(1).mean()


@dataclass
class AffinityParams:
    t: float = 0.0  # temperature τ for both models; 0 = TinyCLIP's: the student's learned, the teacher's own


@register
class Affinity(Objective):
    name = "affinity"
    description = (
        "TinyCLIP affinity mimicking: KL between the teacher's and the student's in-batch image→text and "
        "text→image similarity distributions (needs a teacher: xmodal distill)"
    )
    paper = "Wu et al. 2023, TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance (ICCV)"
    Params = AffinityParams
    needs = frozenset({"pooled", "teacher"})

    def __init__(self, params: AffinityParams | None = None) -> None:
        super().__init__(params)
        if self.params.t < 0:
            raise UserError(
                f"--objective affinity: t={self.params.t}; give a temperature > 0, or 0 for the models' own"
            )

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        require_teacher(f, "affinity")
        if self.params.t > 0:
            s_scale = t_scale = 1.0 / self.params.t
        else:
            if f.teacher_logit_scale is None:
                raise ValueError("affinity with t=0 needs the teacher's logit scale")
            s_scale, t_scale = f.logit_scale, f.teacher_logit_scale
        i2t = soft_kl(s_scale * f.image @ f.all_text.T, t_scale * f.teacher_image @ f.all_teacher_text.T)
        t2i = soft_kl(s_scale * f.text @ f.all_image.T, t_scale * f.teacher_text @ f.all_teacher_image.T)
        return {"affinity": (i2t + t2i) / 2}


DISTANCES = ("l2", "cos")


@dataclass
class FeatureParams:
    dist: str = "l2"  # l2: squared distance ‖P(x) − u‖² | cos: 1 − cos(P(x), u)


@register
class Feature(Objective):
    name = "feature"
    description = (
        "feature distillation: each student embedding regresses the teacher's (l2 or cos), through a learned "
        "projection when the dimensions differ (needs a teacher: xmodal distill)"
    )
    paper = "Yang et al. 2024, CLIP-KD: An Empirical Study of CLIP Model Distillation (CVPR)"
    Params = FeatureParams
    needs = frozenset({"pooled", "teacher"})

    def __init__(self, params: FeatureParams | None = None) -> None:
        super().__init__(params)
        if self.params.dist not in DISTANCES:
            raise UserError(
                f"--objective feature: dist must be one of {', '.join(DISTANCES)}, not {self.params.dist!r}"
            )

    def _distance(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.params.dist == "cos":
            return (1 - F.cosine_similarity(x, u, dim=1)).mean()
        return (x - u).pow(2).sum(1).mean()

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        require_teacher(f, "feature")
        proj = f.feature_proj
        img, txt = (
            (f.image, f.text)
            if proj is None
            else (proj(f.image).to(f.image.dtype), proj(f.text).to(f.text.dtype))
        )
        if img.shape[1] != f.teacher_image.shape[1]:
            raise ValueError(
                f"feature: student dimension {img.shape[1]} ≠ teacher's {f.teacher_image.shape[1]} and no "
                "projection"
            )
        return {"feature": (self._distance(img, f.teacher_image) + self._distance(txt, f.teacher_text)) / 2}
