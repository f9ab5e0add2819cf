"""Batched, seeded augmentation on uint8/float image tensors and caption strings.

Working on whole batches of cached tensors (instead of per-sample PIL transforms in DataLoader
workers) keeps augmentation cheap on CPUs and GPUs alike, and a per-step generator makes it
reproducible across resumes.

Images: random resized crop, flip, colour jitter and RandAugment (Cubuk et al. 2020, torchvision's op
list and magnitudes). Captions: word dropout and EDA (Wei & Zou 2019: synonym replacement, random swap,
random deletion), one caption at a time with a generator seeded per (seed, step, global position).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_scale: float = 1.0  # random resized crop: area fraction sampled in [crop_scale, 1]; 1 = off
    flip: float = 0.0  # probability of a horizontal flip (off by default: it breaks "left of" captions)
    color: float = 0.0  # brightness/contrast/saturation jitter strength; 0 = off
    word_drop: float = 0.0  # probability of dropping each caption word (at least one word is kept)
    randaugment_n: int = 0  # RandAugment: ops applied in sequence to each image; 0 = off
    randaugment_m: int = 9  # RandAugment magnitude, 0..30 (torchvision's 31 bins)
    text_eda: float = 0.0  # EDA's α: the fraction of a caption's words changed; 0 = off

    @classmethod
    def from_config(cls, cfg: object) -> AugmentConfig:
        """From a TrainConfig: field `x` here is the config's `aug_x`."""
        from dataclasses import fields

        return cls(**{f.name: getattr(cfg, "aug_" + f.name) for f in fields(cls)})

    @property
    def images_enabled(self) -> bool:
        return self.crop_scale < 1.0 or self.flip > 0 or self.color > 0 or self.randaugment_n > 0


def augment_images(
    x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, offset: int = 0, total: int | None = None
) -> torch.Tensor:
    """float pixels in [0,1], N×3×H×W → augmented float pixels in [0,1] (same shape).

    Random parameters are drawn for `total` samples and rows offset..offset+N are used, so a slice of a
    batch (one rank's share, one micro-batch) is augmented exactly as it would be in the whole batch.
    """
    n = total if total is not None else x.shape[0]
    rows = slice(offset, offset + x.shape[0])
    x_in = x
    if cfg.crop_scale < 1.0 or cfg.flip > 0:
        sx, sy, tx, ty = crop_boxes(n, cfg.crop_scale, x.shape[-2], x.shape[-1], gen)
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
    if cfg.randaugment_n > 0:
        x = _randaugment(x if x is not x_in else x.clone(), cfg, gen, n, rows)
    return x


