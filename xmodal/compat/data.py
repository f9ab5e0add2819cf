"""What `xmodal compat fit` embeds: every distinct caption of a manifest under both models (cheap: no
image is decoded), and a seeded sample of a few image-caption pairs (each image with one of its captions)."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.errors import UserError


@dataclass
class FitData:
    """Row-aligned embeddings of the same texts (and pair images) under the old and the new model."""

    texts: list[str]
    new_text: np.ndarray
    old_text: np.ndarray
    new_image: np.ndarray | None = None
    old_image: np.ndarray | None = None
    pair_text_index: np.ndarray | None = None  # image i's caption is texts[pair_text_index[i]]
    pair_keys: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # pair images that did not decode, by reason

    @property
    def n_pairs(self) -> int:
        return 0 if self.new_image is None else len(self.new_image)

    @property
    def embedded(self) -> dict[str, dict[str, int]]:
        """The cost: how many texts and images each model embedded."""
        one = {"texts": len(self.texts), "images": self.n_pairs}
        return {"old": dict(one), "new": dict(one)}


def _log(msg: str) -> None:
    print(f"[compat] {msg}", file=sys.stderr, flush=True)


def embed_for_fit(
    old: Any,
    new: Any,
    manifest: str | Path,
    *,
    pairs: int = 256,
    seed: int = 0,
    batch_size: int = 256,
    image_key: str | None = None,
    caption_key: str | None = None,
    log: Callable[[str], None] = _log,
) -> FitData:
    """Embed the distinct captions of `manifest` with both encoders, and `pairs` seeded random images (one
    seeded caption each; 0 = text only). Images that fail to decode are skipped and counted."""
    from xmodal.data import read_records
    from xmodal.data.records import DataStats

    stats = DataStats()
    records = read_records(manifest, image_key=image_key, caption_key=caption_key, stats=stats)
    texts = list(dict.fromkeys(c for r in records for c in r.captions if c and c.strip()))
    if not texts:
        raise UserError(f"--data {manifest}: no captions to fit a projection on")
    log(f"embedding {len(texts)} distinct captions with both models")
    out = FitData(
        texts=texts,
        new_text=new.encode_texts(texts, batch_size=batch_size).numpy(),
        old_text=old.encode_texts(texts, batch_size=batch_size).numpy(),
    )
    if pairs <= 0:
        return out
    rng = random.Random(seed)
    withcap = [r for r in records if any(c and c.strip() for c in r.captions)]
    chosen = sorted(rng.sample(range(len(withcap)), min(pairs, len(withcap))))
    sample = [withcap[i] for i in chosen]
    caps = [rng.choice([c for c in r.captions if c and c.strip()]) for r in sample]
    import torch

    from xmodal.index.embed import collection_from_records

    coll = collection_from_records(sample, source=str(manifest))
    log(f"embedding {len(sample)} image-caption pairs with both models")
    by_size: dict[int, Any] = {}  # decoded once per input size (the two models may differ)
    ok_all = np.ones(len(sample), dtype=bool)
    for enc in (new, old):
        size = int(enc.image_size)
        if size not in by_size:
            images, ok, _, skipped = coll.load(0, len(sample), size, 0)
            by_size[size] = images
            ok_all &= ok
            out.skipped = out.skipped or dict(skipped)
    keep = np.flatnonzero(ok_all)
    if not len(keep):
        why = ", ".join(f"{v} {k}" for k, v in out.skipped.items()) or "none decoded"
        raise UserError(f"--data {manifest}: none of the {len(sample)} sampled images decoded ({why})")
    sel = torch.from_numpy(keep)
    out.new_image = new.encode_images(by_size[int(new.image_size)][sel], batch_size=batch_size).numpy()
    out.old_image = old.encode_images(by_size[int(old.image_size)][sel], batch_size=batch_size).numpy()
    row = {t: i for i, t in enumerate(texts)}
    out.pair_text_index = np.array([row[caps[i]] for i in keep], dtype=np.int64)
    out.pair_keys = [sample[i].key for i in keep]
    return out
