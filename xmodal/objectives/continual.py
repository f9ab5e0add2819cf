"""Continual pre-training without forgetting and backward-compatible training (registered as `modx`,
`ctp`, `bct`): the frozen previous model is the teacher (`xmodal train --init-from OLD_RUN --objective
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

`ctp` — CTP (Zhu et al., ICCV 2023): see `CTP`. `bct` — BCT's influence loss (Shen et al., CVPR 2020)
made cross-modal: see `BCT.terms`. Added to the new model's own `clip` loss (`clip+bct`), it keeps the
new embeddings scoreable against an index built with the old model, the compatibility BCT states as
M(new, old) > M(old, old).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.distillation import require_teacher
from xmodal.objectives.momentum import Momentum, MomentumParams
from xmodal.objectives.registry import Features, Objective, register

OLD = "the old model's"  # whose features the continual objectives need (the frozen previous model)


@dataclass
class ModXParams:
    t: float = 1.0  # temperature dividing both models' cosines (1: the authors' code)


def _row_kl(new: torch.Tensor, old: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(old_i) ‖ softmax(new_i)) of each row i; columns where `exclude` is True take no part
    (no probability mass, no gradient)."""
    if exclude is None:
        log_p_old = F.log_softmax(old, 1)
        return (log_p_old.exp() * (log_p_old - F.log_softmax(new, 1))).sum(1)
    log_p_old = F.log_softmax(old.masked_fill(exclude, float("-inf")), 1)
    log_p_new = F.log_softmax(new.masked_fill(exclude, float("-inf")), 1)
    p_old = log_p_old.exp()  # 0 on the excluded columns; the fills below keep −inf − (−inf) out of the sum
    return (p_old * (log_p_old.masked_fill(exclude, 0.0) - log_p_new.masked_fill(exclude, 0.0))).sum(1)


def _own_columns(b: int, total: int, offset: int, device: torch.device) -> torch.Tensor:
    """b×total bool: True at (i, offset + i), each row's own column in the global batch."""
    own = torch.zeros(b, total, dtype=torch.bool, device=device)
    own[torch.arange(b, device=device), torch.arange(b, device=device) + offset] = True
    return own


def _aligned_kl(new: torch.Tensor, old: torch.Tensor, offset: int) -> torch.Tensor:
    """Σ over the rows the old model ranks correctly (its row maximum on the diagonal, column offset+i)
    of KL(softmax(old_i) ‖ softmax(new_i))."""
    keep = old.argmax(1) == torch.arange(len(old), device=old.device) + offset
    return (_row_kl(new, old) * keep).sum()


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
        require_teacher(f, "modx", OLD)
        t, o = self.params.t, f.offset
        i2t = _aligned_kl(f.image @ f.all_text.T / t, f.teacher_image @ f.all_teacher_text.T / t, o)
        t2i = _aligned_kl(f.text @ f.all_image.T / t, f.teacher_text @ f.all_teacher_image.T / t, o)
        scale = len(f.all_image) / len(f.image)  # this rank's share of the global row sum
        return {"modx": scale * (i2t + t2i) / 2}


@dataclass
class CTPParams:
    t: float = 0.07  # temperature of both models' similarities (the authors' fixed `temp`)
    momentum: float = 0.0  # > 0: add the compatible momentum contrast, EMA decay m (the authors' 0.9)
    queue: int = 1024  # with momentum: earlier steps' momentum features kept as keys (the authors' 1024)
    anchor: float = 0.5  # with momentum: the share of the EMA's (1 − m) taken from the old model (theirs ½)


