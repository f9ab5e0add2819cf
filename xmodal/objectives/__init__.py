"""Training objectives, one file per loss family, registered by name (`xmodal objectives` lists them).

The families load on first use (PEP 562, and `registry` loads them before any lookup by name), so importing
`xmodal.objectives` — as the CLI does for its help — imports no torch."""

import importlib
from typing import Any

FAMILIES = (
    "captioning",
    "continual",
    "contrastive",
    "distillation",
    "geometry",
    "hashing",
    "late_interaction",
    "masked_lm",
    "matching",
    "mixup",
    "momentum",
    "robust",
    "supervised",
    "weighted",
)
_EXPORTS = {
    "REGISTRY": "registry",
    "Composite": "registry",
    "Features": "registry",
    "Objective": "registry",
    "clip_loss": "contrastive",
    "gather_with_grad": "registry",
    "register": "registry",
    "siglip_loss": "contrastive",
}

__all__ = sorted(_EXPORTS)


def load_families() -> None:
    """Import every family, which registers its objectives (cheap after the first call)."""
    for f in FAMILIES:
        importlib.import_module(f"xmodal.objectives.{f}")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        load_families()
        return getattr(importlib.import_module(f"xmodal.objectives.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'xmodal.objectives' has no attribute {name!r}")
