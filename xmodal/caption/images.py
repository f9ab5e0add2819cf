"""Captioning image files given on the command line, and the batching both caption modes share.

Nucleus sampling is seeded per batch from `--seed` and the batch's position, so a caption depends only on
the options and the image's place in the input — not on how a resumed manifest run was chunked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from xmodal.errors import UserError

_WHY = {
    "missing_image": "image not found; check the path",
    "unreadable_image": "cannot be read (check the permissions)",
    "corrupt_image": "not a readable image (corrupt, truncated or an unknown format)",
    "too_large": "image too large to decode (over the decompression-bomb limit)",
}


def batch_seed(seed: int, position: int) -> int:
    """The sampler seed of the batch that starts at item `position` (distinct batches, distinct streams)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{position}".encode()).digest()[:7], "big")


def caption_uint8(
    encoder: Any, images: Any, decoding: Any, batch_size: int = 64, start: int = 0
) -> list[str]:
    """A caption per uint8 image (N×3×S×S at the model's size). `start` is the first image's position in
    the whole input (it seeds --top-p batches)."""
    from xmodal.models.captioner import caption_images

    if decoding.top_p is None:
        return caption_images(encoder, images, decoding, batch_size=batch_size)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        d = replace(decoding, seed=batch_seed(decoding.seed, start + i))
        out += caption_images(encoder, images[i : i + batch_size], d, batch_size=batch_size)
    return out


def read_image_files(paths: Sequence[str]) -> list[Any]:
    """Decode image files (RGB PIL images) through xmodal's decoder, before the (slow) model load: a
    missing or unreadable one is a UserError naming it."""
    from xmodal.data import DataStats, load_image

    out = []
    for p in paths:
        if Path(p).exists() and not Path(p).is_file():
            raise UserError(f"{p}: not a file; give image files (or a manifest with --data)")
        stats = DataStats()
        img = load_image(p, stats)
        if img is None:
            reason = next(iter(stats.counts), "corrupt_image")
            raise UserError(f"{p}: {_WHY.get(reason, reason)}")
        out.append(img)
    return out


def to_uint8(images: Sequence[Any], paths: Sequence[str], size: int) -> Any:
    """Decoded images → uint8 N×3×size×size (resized and centre-cropped as everywhere in xmodal)."""
    import torch

    from xmodal.data import resize_center_crop

    out = []
    for img, p in zip(images, paths, strict=True):
        try:
            out.append(resize_center_crop(img, size))
        except Exception as e:  # noqa: BLE001 - an image PIL opened but cannot resize
            raise UserError(f"{p}: {_WHY['corrupt_image']}") from e
    return torch.stack(out)
