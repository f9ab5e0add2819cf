"""Mixup in the embedding space: mixed embeddings as hard negatives or as soft-target anchors (`mixup`).

kind=m2mix — geodesic multimodal mixup, m²-mix (Oh et al. 2023, NeurIPS, "Geodesic Multi-Modal Mixup for
Robust Fine-Tuning"), as the authors' `main.py` (github changdaeoh/multimodal-mixup, the `--mmmix` term):
one λ ~ Beta(α, α) per step; each pair's image and text embedding are mixed along their great circle,

    m_j = x_j · sin(λθ_j)/sin θ_j + y_j · sin((1−λ)θ_j)/sin θ_j,   θ_j = arccos <x_j, y_j>

(the authors' `sph_inter(image, text, λ)`), and the mixed embeddings *replace* the negatives of the
contrastive matrix while the positives stay the true pairs:

    i2t logits  l_ij = s·<x_i, m_j> (j ≠ i),  l_ii = s·<x_i, y_i>
    t2i logits  l_ij = s·<y_i, m_j> (j ≠ i),  l_ii = s·<y_i, x_i>
    m2mix = CE_i2t + CE_t2i     (a sum, as the authors' `clip_loss2`)

Use it next to `clip`, e.g. `clip+mixup:0.01` (the authors sweep the weight over 0.001–0.05). θ is taken of
<x, y> clamped to ±(1 − 1e-6), so identical embeddings give no 0/0.

kind=m3col — M3CoL's mixup-based contrastive loss (Kumar et al. 2024, "Harnessing Shared Relations via
Multimodal Mixup Contrastive Learning for Multimodal Classification", arXiv 2409.17777), as the authors'
`mixco_nce` (github RaghavSinghal10/M3CoL, model/utils.py, from MindEye's BiMixCo): for the mixed modality,
each row g is chosen with probability p; chosen rows draw β_g ~ Beta(α, α), the others β_g = 1; π is a
random permutation of the batch;

    x̃_g = normalise(β_g x_g + (1 − β_g) x_π(g)),   P_gg += β_g,  P_g,π(g) += 1 − β_g
    L_x = ½[ −mean_g Σ_j P_gj log softmax_j(s·<x̃_g, y_j>)  −  mean_j Σ_g P_gj log softmax_g(s·<y_j, x̃_g>) ]

and m3col = L_image + L_text (mix=both; the text side is mixed with its own π, β) or one of them.
The authors mix the encoders' unnormalised CLS embeddings; the objective sees only the L2-normalised pooled
features, so those are mixed here (then renormalised, as `mixco_nce` does). The second sum uses the column
P[:, j] as it is, unnormalised, as the authors do. One deviation: the authors write P_g,π(g) = 1 − β_g over
P_gg = β_g, so a row whose π(g) = g (mixed with itself) gets target 1 − β_g; here the two parts are added,
giving that row target 1.

s is the model's learned logit scale, or 1/tau when tau > 0 (the authors use fixed temperatures: m²-mix's
script 0.07 with --sep_scale, M3CoL's `mixco_nce` 0.1). alpha = 0 means each paper's default: 0.5 for m2mix
(the authors' script, --beta2 0.5) and 0.15 for m3col (--mixup_beta). Not reproduced: m²-mix's 1/(epoch+1)
decay of the term and M3CoL's switch to SoftCLIP after a third of training — schedule the weight instead.

Randomness is a function of (seed, `f.step`) only, drawn for the whole global batch (B rows) and indexed by
global row, so it is identical on every rank, across resumes, and under GradCache recomputation, and each
rank's mean over its own rows averages exactly to the one-process value. NumPy's Generator draws it: torch's
Beta sampler takes no generator, and reseeding torch's global one would race with the trainer's prefetch
thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.registry import Features, Objective, register

KINDS = ("m2mix", "m3col")
MIX = ("both", "image", "text")
DEFAULT_ALPHA = {"m2mix": 0.5, "m3col": 0.15}


@dataclass
class MixupParams:
    kind: str = "m2mix"  # m2mix (geodesic image–text mix as hard negatives) | m3col (mixed-sample contrast)
    alpha: float = 0.0  # λ ~ Beta(alpha, alpha); 0 = the paper's default (m2mix 0.5, m3col 0.15)
    tau: float = 0.0  # temperature of this term; 0 = the model's learned logit scale
    mix: str = "both"  # m3col: which modality is mixed (both | image | text)
    p: float = 0.5  # m3col: probability that a row is mixed at all (the authors' s_thresh)
    seed: int = 0  # with the step, seeds the draws


def slerp(a: torch.Tensor, b: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """The authors' sph_inter: a·sin(λθ)/sin θ + b·sin((1−λ)θ)/sin θ, θ = arccos<a, b>, row by row."""
    cos = (a * b).sum(1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6)
    theta = torch.acos(cos)
    return (torch.sin(lam * theta) * a + torch.sin((1 - lam) * theta) * b) / torch.sin(theta)


