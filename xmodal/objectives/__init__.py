"""Training objectives, one file per loss family, registered by name (`xmodal objectives` lists them)."""

from xmodal.objectives import (  # noqa: F401  (importing a family registers its objectives)
    captioning,
    continual,
    contrastive,
    distillation,
    geometry,
    hashing,
    late_interaction,
    masked_lm,
    matching,
    mixup,
    momentum,
    robust,
    supervised,
    weighted,
)
from xmodal.objectives.contrastive import clip_loss, siglip_loss
from xmodal.objectives.registry import REGISTRY, Composite, Features, Objective, gather_with_grad, register

__all__ = [
    "REGISTRY",
    "Composite",
    "Features",
    "Objective",
    "clip_loss",
    "gather_with_grad",
    "register",
    "siglip_loss",
]
