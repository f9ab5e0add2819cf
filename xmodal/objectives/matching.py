"""Image–text matching with hard negatives (ALBEF/BLIP), registered as `itm`.

A binary head on the fusion encoder's [CLS] says whether an image and a caption belong together. Per
row i of the batch, with the model's similarities s_ij = τ⁻¹ x_i·y_j over the *global* batch (no gradient):

    p(text j is image i's negative) ∝ softmax_j(s_i·) · [j ≠ i and caption j ≠ caption i]
    p(image j is text i's negative) ∝ softmax_j(s_·i) · [the same mask]

one negative text is drawn per image and one negative image per text (`torch.multinomial`, as ALBEF's
`pretrain.py` and BLIP's `blip_retrieval.py` do), so the negatives are the ones the contrastive model
finds hard. The loss is the cross-entropy of the 2-way head over the b positive pairs and the 2b negative
pairs, labels 1 and 0:

    L = −1/(3b) Σ_pairs log softmax(itm_head(fused [CLS]))_label

Masked out besides the positive: other rows with the identical caption (BLIP masks by image id; a
manifest has no such id, and a repeated caption is the duplicate we can see). A row whose every other
caption is masked draws uniformly among the other rows. ALBEF's multinomial would fail there.

Data parallelism: the similarities span the gathered global batch, the draws are made for all its rows
with a generator seeded by (seed, step) on every rank, and each rank takes its own rows' draws. The
negatives' hidden states come from the global batch gathered *with* gradients, as BLIP gathers
`image_embeds_world`. One process draws the same negatives as two.

`synth=true`: ViLTA's synthesised hard negatives. 15 % of the caption's tokens are masked as for MLM
(shared with `mlm` when its `prob` is the same). Each masked token is replaced by the MLM head's most
confident prediction that is *not* the true token. The image with this caption is one more negative per
row (rows with no masked token have none). ViLTA's code is not public. This follows the paper's
description, with the image-conditioned MLM head as the "current language encoder", since xmodal's text
tower has no MLM head of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.objectives.fusion_batch import FusionBatch, fusion_module
from xmodal.objectives.registry import Features, Objective, gather, register


def negative_weights(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of `sim` with `same` (True = not a negative) set to 0; rows left with nothing
    get uniform weight over the other rows."""
    w = F.softmax(sim.float(), dim=1).masked_fill(same, 0.0)
    empty = w.sum(1) <= 0
    if empty.any():
        others = ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        w[empty] = others[empty].float()
    return w


def sample_negatives(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row, drawn ∝ the row's weights (on the CPU, so any device gives the same draws)."""
    return torch.multinomial(weights.detach().float().cpu(), 1, generator=generator).squeeze(1)


@dataclass
class ItmParams:
    synth: bool = False  # add ViLTA's synthesised negatives (MLM-replaced captions)
    synth_prob: float = 0.15  # share of tokens replaced in a synthesised caption


@register
class Itm(Objective):
    name = "itm"
    description = "image–text matching on the fusion encoder, with in-batch hard negatives by ITC similarity"
    paper = "Li et al. 2021, ALBEF; Li et al. 2022, BLIP; synth: Wang et al. 2023, ViLTA"
    Params = ItmParams
    needs = frozenset({"pooled", "fusion"})
    supports_accumulation = False

    def __init__(self, params: ItmParams | None = None) -> None:
        super().__init__(params)
        if not 0.0 < self.params.synth_prob < 1.0:
            raise UserError(f"--objective itm(synth_prob={self.params.synth_prob}): give a share in (0, 1)")

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        fb: FusionBatch = f.fusion
        if fb is None:
            raise ValueError("itm needs the fusion batch (the trainer provides it)")
        B, b = len(f.all_image), len(f.image)
        if B < 2:
            raise UserError("--objective itm: needs at least 2 pairs per batch to draw negatives")
        with torch.no_grad():
            sim = f.logit_scale.detach() * f.all_image.detach() @ f.all_text.detach().T
            same = fb.same_caption()
            gen = fb.generator(17)
            neg_text = fb.mine(sample_negatives(negative_weights(sim, same), gen))  # per image
            neg_image = fb.mine(sample_negatives(negative_weights(sim.T, same.T), gen))  # per text
        all_th, all_attn, _ = fb.all_text()
        all_ih = fb.all_image_hidden()
        own_th, own_attn, own_ih = fb.mine(all_th), fb.mine(all_attn), fb.mine(all_ih)
        texts = [own_th, own_th, all_th[neg_text.to(all_th.device)]]
        attns = [own_attn, own_attn, all_attn[neg_text.to(all_th.device)]]
        images = [own_ih, all_ih[neg_image.to(all_ih.device)], own_ih]
        labels = [torch.ones(b), torch.zeros(2 * b)]
        if self.params.synth:
            s_h, s_attn, rows = self._synthesised(fb, all_th.shape[1])
            texts.append(s_h)
            attns.append(s_attn)
            images.append(own_ih[rows])
            labels.append(torch.zeros(len(rows)))
        n_local = sum(len(t) for t in texts)
        n_global = int(gather(torch.tensor([n_local], device=all_th.device)).sum())
        logits = fb.model.fusion.itm_logits(fb.fuse(torch.cat(texts), torch.cat(attns), torch.cat(images)))
        target = torch.cat(labels).long().to(logits.device)
        # a mean over the global batch's pairs: each rank's sum, times ranks / all pairs
        ranks = B // b
        return {"itm": F.cross_entropy(logits.float(), target, reduction="sum") * ranks / n_global}

    def synthesised_ids(self, fb: FusionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, rows): the captions of `rows` (those with a masked token) with each masked token replaced
        by the MLM head's best prediction other than the true token and the special ids."""
        m = fb.masking(self.params.synth_prob)
        with torch.no_grad():
            logits = fb.masked_logits(self.params.synth_prob).detach().clone()
            truth = m.labels[m.selected]
            logits[torch.arange(len(truth)), truth] = -torch.inf
            specials = [i for i in fusion_module().special_ids(fb.model) if 0 <= i < logits.shape[1]]
            logits[:, specials] = -torch.inf
            ids = m.labels.clone()
            ids[m.selected] = logits.argmax(1)
            rows = m.selected.any(1).nonzero().squeeze(1)
        return ids[rows], rows

    def _synthesised(self, fb: FusionBatch, length: int):
        """(hidden, attention, rows) of the synthesised captions, padded to `length`."""
        ids, rows = self.synthesised_ids(fb)
        if len(rows) == 0:  # no token of this rank's captions was masked
            h = fb.hidden.text_hidden
            return h.new_zeros(0, length, h.shape[2]), h.new_zeros(0, length, dtype=torch.bool), rows
        h, attn = fb.encode_text(ids)
        pad_to = fusion_module().pad_to
        return pad_to(h, length), pad_to(attn, length, False), rows
