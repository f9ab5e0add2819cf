"""Captioning objectives on a CoCa model: the captioning loss (`caption`) and SyCoCa's text-guided masked
image modelling (`tgmim`). Both read the `CaptionOut` of the step's CoCa pass (`xmodal.models.captioner`).

`caption` (CoCa, Yu et al. 2022) is the autoregressive loss of the multimodal decoder, teacher-forced:

    L_cap = −1/n Σ_{b,t: y_bt ≠ pad} log softmax(decoder(image_b, y_b,≤t))_{y_b,t+1}

We follow open_clip's CoCa where it differs from the paper: one attentional pooler gives both the
contrastive image feature (its first query) and the decoder's image tokens (the other queries), where
the paper has two poolers; and the pad id is 0, so the loss also skips label 0 (the BPE token "!"), as
open_clip's `CoCaLoss(ignore_index=0)` does. n counts the labels of the *global* batch, so that ranks
with different caption lengths average to the one-process loss (open_clip averages per rank).
Combine with `clip`/`siglip` by weight: `--objective clip+caption:2` is open_clip's CoCa recipe.

`caption(attentive=0.5)` is SyCoCa's attentive masking of the captioning input (Ma et al. 2024): the
decoder sees only the image tokens outside the least caption-relevant half, relevance being a token's
highest cosine similarity to a word of the caption in the contrastive space.

`tgmim` is SyCoCa's symmetrised direction: the most caption-relevant share `ratio` of the image tokens
is masked and rebuilt from the visible ones and the caption by a small image decoder (`model.tgmim`):

    L_tgmim = 1/(m·W) Σ_masked ‖pred_j − LN(token_j)‖²

with the target tokens detached and layer-normalised (MAE's normalised-target variant). The paper rebuilds
pixels of masked patches; open_clip's CoCa decoder reads pooled image tokens, not patches, so here the
pooled tokens are the target (the issue's "masked image modelling on the image tokens"). The paper's
weights: L = L_itc + 2·L_cap + 1·L_tgmim, r_l = r_h = 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.registry import Features, Objective, gather, register


@dataclass
class CaptionParams:
    attentive: float = 0.0  # SyCoCa r_l: share of least caption-relevant image tokens the decoder skips


@register
class Caption(Objective):
    name = "caption"
    description = "autoregressive captioning loss of a CoCa model's multimodal decoder"
    paper = "Yu et al. 2022, CoCa; attentive masking after Ma et al. 2024, SyCoCa"
    Params = CaptionParams
    needs = frozenset({"pooled", "caption"})
    supports_accumulation = False

    def __init__(self, params: CaptionParams | None = None) -> None:
        super().__init__(params)
        if not 0.0 <= self.params.attentive < 1.0:
            raise UserError(f"--objective caption(attentive={self.params.attentive}): give a share in [0, 1)")

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        out = f.caption
        if out is None:
            raise ValueError("caption needs the CoCa pass's outputs (the trainer provides them)")
        n_global = int(gather(torch.tensor([out.n_labels], device=out.loss_sum.device)).sum())
        if n_global == 0:
            return {"caption": out.loss_sum * 0.0}
        ranks = len(f.all_image) // len(f.image)
        return {"caption": out.loss_sum * ranks / n_global}


@dataclass
class TgMimParams:
    ratio: float = 0.5  # SyCoCa r_h: share of the most caption-relevant image tokens masked and rebuilt


@register
class TgMim(Objective):
    name = "tgmim"
    description = "SyCoCa text-guided masked image modelling: rebuild the caption-relevant image tokens"
    paper = "Ma et al. 2024, SyCoCa"
    Params = TgMimParams
    needs = frozenset({"pooled", "caption"})
    supports_accumulation = False

    def __init__(self, params: TgMimParams | None = None) -> None:
        super().__init__(params)
        if not 0.0 < self.params.ratio < 1.0:
            raise UserError(f"--objective tgmim(ratio={self.params.ratio}): give a share in (0, 1)")

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        out = f.caption
        if out is None or out.mim_pred is None:
            raise ValueError("tgmim needs the CoCa pass's TG-MIM outputs (the trainer provides them)")
        target = F.layer_norm(out.mim_target.float(), out.mim_target.shape[-1:])
        return {"tgmim": F.mse_loss(out.mim_pred.float(), target)}