@register
class CTP(Objective):
    """CTP (Zhu et al., ICCV 2023) as the authors' code computes it (`models/clip_pretrain.py`,
    `CLIP_Pretrain.CTP`, of github.com/KevinLight831/CTP).

    Topology preservation (term `ctp`): with x, y the new model's image/text features of the batch, u, v
    the frozen old model's (L2-normalised), τ = `t` (their fixed `self.temp` = 0.07) and
    KL(P ‖ Q) = (1/b) Σ_i KL(softmax(P_i/τ) ‖ softmax(Q_i/τ)) (`nn.KLDivLoss(reduction='batchmean')`):

        cross = ½ [ KL(u Vᵀ ‖ x Yᵀ) + KL(v Uᵀ ‖ y Xᵀ) ]          (`loss_ita_dis_i2t`, `_t2i`)
        same  = ½ [ KL(u Uᵀ ‖ x Xᵀ) + KL(v Vᵀ ‖ y Yᵀ) ]          (`loss_cos_i`, `loss_cos_t`)
        ctp   = cross + same

    rows: this rank's b samples; columns: the global batch (X, Y, U, V gathered, the new ones with
    gradients). In the same-modal rows each sample's own column is left out: the authors set it to −1000
    before dividing by τ, which at τ = 0.07 gives it exactly zero probability in float32 and float64;
    here it is masked, which is the same there and stays exact at any τ. A mean over this rank's rows,
    so exact under data parallelism (the ranks' average is the global mean).

    Which samples: every row of the batch. The authors' CTP runs it on the whole batch, and with a memory
    (`train/train_CTP_ER.py`) the memory samples are merged into the training set, shuffled with the new
    ones, and the same loss runs on the mixed batch. Here the memory is `--replay OLD --replay-fraction f`,
    whose rows sit in every batch beside the new data, so no per-row flag is needed.

    Compatible momentum contrast (term `ctp_momentum`, with `momentum=m` > 0, off by default): the
    trainer's EMA model is updated θ_m ← m·θ_m + (1 − m)(1 − a)·θ + (1 − m)·a·θ_old (`_momentum_update_three`,
    a = `anchor` = ½, m = 0.9), and each image/text is contrasted with one-hot targets against the
    momentum features of the batch followed by a queue of earlier steps' (their `sim_i2t_md`, `_t2i_md`):
    ½ [ CE(x_i [y_m; Q_y]ᵀ/τ, i) + CE(y_i [x_m; Q_x]ᵀ/τ, i) ], computed by `momentum`'s machinery with α = 0,
    which keys the global batch (exact under data parallelism; the authors key each GPU's own rows),
    starts its queue empty (theirs: random unit vectors) and saves it with the checkpoint. The authors
    also distil the MLM logits from the momentum model; that belongs with an `mlm` objective and is left
    out here. Their ITC (`loss_ita`) is this project's `clip`: train `clip+ctp`.
    """

    name = "ctp"
    description = (
        "CTP continual pre-training: KL between the frozen old model's and the new model's cross- and "
        "same-modal in-batch similarity rows (topology preservation); momentum=0.9 adds the compatible "
        "momentum contrast (train with --init-from OLD_RUN, with --replay for a memory)"
    )
    paper = (
        "Zhu et al. 2023, CTP: Towards Vision-Language Continual Pretraining via Compatible Momentum "
        "Contrast and Topology Preservation (ICCV)"
    )
    Params = CTPParams
    needs = frozenset({"pooled", "teacher"})

    def __init__(self, params: CTPParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        if p.t <= 0:
            raise UserError(f"--objective ctp: t={p.t}; give a temperature > 0 (the authors' 0.07)")
        if not 0 <= p.momentum < 1:
            raise UserError(f"--objective ctp: momentum={p.momentum}; give an EMA decay in [0, 1) (0 = off)")
        if p.queue < 0:
            raise UserError(f"--objective ctp: queue={p.queue}; give a size ≥ 0")
        if not 0 <= p.anchor <= 1:
            raise UserError(f"--objective ctp: anchor={p.anchor}; give a share in [0, 1]")
        self._contrast: Momentum | None = None
        if p.momentum > 0:
            self.needs = CTP.needs | {"momentum"}
            self._contrast = Momentum(MomentumParams(momentum=p.momentum, queue=p.queue, alpha=0.0))

    @property
    def ema_decay(self) -> float | None:
        return self.params.momentum if self._contrast is not None else None

    @property
    def ema_anchor(self) -> float:
        return self.params.anchor if self._contrast is not None else 0.0

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        require_teacher(f, "ctp", OLD)
        t = self.params.t
        own = _own_columns(len(f.image), len(f.all_image), f.offset, f.image.device)
        cross = (
            _row_kl(f.image @ f.all_text.T / t, f.teacher_image @ f.all_teacher_text.T / t).mean()
            + _row_kl(f.text @ f.all_image.T / t, f.teacher_text @ f.all_teacher_image.T / t).mean()
        ) / 2
        same = (
            _row_kl(f.image @ f.all_image.T / t, f.teacher_image @ f.all_teacher_image.T / t, own).mean()
            + _row_kl(f.text @ f.all_text.T / t, f.teacher_text @ f.all_teacher_text.T / t, own).mean()
        ) / 2
        out = {"ctp": cross + same}
        if self._contrast is not None:
            fixed = dataclasses.replace(f, logit_scale=f.image.new_full((), 1.0 / t))
            out["ctp_momentum"] = self._contrast.terms(fixed)["momentum"]
        return out

    def commit(self) -> None:
        if self._contrast is not None:
            self._contrast.commit()

    def state_dict(self) -> dict[str, Any]:
        return self._contrast.state_dict() if self._contrast is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._contrast is not None:
            self._contrast.load_state_dict(state)
        else:
            super().load_state_dict(state)


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
        require_teacher(f, "bct", OLD)
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
