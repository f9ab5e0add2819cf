"""Noise-robust contrast for mislabelled (shuffled, wrong) image–caption pairs (registered as `noisy`).

mode=weight — NEVLP-style noise-adaptive contrast (Tao et al. 2024, "NEVLP: Noise-Robust Framework for
Efficient Vision-Language Pre-training", arXiv 2409.09582, which takes it from NLIP, Huang et al. 2023):
estimate each pair's noise probability ε_i from the memorization effect — clean pairs are fitted first, so
mislabelled ones keep a high loss — and regularise the image–text contrast by ω_i = λ·ε_i. What the search
could retrieve of NEVLP/NLIP is that description, not the equation that places ω_i in the loss, so ε_i is
estimated as NCR does (Huang et al. 2021, "Learning with Noisy Correspondence for Cross-modal Matching"): a
two-component 1-D Gaussian mixture on the per-pair losses, min–max normalised to [0, 1], fitted by EM
(10 iterations, variance floor 5e-4, means started at 0 and 1 — sklearn's `reg_covar=5e-4, max_iter=10`
as NCR sets them, with a deterministic start in place of k-means), ε_i = the posterior of the higher-mean
component. ω_i then down-weights the pair's CLIP loss:

    ℓ_i = ½[(lse_j S_ij − S_ii) + (lse_j S_ji − S_ii)],  S = t·X Yᵀ;   w_i = 1 − λ·ε_i  (λ = strength)
    noisy = Σ_i w_i ℓ_i / Σ_i w_i

The weights are detached, fitted on the whole global batch (the B×B similarities recomputed from the gathered
features on every rank, without gradient: O(B²·D) per rank, world-size times CLIP's b×B) and are used
identically by every rank; each rank returns (mean over its rows of w_i ℓ_i) / (mean over the global batch of
w), whose average over ranks is the global value exactly. Deviation from NCR/NEVLP: they fit the mixture once
per epoch over the whole dataset's losses; the objective sees one batch, so it is fitted per global batch.
A batch with no noise still splits in two: its hardest pairs can get weights near 0 (about an eighth of the
pairs of a clean synthetic batch of 64) — use strength < 1, and `warmup` steps of plain CLIP weights while
the model has not yet fitted the clean pairs.

mode=soft | hard — bootstrapping (Reed et al. 2015, "Training Deep Neural Networks on Noisy Labels with
Bootstrapping"): the target of row i mixes the one-hot pair with the model's own prediction
q_i = softmax(S_i·), per direction, averaged over image→text and text→image:

    soft:  −Σ_j (β·1[j=i] + (1−β)·q_ij) log q_ij   (β = 0.95 by default; q keeps its gradient, as Reed's)
    hard:  −β log q_ii − (1−β) log q_i,argmax_j q_ij   (β = 0.8 by default)

Why not the model's *detached* own distribution as soft target: with q detached the gradient is
p − β·e − (1−β)·p = β·(p − e), i.e. CLIP's times β — the same for clean and noisy pairs. Reed's soft form
(q with its gradient: an entropy term) and hard form (its argmax) are what make the target disagree with a
wrong caption. Both are means over the rank's own rows, exact under sharding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.registry import Features, Objective, register

MODES = ("weight", "soft", "hard")
DEFAULT_BETA = {"soft": 0.95, "hard": 0.8}
EM_ITERS = 10
REG_COVAR = 5e-4


@dataclass
class NoisyParams:
    mode: str = "weight"  # weight (down-weight pairs a loss mixture calls noisy) | soft | hard (bootstrap)
    strength: float = 1.0  # weight: λ in w_i = 1 − λ·ε_i, in [0, 1]
    beta: float = 0.0  # soft/hard: weight of the given pair in the target; 0 = Reed's (soft 0.95, hard 0.8)
    warmup: int = 0  # weight: steps of plain (all-1) weights before the mixture is used


def pair_losses(f: Features) -> torch.Tensor:
    """B per-pair symmetric InfoNCE losses of the global batch, without gradient."""
    with torch.no_grad():
        s = f.logit_scale * f.all_image @ f.all_text.T
        diag = s.diagonal()
        return ((torch.logsumexp(s, 1) - diag) + (torch.logsumexp(s, 0) - diag)) / 2


def noise_probability(losses: torch.Tensor) -> torch.Tensor:
    """ε: posterior of the high-loss component of a 2-Gaussian mixture fitted to the min–max scaled losses."""
    x = losses.detach().double()
    lo, hi = x.min(), x.max()
    if not hi - lo > 1e-12:
        return torch.zeros_like(x)
    x = (x - lo) / (hi - lo)
    mean = x.new_tensor([0.0, 1.0])
    var = x.var(unbiased=False).expand(2) + REG_COVAR
    prior = x.new_tensor([0.5, 0.5])
    for _ in range(EM_ITERS):
        log_p = -0.5 * torch.log(2 * math.pi * var) - (x[:, None] - mean) ** 2 / (2 * var) + torch.log(prior)
        r = torch.softmax(log_p, 1)  # n×2 responsibilities
        nk = r.sum(0).clamp_min(1e-12)
        prior = nk / len(x)
        mean = (r * x[:, None]).sum(0) / nk
        var = (r * (x[:, None] - mean) ** 2).sum(0) / nk + REG_COVAR
    log_p = -0.5 * torch.log(2 * math.pi * var) - (x[:, None] - mean) ** 2 / (2 * var) + torch.log(prior)
    return torch.softmax(log_p, 1)[:, int(mean.argmax())]


@register
class NoiseRobust(Objective):
    name = "noisy"
    description = (
        "noise-robust InfoNCE: down-weights pairs a loss mixture calls mislabelled (weight), or bootstraps "
        "the targets with the model's own prediction (soft, hard)"
    )
    paper = (
        "Tao et al. 2024, NEVLP: Noise-Robust Framework for Efficient Vision-Language Pre-training; "
        "Huang et al. 2021 (NCR); Reed et al. 2015, Training Deep Neural Networks on Noisy Labels with "
        "Bootstrapping"
    )
    Params = NoisyParams

    def __init__(self, params: NoisyParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        if p.mode not in MODES:
            raise UserError(f"--objective noisy: mode must be one of {', '.join(MODES)}, not {p.mode!r}")
        if not 0 <= p.strength <= 1:
            raise UserError(f"--objective noisy: strength must be in [0, 1], not {p.strength}")
        if not 0 <= p.beta <= 1:
            raise UserError(f"--objective noisy: beta must be in (0, 1] (or 0 for Reed's), not {p.beta}")
        if p.warmup < 0:
            raise UserError(f"--objective noisy: warmup must be >= 0 steps, not {p.warmup}")

    def pair_weights(self, f: Features) -> torch.Tensor:
        """w_g = 1 − λ·ε_g for the B pairs of the global batch (detached, float64)."""
        if f.step < self.params.warmup:
            return torch.ones(len(f.all_image), dtype=torch.float64, device=f.image.device)
        return 1 - self.params.strength * noise_probability(pair_losses(f))

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        b = len(f.image)
        labels = torch.arange(b, device=f.image.device) + f.offset
        logits = (f.logit_scale * f.image @ f.all_text.T, f.logit_scale * f.text @ f.all_image.T)
        if self.params.mode == "weight":
            w = self.pair_weights(f)
            own = w[f.offset : f.offset + b].to(f.image.dtype)
            per_row = sum(F.cross_entropy(z, labels, reduction="none") for z in logits) / 2
            return {"noisy": (own * per_row).mean() / w.mean().clamp_min(1e-12).to(f.image.dtype)}
        beta = self.params.beta or DEFAULT_BETA[self.params.mode]
        total = 0.0
        for z in logits:
            log_q = F.log_softmax(z, 1)
            given = -log_q.gather(1, labels[:, None]).squeeze(1)
            if self.params.mode == "soft":
                own_pred = -(log_q.exp() * log_q).sum(1)  # −Σ_j q_ij log q_ij, with its gradient
            else:
                own_pred = -log_q.gather(1, log_q.detach().argmax(1, keepdim=True)).squeeze(1)
            total = total + (beta * given + (1 - beta) * own_pred).mean()
        return {"noisy": total / 2}
