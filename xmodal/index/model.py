"""Loading the embedding model an index records, reproducibly.

A bare config name (e.g. `xm-micro`) without weights builds a randomly initialised model; we seed that
initialisation so the same name always gives the same model — an index built that way (tests, demos) can
then still be searched by text later. Real use passes a run dir, an export dir, or --pretrained weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

RANDOM_INIT_SEED = 0


def has_weights(source: str | Path, pretrained: str | None) -> bool:
    return bool(pretrained) or Path(source).is_dir()


def load_model(source: str | Path, pretrained: str | None = None, device: str | None = None) -> Any:
    """`xmodal.models.load_encoder`, with a fixed seed when the model would be randomly initialised."""
    from xmodal.models import load_encoder

    if has_weights(source, pretrained):
        return load_encoder(source, pretrained=pretrained, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return load_encoder(source, pretrained=None, device=device)


def describe_source(source: str | Path, pretrained: str | None) -> dict[str, Any]:
    """What index.json records so the model can be found again: absolute paths where they are paths."""
    src = Path(source)
    rec = {
        "source": str(src.absolute()) if src.exists() else str(source),
        "pretrained": str(Path(pretrained).absolute())
        if pretrained and Path(pretrained).exists()
        else pretrained,
        "seeded_random_init": not has_weights(source, pretrained),
    }
    return rec
