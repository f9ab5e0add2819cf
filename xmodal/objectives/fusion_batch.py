"""What the fusion objectives (`itm`, `mlm`, `mod`) get beyond pooled features: one step's tower hidden
states, the model (whose `fusion` module they run), and the step's random draws.

The trainer builds one `FusionBatch` per step (`Features.fusion`). Work several objectives share — the
gathered hidden states, the MLM masking and the masked caption's fused states — is computed on first use
and cached for the step, so `clip+itm(synth=true)+mlm` masks and encodes the masked captions once, in
whatever order the objectives run.

Random draws (hard negatives, masking) come from generators seeded by (seed, step, purpose), drawn for
the whole *global* batch on every rank and sliced to this rank's rows. Two processes therefore draw what
one process draws for the same global batch, and a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from xmodal.objectives.registry import gather, gather_with_grad

if TYPE_CHECKING:
    from xmodal.models.fusion import Hidden


def fusion_module() -> ModuleType:
    """`xmodal.models.fusion`, imported on first use: the objectives are registered at every `xmodal`
    start, and importing the models layer (open_clip) there would cost every command seconds."""
    from xmodal.models import fusion

    return fusion


@dataclass
class Masking:
    """The MLM corruption of this rank's captions (ALBEF/BERT): `selected` b×L positions to predict;
    of those `to_mask` get the mask embedding (80 %), `ids` holds random ids at another 10 %, the rest
    keep their token. `labels` are the original ids; `n_global` counts selected positions over ranks."""

    selected: torch.Tensor
    to_mask: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    n_global: int


@dataclass
class FusionBatch:
    model: torch.nn.Module
    hidden: Hidden  # this rank's rows, with gradients
    seed: int
    step: int
    global_batch: int
    offset: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    momentum_model: torch.nn.Module | None = None
    momentum_hidden: Hidden | None = None  # the momentum model's pass over the same batch
    _cache: dict[str, Any] = field(default_factory=dict)

    # -- random draws ----------------------------------------------------------------------------
    def generator(self, purpose: int) -> torch.Generator:
        from xmodal.train.batcher import stable_seed

        return torch.Generator().manual_seed(stable_seed(self.seed, self.step, purpose))

    def mine(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor drawn for the global batch."""
        return x[self.offset : self.offset + len(self.hidden.text_ids)]

    # -- the global batch ------------------------------------------------------------------------
    def global_length(self) -> int:
        if "length" not in self._cache:
            n = torch.tensor([self.hidden.text_ids.shape[1]], device=self.hidden.text_ids.device)
            self._cache["length"] = int(gather(n).max())
        return self._cache["length"]

    def _cached(self, key: str, make: Callable[[], Any]) -> Any:
        """The step's shared results, made with gradients enabled even when first asked for under
        no_grad (a sampler's), so that the objective that trains through them still gets gradients."""
        if key not in self._cache:
            with torch.enable_grad():
                self._cache[key] = make()
        return self._cache[key]

    def all_text(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden B×L×Wt with gradients, attention B×L, ids B×L), padded to the longest caption."""

        def make():
            n, h = self.global_length(), self.hidden
            return (
                gather_with_grad(fusion_module().pad_to(h.text_hidden, n)),
                gather(fusion_module().pad_to(h.text_attn, n, False)),
                gather(fusion_module().pad_to(h.text_ids, n)),
            )

        return self._cached("all_text", make)

    def all_image_hidden(self) -> torch.Tensor:
        return self._cached("all_image", lambda: gather_with_grad(self.hidden.image_hidden))

    def same_caption(self) -> torch.Tensor:
        """B×B bool: captions i and j are the same token sequence (the diagonal included)."""
        ids = self.all_text()[2]
        return (ids[:, None, :] == ids[None, :, :]).all(-1)

    # -- running the fusion encoder ----------------------------------------------------------------
    def fuse(
        self, text_h: torch.Tensor, attn: torch.Tensor, image_h: torch.Tensor, model=None
    ) -> torch.Tensor:
        model = model if model is not None else self.model
        with self.autocast():
            return fusion_module().fusion_of(model)(text_h, attn, image_h).float()

    def mlm_logits(self, rows: torch.Tensor, model=None) -> torch.Tensor:
        model, fm = model if model is not None else self.model, fusion_module()
        with self.autocast():
            return fm.fusion_of(model).mlm_logits(rows, fm.token_embedding(model)).float()

    def encode_text(self, ids: torch.Tensor, to_mask: torch.Tensor | None = None, model=None):
        """(hidden, attention) of captions `ids` through the text tower, `to_mask` positions masked."""
        model, fm = model if model is not None else self.model, fusion_module()
        with self.autocast():
            _, h, _, attn = fm.text_hidden(model, ids, to_mask, fm.fusion_of(model).mask_embedding)
        return h.float(), attn

    # -- MLM -------------------------------------------------------------------------------------
    def masking(self, prob: float) -> Masking:
        """Select `prob` of each caption's real tokens (not the start or end token), 80/10/10."""
        key = f"masking:{prob}"
        if key not in self._cache:
            ids, attn = self.hidden.text_ids, self.hidden.text_attn
            b, n = ids.shape
            ctx = max(n, self.global_length())
            gen = self.generator(21)
            u_sel = self.mine(torch.rand(self.global_batch, ctx, generator=gen))[:, :n].to(ids.device)
            u_kind = self.mine(torch.rand(self.global_batch, ctx, generator=gen))[:, :n].to(ids.device)
            vocab = int(fusion_module().token_embedding(self.model).shape[0])
            specials = torch.tensor(fusion_module().special_ids(self.model))
            pool = torch.ones(vocab, dtype=torch.bool)
            pool[specials[(specials >= 0) & (specials < vocab)]] = False
            pool = pool.nonzero().squeeze(1)
            draw = torch.randint(len(pool), (self.global_batch, ctx), generator=gen)
            random_ids = self.mine(pool[draw])[:, :n].to(ids.device)
            pos = torch.arange(n, device=ids.device)
            end = attn.long().sum(1) - 1  # the end token's position
            candidate = attn & (pos >= 1) & (pos < end[:, None])
            selected = candidate & (u_sel < prob)
            to_mask = selected & (u_kind < 0.8)
            randomised = selected & (u_kind >= 0.8) & (u_kind < 0.9)
            count = torch.tensor([int(selected.sum())], device=ids.device)
            self._cache[key] = Masking(
                selected, to_mask, torch.where(randomised, random_ids, ids), ids, int(gather(count).sum())
            )
        return self._cache[key]

    def masked_fused(self, prob: float) -> torch.Tensor:
        """The model's fused states b×L×w of the masked captions with their images (gradients flow)."""

        def make():
            m = self.masking(prob)
            h, attn = self.encode_text(m.ids, m.to_mask)
            return self.fuse(h, attn, self.hidden.image_hidden)

        return self._cached(f"masked_fused:{prob}", make)

    def masked_logits(self, prob: float) -> torch.Tensor:
        """The model's vocabulary logits n×V at this rank's selected positions (gradients flow)."""
        return self._cached(
            f"masked_logits:{prob}",
            lambda: self.mlm_logits(self.masked_fused(prob)[self.masking(prob).selected]),
        )

    @torch.no_grad()
    def momentum_mlm_logits(self, prob: float, see_caption: bool) -> torch.Tensor:
        """The momentum model's vocabulary logits n×V at the selected positions, given the masked caption
        (ALBEF) or, with `see_caption`, the uncorrupted one (the cross-distillation option)."""
        if self.momentum_model is None or self.momentum_hidden is None:
            raise ValueError("momentum distillation needs the momentum model (the trainer provides it)")
        m, mm = self.masking(prob), self.momentum_model
        if see_caption:
            h, attn = self.momentum_hidden.text_hidden.float(), self.momentum_hidden.text_attn
        else:
            h, attn = self.encode_text(m.ids, m.to_mask, model=mm)
        fused = self.fuse(h, attn, self.momentum_hidden.image_hidden, model=mm)
        return self.mlm_logits(fused[m.selected], model=mm)
