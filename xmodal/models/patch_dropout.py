"""FLIP's patch dropout (Li et al., "Scaling Language-Image Pre-training via Masking", CVPR 2023): in
training, the image tower sees a random share of its patch tokens, so a step costs a fraction of the image
FLOPs.

open_clip ships the formula (`open_clip.transformer.PatchDropout`: keep max(1, int(N·(1 − p))) of the N patch
tokens, uniformly at random, the class token always), but draws the subset from the global RNG, per process.
Here each row's subset is a function of (seed, step, the row's position in the global batch) — the way the
trainer's augmentation draws — so two processes, or GradCache micro-batches, drop exactly what one process
with the whole batch drops, and a resumed run what the uninterrupted one dropped. Evaluation (eval mode)
sees every patch, as in FLIP.
"""

from __future__ import annotations

import torch
from torch import nn

from xmodal.errors import UserError


def kept_patches(n: int, prob: float) -> int:
    """Patch tokens kept of `n` at drop probability `prob` (open_clip's count)."""
    return max(1, int(n * (1 - prob)))


class SeededPatchDropout(nn.Module):
    """Drop-in for `VisionTransformer.patch_dropout` (tokens b×(1+N)×d, class token first). `at(...)` says
    which rows of which step the next forward is; until it is called, or after `at(active=False)`, the
    module passes tokens through."""

    def __init__(self, prob: float, seed: int = 0) -> None:
        super().__init__()
        if not 0 <= prob < 1:
            raise ValueError(f"patch dropout probability {prob} is not in [0, 1)")
        self.prob, self.seed = prob, seed
        self._draw: tuple[int, int, int] | None = None  # (step, offset, total)

    def at(self, step: int, offset: int, total: int, active: bool = True) -> None:
        """The next forward's rows are offset..offset+b of step `step`'s global batch of `total`."""
        self._draw = (step, offset, total) if active else None

    def keep_indices(self, b: int, n: int) -> torch.Tensor:
        """b × kept: the patch indices (0..n-1, ascending) each row keeps."""
        from xmodal.train.batcher import stable_seed

        step, offset, total = self._draw
        gen = torch.Generator().manual_seed(stable_seed(self.seed, step, 13))
        rand = torch.rand(total, n, generator=gen)[offset : offset + b]
        return rand.topk(kept_patches(n, self.prob), dim=-1).indices.sort(dim=-1).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0 or self._draw is None:
            return x
        cls, patches = x[:, :1], x[:, 1:]
        idx = self.keep_indices(x.shape[0], patches.shape[1]).to(x.device)
        kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls, kept], dim=1)


def install_patch_dropout(model: nn.Module, prob: float, seed: int, flag: str) -> SeededPatchDropout:
    """Replace the image tower's patch dropout with the seeded one (an open_clip ViT only)."""
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "patch_dropout") or not hasattr(visual, "class_embedding"):
        raise UserError(
            f"{flag}: the image tower is not an open_clip ViT (no patch tokens to drop); use a ViT model"
        )
    visual.patch_dropout = SeededPatchDropout(prob, seed)
    return visual.patch_dropout
