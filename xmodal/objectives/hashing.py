"""Hashing objectives (registered as `dcmh`, `bebr`): train `xmodal.hashing.heads.HashHeads` on the model's
embeddings (`Features.hash_heads`), so that image and text items get ±1 codes searchable by Hamming distance.

`dcmh` — Deep Cross-Modal Hashing (Jiang & Li, CVPR 2017). F = the relaxed image codes, G = the relaxed text
codes (c bits), Θ_ij = ½ F_iᵀ G_j, S_ij = 1 when image i and text j are similar: the pair itself, or both
carry the same label (label −1 = unlabelled: only its own pair). The paper minimises over n items

    J = −Σ_ij (S_ij Θ_ij − log(1 + e^Θ_ij)) + γ (‖B − F‖² + ‖B − G‖²) + η (‖Fᵀ1‖² + ‖Gᵀ1‖²),

with B = sign(F + G) from its alternating B step (here recomputed per batch and detached; sign(0) = +1).
We return J / n for the global batch of n pairs, as three terms, each already weighted:

    dcmh          = ½ [ (1/b) Σ_{i∈rank} Σ_j softplus(Θ_ij) − S_ij Θ_ij   (image rows vs all texts)
                      + the same for this rank's text rows vs all images ]
    dcmh_quant    = γ (1/b) Σ_{i∈rank} ‖B_i − F_i‖² + ‖B_i − G_i‖²
    dcmh_balance  = η (‖Σ_j F_j‖² + ‖Σ_j G_j‖²) / n               (over the global batch, on every rank)

log(1 + e^Θ) is computed as softplus (stable for any Θ). In one process the two halves of `dcmh` are equal
(Θ of text rows vs images is Θᵀ, S is symmetric), so dcmh + dcmh_quant + dcmh_balance = J / n exactly; the
symmetric form lets every rank score its own rows of both modalities. Each pairwise/quantisation term is
a mean over this rank's rows and the balance term the global value itself, so the average over ranks is
the one-process loss (the registry's convention). Dividing by n keeps the paper's γ, η meaning the same.

`bebr` — BEBR's task-agnostic embedding-to-embedding training (Gan et al. 2023, arXiv 2302.08714): the
recurrent hash heads are trained alone on the float embeddings, which are the only input and the targets
(both detached: this objective never changes the model). We could read only the abstract, introduction
and summaries of the paper, which describe an NCE-form contrastive objective between the reconstructed and
the original embeddings (plus hard-negative mining we do not implement: the global batch gives the
negatives). With x̂_i^u the reconstruction of item i after u steps, X the global batch's embeddings of the
same modality and τ = `t`:

    nce_u  = (1/b) Σ_{i∈rank} −log [ exp(cos(x̂_i^u, X_{o+i})/τ) / Σ_j exp(cos(x̂_i^u, X_j)/τ) ]
    mse_u  = (1/b) Σ_{i∈rank} ‖x̂_i^u − x_i‖²
    cross_u = nce_u with X the *other* modality's global embeddings (image i's reconstruction → text i)

    bebr       = mean over modalities and u of nce_u
    bebr_mse   = `mse` · mean over modalities and u of mse_u       (our addition, see below)
    bebr_cross = `cross` · mean over modalities and u of cross_u   (returned only when cross > 0)

u runs over every step (`prefixes=true`: each prefix code is trained to stand alone) or only the last one.
Choices: the cosine makes the NCE term blind to ‖x̂‖, but the recurrence binarizes the residual x − x̂,
which is only meaningful when x̂ approximates x in scale too — hence the regression term (default weight 1);
`cross` is an optional cross-modal term (image↔text), off by default (what we read of the paper
describes the training as task-agnostic, from each embedding alone). Every term is a mean over this
rank's rows, so it is exact under data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.hashing.heads import sign
from xmodal.objectives.registry import Features, Objective, register
from xmodal.objectives.supervised import positives


def _require_heads(f: Features, name: str, kind: str | None = None):
    heads = f.hash_heads
    if heads is None:
        raise ValueError(
            f"{name} needs the model's hash heads (Features.hash_heads); train with xmodal hash train"
        )
    if kind is not None and heads.kind != kind:
        raise ValueError(f"{name} needs {kind} hash heads, not {heads.kind}")
    return heads


def _codes(heads, x: torch.Tensor, all_x: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed codes of this rank's rows and of the global batch (computed once in one process)."""
    local = heads.relaxed(x, modality)
    return local, (local if all_x is x else heads.relaxed(all_x, modality))