def crop_boxes(
    n: int, scale: float, height: int, width: int, gen: torch.Generator, tries: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's `RandomResizedCrop.get_params` (area in [scale, 1], aspect ratio in [3/4, 4/3]) for n
    images at once, in continuous coordinates: (crop width, crop height) as fractions of the image and the
    crop's centre in affine_grid's [-1, 1] units.

    Like torchvision it draws up to `tries` (area, ratio) pairs and keeps the first crop that fits inside the
    image, else takes the centre crop at the nearest allowed ratio (the whole image when its ratio is
    allowed). Clamping a crop that does not fit instead would stretch the image by up to 4/3 one way.
    """
    if scale >= 1.0:  # flip alone: no crop
        return torch.ones(n), torch.ones(n), torch.zeros(n), torch.zeros(n)
    lo, hi = 3 / 4, 4 / 3
    area = torch.empty(n, tries).uniform_(scale, 1.0, generator=gen)
    ratio = torch.empty(n, tries).uniform_(math.log(lo), math.log(hi), generator=gen).exp()
    sx = (area * ratio * height / width).sqrt()
    sy = (area / ratio * width / height).sqrt()
    fits = (sx <= 1) & (sy <= 1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first fitting try
    found = fits.any(dim=1)
    fall_w = min(1.0, hi * height / width)  # the centre crop: the image's ratio clamped to [lo, hi]
    fall_h = min(1.0, width / (lo * height))
    sx = torch.where(found, sx.gather(1, first).squeeze(1), fall_w)
    sy = torch.where(found, sy.gather(1, first).squeeze(1), fall_h)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx) * found
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy) * found
    return sx, sy, tx, ty


# -- RandAugment ----------------------------------------------------------------------------------------
# torchvision.transforms.v2.RandAugment's op list, in its order: (name, signed). Each op is drawn with
# equal probability; a signed op's magnitude is negated with probability 1/2.
RANDAUGMENT_OPS: tuple[tuple[str, bool], ...] = (
    ("Identity", False),
    ("ShearX", True),
    ("ShearY", True),
    ("TranslateX", True),
    ("TranslateY", True),
    ("Rotate", True),
    ("Brightness", True),
    ("Color", True),
    ("Contrast", True),
    ("Sharpness", True),
    ("Posterize", False),
    ("Solarize", False),
    ("AutoContrast", False),
    ("Equalize", False),
)
RANDAUGMENT_BINS = 31  # torchvision's num_magnitude_bins: magnitude M indexes bins 0..30


def randaugment_magnitude(op: str, m: int, height: int, width: int) -> float:
    """torchvision's RandAugment magnitude of `op` at bin m (before the random sign); 0 if it has none."""
    bins = RANDAUGMENT_BINS
    table = {
        "ShearX": lambda: torch.linspace(0.0, 0.3, bins),
        "ShearY": lambda: torch.linspace(0.0, 0.3, bins),
        "TranslateX": lambda: torch.linspace(0.0, 150.0 / 331.0 * width, bins),
        "TranslateY": lambda: torch.linspace(0.0, 150.0 / 331.0 * height, bins),
        "Rotate": lambda: torch.linspace(0.0, 30.0, bins),
        "Brightness": lambda: torch.linspace(0.0, 0.9, bins),
        "Color": lambda: torch.linspace(0.0, 0.9, bins),
        "Contrast": lambda: torch.linspace(0.0, 0.9, bins),
        "Sharpness": lambda: torch.linspace(0.0, 0.9, bins),
        "Posterize": lambda: (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int(),
        "Solarize": lambda: torch.linspace(1.0, 0.0, bins),
    }
    return float(table[op]()[m]) if op in table else 0.0


def randaugment_op(x: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One RandAugment op on a batch of float images in [0,1] (k×3×H×W), exactly as torchvision's
    RandAugment applies it to each image (nearest interpolation, zero fill, float semantics)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    nearest = InterpolationMode.NEAREST
    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(magnitude))
        shear = [deg, 0.0] if op == "ShearX" else [0.0, deg]
        return TF.affine(
            x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest, center=[0, 0]
        )
    if op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    if op == "Rotate":
        return TF.rotate(x, angle=magnitude, interpolation=nearest)
    if op == "Brightness":
        return TF.adjust_brightness(x, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(x, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(x, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return _adjust_sharpness(x, 1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(x, bits=int(magnitude))
    if op == "Solarize":
        return TF.solarize(x, threshold=1.0 * magnitude)  # float images: the threshold's bound is 1
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    raise ValueError(f"unknown RandAugment op {op}")


def _adjust_sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's adjust_sharpness on float images (blend with a 3×3 smoothing of weights 1/13 and 5/13
    at the centre, borders kept), with the smoothing as shifted sums: on CPUs torchvision's depthwise
    conv2d is ~4× slower on a batch than this (equal to 1e-7)."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    center = x[..., 1:-1, 1:-1]
    blurred = (
        (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).mul_(1.0 / 13.0).add_(center, alpha=4.0 / 13.0)
    )
    out = x.clone()
    out[..., 1:-1, 1:-1] = center + (1.0 - factor) * (blurred - center)
    return out.clamp_(0, 1)


def draw_randaugment(n_ops: int, total: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's ops (n_ops×total indices into RANDAUGMENT_OPS) and negated magnitudes (bool)."""
    ops = torch.randint(len(RANDAUGMENT_OPS), (n_ops, total), generator=gen)
    negate = torch.randint(2, (n_ops, total), generator=gen) == 1
    signed = torch.tensor([s for _, s in RANDAUGMENT_OPS])
    return ops, negate & signed[ops]


def _randaugment(
    x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, n: int, rows: slice
) -> torch.Tensor:
    """RandAugment, batched and in place on `x`: round by round, the rows sharing an (op, sign) go through
    that op together."""
    ops, negate = draw_randaugment(cfg.randaugment_n, n, gen)
    ops, negate = ops[:, rows], negate[:, rows]
    height, width = x.shape[-2:]
    for r in range(cfg.randaugment_n):
        group = ops[r] * 2 + negate[r].long()
        for g in group.unique().tolist():
            op = RANDAUGMENT_OPS[g // 2][0]
            if op == "Identity":
                continue
            magnitude = randaugment_magnitude(op, cfg.randaugment_m, height, width)
            idx = (group == g).nonzero().squeeze(1).to(x.device)
            x.index_copy_(
                0, idx, randaugment_op(x.index_select(0, idx), op, -magnitude if g % 2 else magnitude)
            )
    return x


# -- captions -------------------------------------------------------------------------------------------
def drop_words(text: str, p: float, gen: torch.Generator) -> str:
    """Drop each word with probability p, keeping at least one."""
    words = text.split()
    if p <= 0 or len(words) <= 1:
        return text
    keep = torch.rand(len(words), generator=gen) >= p
    if not keep.any():
        keep[int(torch.randint(len(words), (1,), generator=gen))] = True
    return " ".join(w for w, k in zip(words, keep.tolist(), strict=True) if k)


# EDA's operations and how often each is picked: CLIP🚀's --synonym-replacement-prob 0.4,
# --random-swap-prob 0.4, --random-deletion-prob 0.2 (facebookresearch/clip-rocket, main.py).
EDA_OPS = ("synonym", "swap", "delete")
EDA_WEIGHTS = (0.4, 0.4, 0.2)


def _core(word: str) -> tuple[str, str, str]:
    """'"Dogs,"' → ('"', 'Dogs', ',"'): the word without its surrounding punctuation."""
    core = word.strip(string.punctuation)
    if not core:
        return word, "", ""
    start = word.index(core)
    return word[:start], core, word[start + len(core) :]


def synonym_replace(words: list[str], n: int, gen: torch.Generator) -> list[str]:
    """EDA's SR: up to n distinct words that have synonyms (in random order) are replaced, every
    occurrence, by one of their synonyms from the built-in table (xmodal.data.synonyms)."""
    from xmodal.data.synonyms import SYNONYMS

    keys = [_core(w)[1].lower() for w in words]
    candidates = sorted({k for k in keys if k in SYNONYMS})
    words = list(words)
    for j in torch.randperm(len(candidates), generator=gen)[:n].tolist():
        key = candidates[j]
        options = SYNONYMS[key]
        new = options[int(torch.randint(len(options), (1,), generator=gen))]
        for i, k in enumerate(keys):
            if k == key:
                pre, core, post = _core(words[i])
                words[i] = pre + (new[:1].upper() + new[1:] if core[:1].isupper() else new) + post
    return words


def random_swap(words: list[str], n: int, gen: torch.Generator) -> list[str]:
    """EDA's RS: n times, two distinct random positions swap their words."""
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(n):
        i = int(torch.randint(len(words), (1,), generator=gen))
        j = int(torch.randint(len(words) - 1, (1,), generator=gen))
        j += j >= i
        words[i], words[j] = words[j], words[i]
    return words


def eda(text: str, alpha: float, gen: torch.Generator) -> str:
    """EDA on one caption: one operation, picked with EDA_WEIGHTS, changes about α of its words —
    synonym replacement and random swap n = max(1, ⌊α·words⌋) times, random deletion drops each word with
    probability α (keeping at least one)."""
    words = text.split()
    if alpha <= 0 or not words:
        return text
    u = float(torch.rand(1, generator=gen)) * sum(EDA_WEIGHTS)
    op = next((o for o, c in zip(EDA_OPS, accumulate(EDA_WEIGHTS), strict=True) if u < c), EDA_OPS[-1])
    n = max(1, int(alpha * len(words)))
    if op == "synonym":
        return " ".join(synonym_replace(words, n, gen))
    if op == "swap":
        return " ".join(random_swap(words, n, gen))
    return drop_words(text, alpha, gen)
