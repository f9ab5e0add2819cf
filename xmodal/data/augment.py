"""Batched, seeded augmentation on uint8/float image tensors and caption strings.

Working on whole batches of cached tensors (instead of per-sample PIL transforms in DataLoader
workers) keeps augmentation cheap on CPUs and GPUs alike, and a per-step generator makes it
reproducible across resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_scale: float = 1.0  # random resized crop: area fraction sampled in [crop_scale, 1]; 1 = off
    flip: float = 0.0  # probability of a horizontal flip (off by default: it breaks "left of" captions)
    color: float = 0.0  # brightness/contrast/saturation jitter strength; 0 = off
    word_drop: float = 0.0  # probability of dropping each caption word (at least one word is kept)

    @classmethod
    def from_config(cls, cfg: object) -> AugmentConfig:
        """From a TrainConfig: field `x` here is the config's `aug_x`."""
        from dataclasses import fields

        return cls(**{f.name: getattr(cfg, "aug_" + f.name) for f in fields(cls)})

    @property
    def images_enabled(self) -> bool:
        return self.crop_scale < 1.0 or self.flip > 0 or self.color > 0


def augment_images(
    x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, offset: int = 0, total: int | None = None
) -> torch.Tensor:
    """float pixels in [0,1], N×3×H×W → augmented float pixels in [0,1] (same shape).

    Random parameters are drawn for `total` samples and rows offset..offset+N are used, so a slice of a
    batch (one rank's share, one micro-batch) is augmented exactly as it would be in the whole batch.
    """
    n = total if total is not None else x.shape[0]
    rows = slice(offset, offset + x.shape[0])
    if cfg.crop_scale < 1.0 or cfg.flip > 0:
        area = torch.empty(n).uniform_(cfg.crop_scale, 1.0, generator=gen)
        log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
        ratio = log_r.exp() if cfg.crop_scale < 1.0 else torch.ones(n)  # flip alone: no crop
        sx = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
        sy = (area / ratio).sqrt().clamp(max=1.0)
        tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
        ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
        flip = torch.where(torch.rand(n, generator=gen) < cfg.flip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = sx * flip
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = ty
        theta = theta[rows]
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.color > 0:
        s = cfg.color

        def factors() -> torch.Tensor:
            f = 1 + (torch.rand(n, generator=gen) * 2 - 1) * s
            return f[rows].view(-1, 1, 1, 1).to(x.device, x.dtype)

        x = x * factors()  # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factors() + mean  # contrast
        gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = (x - gray) * factors() + gray  # saturation
        x = x.clamp(0, 1)
    return x


def drop_words(text: str, p: float, gen: torch.Generator) -> str:
    """Drop each word with probability p, keeping at least one."""
    words = text.split()
    if p <= 0 or len(words) <= 1:
        return text
    keep = torch.rand(len(words), generator=gen) >= p
    if not keep.any():
        keep[int(torch.randint(len(words), (1,), generator=gen))] = True
    return " ".join(w for w, k in zip(words, keep.tolist(), strict=True) if k)
