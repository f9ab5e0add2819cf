"""Masked language modelling through the fusion encoder (`mlm`) and ALBEF's momentum distillation (`mod`).

`mlm`: as BERT and ALBEF mask, each real token of a caption except the start and end token is selected
with probability `prob` (15 %). Of the selected tokens 80 % get the mask embedding, 10 % a random token of
the vocabulary (special ids excluded) and 10 % stay. The corrupted caption goes through the text tower,
then the fusion encoder with the caption's image. The MLM head (tied to the text tower's token
embedding) predicts the original token at each selected position:

    L_mlm = −1/n Σ_selected log softmax(head(fused_p))_{token_p}

n counts the selected positions of the *global* batch, so a term summed per rank and scaled by ranks/n
averages over ranks to one process's loss (ranks mask different numbers of tokens).

`mod` (ALBEF momentum distillation): ITC as `momentum` computes it, against the EMA model's features and a
queue, with targets α·softmax(momentum similarities) + (1 − α)·one-hot. It also makes `mlm` distil. The
momentum model's MLM distribution q on the same corrupted caption becomes a second target with the same α:

    L_mlm = (1 − α)·L_mlm + α · 1/n Σ_selected −Σ_v q_v log softmax(head(fused_p))_v

as ALBEF's `BertForMaskedLM` computes with `soft_labels`. `mod(mlm=cross)` is the cross-distillation
option after ViLTA: the momentum model sees the *uncorrupted* caption (and the image). Its distribution at
the masked position then puts mass on the true word and the words it confuses with it (synonyms), not on
guesses from context. ViLTA's code is not public; this is our reading of its description. `mod` replaces
`clip`/`momentum` as the ITC term: `--objective mod+itm+mlm` is ALBEF's pre-training loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.fusion_batch import FusionBatch
from xmodal.objectives.momentum import Momentum, MomentumParams
from xmodal.objectives.registry import Features, Objective, register


@dataclass
class MlmParams:
    prob: float = 0.15  # share of each caption's tokens selected for prediction


@register
class Mlm(Objective):
    name = "mlm"
    description = "masked language modelling through the fusion encoder, conditioned on the image"
    paper = "Devlin et al. 2019, BERT; Li et al. 2021, ALBEF (image-conditioned, momentum-distilled)"
    Params = MlmParams
    needs = frozenset({"pooled", "fusion"})
    supports_accumulation = False

    def __init__(self, params: MlmParams | None = None) -> None:
        super().__init__(params)
        if not 0.0 < self.params.prob < 1.0:
            raise UserError(f"--objective mlm(prob={self.params.prob}): give a share in (0, 1)")
        self.distill: Mod | None = None

    def bind(self, others: Sequence[Objective]) -> None:
        self.distill = next((o for o in others if isinstance(o, Mod)), None)
        if self.distill is not None:  # the instance's needs: the trainer reads them
            self.needs = frozenset({"pooled", "fusion", "momentum"})

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        fb: FusionBatch = f.fusion
        if fb is None:
            raise ValueError("mlm needs the fusion batch (the trainer provides it)")
        m = fb.masking(self.params.prob)
        logits = fb.masked_logits(self.params.prob)
        if m.n_global == 0:  # nothing selected anywhere: a zero that keeps the graph
            return {"mlm": logits.sum() * 0.0}
        logp = F.log_softmax(logits, dim=-1)
        loss = F.nll_loss(logp, m.labels[m.selected], reduction="sum")
        if self.distill is not None:
            alpha = self.distill.alpha_at(f.step)
            if alpha > 0:
                q = F.softmax(
                    fb.momentum_mlm_logits(self.params.prob, self.distill.params.mlm == "cross"), -1
                )
                loss = (1 - alpha) * loss + alpha * -(q * logp).sum()
        ranks = len(f.all_image) // len(f.image)
        return {"mlm": loss * ranks / m.n_global}


@dataclass
class ModParams(MomentumParams):
    mlm: str = "albef"  # mlm's soft targets: the momentum model on the corrupted caption, or "cross"


@register
class Mod(Momentum):
    name = "mod"
    description = "ALBEF momentum distillation: EMA-model soft targets for ITC (with queue) and for mlm"
    paper = "Li et al. 2021, ALBEF; mlm=cross after Wang et al. 2023, ViLTA"
    Params = ModParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        if self.params.mlm not in ("albef", "cross"):
            raise UserError(f"--objective mod(mlm={self.params.mlm}): use albef or cross")

    def bind(self, others: Sequence[Objective]) -> None:
        if any(type(o) is Momentum for o in others):
            raise UserError("--objective: mod already is ALBEF's momentum ITC; drop momentum (or mod)")

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        return {"mod": super().terms(f)["momentum"]}