@dataclass
class DCMHParams:
    gamma: float = 1.0  # γ: weight of the quantisation term ‖B − F‖² + ‖B − G‖²
    eta: float = 1.0  # η: weight of the bit-balance term ‖Fᵀ1‖² + ‖Gᵀ1‖²


@register
class DCMH(Objective):
    name = "dcmh"
    description = (
        "DCMH cross-modal hashing: pairwise likelihood of the relaxed image/text codes (pairs and same-label "
        "items similar), quantisation to sign(F+G) and bit balance (needs hash heads: xmodal hash train)"
    )
    paper = "Jiang & Li 2017, Deep Cross-Modal Hashing (CVPR)"
    Params = DCMHParams
    needs = frozenset({"pooled", "labels"})

    def __init__(self, params: DCMHParams | None = None) -> None:
        super().__init__(params)
        for key in ("gamma", "eta"):
            if getattr(self.params, key) < 0:
                raise UserError(f"--objective dcmh: {key}={getattr(self.params, key)}; give a weight ≥ 0")

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        heads = _require_heads(f, "dcmh")
        img, all_img = _codes(heads, f.image, f.all_image, "image")
        txt, all_txt = _codes(heads, f.text, f.all_text, "text")
        s = positives(f).to(img.dtype)  # b×B; symmetric, so the text rows use it too

        def nll(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            theta = 0.5 * rows @ cols.T
            return (F.softplus(theta) - s * theta).sum(1).mean()

        b = sign(img + txt).detach()
        quant = ((b - img).pow(2) + (b - txt).pow(2)).sum(1).mean()
        balance = (all_img.sum(0).pow(2).sum() + all_txt.sum(0).pow(2).sum()) / len(all_img)
        return {
            "dcmh": (nll(img, all_txt) + nll(txt, all_img)) / 2,
            "dcmh_quant": self.params.gamma * quant,
            "dcmh_balance": self.params.eta * balance,
        }


@dataclass
class BEBRParams:
    t: float = 0.05  # τ: temperature of the NCE term (cosine similarities)
    mse: float = 1.0  # weight of the regression term ‖x̂ − x‖²
    cross: float = 0.0  # weight of the cross-modal NCE term (image reconstruction → its text, and back)
    prefixes: bool = True  # train every step's reconstruction (each prefix code usable), else the last only


@register
class BEBR(Objective):
    name = "bebr"
    description = (
        "BEBR recurrent binarization, embedding-to-embedding: NCE between the codes' reconstructions and the "
        "float embeddings over the batch, plus regression (needs recurrent hash heads: xmodal hash train)"
    )
    paper = "Gan et al. 2023, Binary Embedding-based Retrieval at Tencent (arXiv 2302.08714)"
    Params = BEBRParams
    needs = frozenset({"pooled"})

    def __init__(self, params: BEBRParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        if p.t <= 0:
            raise UserError(f"--objective bebr: t={p.t}; give a temperature > 0")
        if p.mse < 0 or p.cross < 0:
            raise UserError(f"--objective bebr: mse={p.mse}, cross={p.cross}; give weights ≥ 0")

    def _nce(self, recon: torch.Tensor, keys: torch.Tensor, offset: int) -> torch.Tensor:
        logits = F.normalize(recon, dim=1) @ keys.T / self.params.t
        target = torch.arange(len(recon), device=recon.device) + offset
        return F.cross_entropy(logits, target)

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        heads = _require_heads(f, "bebr", kind="recurrent")
        sides = {
            "image": (f.image.detach(), f.all_image.detach(), f.all_text.detach()),
            "text": (f.text.detach(), f.all_text.detach(), f.all_image.detach()),
        }
        nce, mse, cross = [], [], []
        for modality, (x, same, other) in sides.items():
            recons = heads.reconstruct(x, modality)
            if not self.params.prefixes:
                recons = recons[-1:]
            x = x.to(recons[0].dtype)
            same, other = same.to(x.dtype), other.to(x.dtype)
            for r in recons:
                nce.append(self._nce(r, same, f.offset))
                mse.append((r - x).pow(2).sum(1).mean())
                if self.params.cross > 0:
                    cross.append(self._nce(r, other, f.offset))
        out = {"bebr": torch.stack(nce).mean(), "bebr_mse": self.params.mse * torch.stack(mse).mean()}
        if cross:
            out["bebr_cross"] = self.params.cross * torch.stack(cross).mean()
        return out
