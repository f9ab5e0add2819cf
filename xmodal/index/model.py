"""What an index records about its embedding model, so that the model can be found again.

A bare config name (e.g. `xm-micro`) without weights is a seeded random init in `load_encoder`, so an index
built that way (tests, demos) can still be searched by text later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def has_weights(source: str | Path, pretrained: str | None) -> bool:
    return bool(pretrained) or Path(source).is_dir()


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