def _rng(seed: int, step: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, salt])


@register
class Mixup(Objective):
    name = "mixup"
    description = (
        "embedding mixup: m2mix puts geodesic image-text mixes in as hard negatives; m3col contrasts "
        "mixed samples of one modality against the other with soft targets lambda / 1-lambda"
    )
    paper = (
        "Oh et al. 2023, Geodesic Multi-Modal Mixup for Robust Fine-Tuning (NeurIPS); Kumar et al. 2024, "
        "Harnessing Shared Relations via Multimodal Mixup Contrastive Learning for Multimodal Classification"
    )
    Params = MixupParams

    def __init__(self, params: MixupParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        if p.kind not in KINDS:
            raise UserError(f"--objective mixup: kind must be one of {', '.join(KINDS)}, not {p.kind!r}")
        if p.mix not in MIX:
            raise UserError(f"--objective mixup: mix must be one of {', '.join(MIX)}, not {p.mix!r}")
        if not p.alpha >= 0:
            raise UserError(f"--objective mixup: alpha must be > 0 (or 0 for the paper's), not {p.alpha}")
        if not p.tau >= 0:
            raise UserError(f"--objective mixup: tau must be > 0 (or 0 for the learned scale), not {p.tau}")
        if not 0 <= p.p <= 1:
            raise UserError(f"--objective mixup: p must be in [0, 1], not {p.p}")
        if p.seed < 0:
            raise UserError(f"--objective mixup: seed must be >= 0, not {p.seed}")

    @property
    def alpha(self) -> float:
        return self.params.alpha or DEFAULT_ALPHA[self.params.kind]

    def _scale(self, f: Features) -> torch.Tensor | float:
        return 1.0 / self.params.tau if self.params.tau > 0 else f.logit_scale

    def m2mix_lambda(self, step: int) -> float:
        return float(_rng(self.params.seed, step, 0).beta(self.alpha, self.alpha))

    def m3col_draws(self, n: int, step: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(π, β) for the n rows of the global batch: β_g = 1 where row g is not mixed."""
        g = _rng(self.params.seed, step, salt)
        perm = g.permutation(n)
        beta = g.beta(self.alpha, self.alpha, size=n)
        chosen = g.random(n) < self.params.p
        return torch.from_numpy(perm), torch.from_numpy(np.where(chosen, beta, 1.0))

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        if self.params.kind == "m2mix":
            return {"mixup": self._m2mix(f)}
        total = f.image.new_zeros(())
        if self.params.mix in ("both", "image"):
            total = total + self._m3col(f.image, f.all_image, f.text, f.all_text, f, salt=1)
        if self.params.mix in ("both", "text"):
            total = total + self._m3col(f.text, f.all_text, f.image, f.all_image, f, salt=2)
        return {"mixup": total}

    def _m2mix(self, f: Features) -> torch.Tensor:
        s, b = self._scale(f), len(f.image)
        lam = self.m2mix_lambda(f.step)
        mixed = slerp(f.all_image, f.all_text, lam)  # B×D, one per pair of the global batch
        rows = torch.arange(b, device=f.image.device)
        labels = rows + f.offset
        positive = (f.image * f.text).sum(1)
        loss = 0.0
        for anchor in (f.image, f.text):
            logits = anchor @ mixed.T
            logits = logits.index_put((rows, labels), positive)  # the true pair stays the positive
            loss = loss + F.cross_entropy(s * logits, labels)
        return loss

    def _m3col(
        self,
        x: torch.Tensor,
        all_x: torch.Tensor,
        y: torch.Tensor,
        all_y: torch.Tensor,
        f: Features,
        salt: int,
    ) -> torch.Tensor:
        """Mix modality x (rows π-permuted, weights β) and contrast it against y both ways."""
        s, b, n = self._scale(f), len(x), len(all_x)
        perm, beta = self.m3col_draws(n, f.step, salt)
        perm, beta = perm.to(x.device), beta.to(device=x.device, dtype=x.dtype)
        target = torch.zeros(n, n, device=x.device, dtype=x.dtype)
        every = torch.arange(n, device=x.device)
        target[every, every] += beta
        target[every, perm] += 1 - beta  # adds onto the diagonal where π(g) = g
        own = slice(f.offset, f.offset + b)
        mixed_all = F.normalize(beta[:, None] * all_x + (1 - beta[:, None]) * all_x[perm], dim=1)
        mixed_own = F.normalize(beta[own, None] * x + (1 - beta[own, None]) * all_x[perm[own]], dim=1)
        forward = -(target[own] * F.log_softmax(s * mixed_own @ all_y.T, 1)).sum(1).mean()
        backward = -(target[:, own].T * F.log_softmax(s * y @ mixed_all.T, 1)).sum(1).mean()
        return (forward + backward) / 2
