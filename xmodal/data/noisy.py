"""Noisy-correspondence variants of a dataset: a fraction of the items trade captions among themselves.

Web image–text data has mismatched pairs; objectives that claim robustness to them (soft targets,
down-weighting, momentum distillation) are tested by corrupting a clean training set in a known way. A
seeded `fraction` of the items is picked and their captions are permuted by a random cycle, so every
picked item ends up with another item's captions (and their languages); images, labels and other fields
stay. Each output row says whether it was shuffled (`noisy`) and whose captions it now has
(`caption_from`), and a side file `OUT_STEM.noisy.json` lists the keys, so an evaluation knows exactly
which pairs are wrong. Only the given manifest changes: keep the test split clean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.records import DataStats, Record, read_records
from xmodal.errors import UserError
from xmodal.fsutil import write_text_atomic


def cyclic_permutation(k: int, rng: np.random.Generator) -> list[int]:
    """A uniformly random k-cycle (Sattolo's algorithm): p[i] != i for every i when k ≥ 2."""
    p = list(range(k))
    for i in range(k - 1, 0, -1):
        j = int(rng.integers(i))  # 0 … i-1: never i itself
        p[i], p[j] = p[j], p[i]
    return p


def side_file(out: str | Path) -> Path:
    """Where make_noisy records the shuffled keys: OUT_STEM.noisy.json beside the manifest."""
    out = Path(out)
    return out.with_name(out.stem + ".noisy.json")


def _image_field(rec: Record, folder: Path) -> str:
    if isinstance(rec.image, bytes):
        raise UserError(
            f"{rec.key}: images stored inside shards; the noisy variant writes a JSONL manifest that "
            "points at image files, so unpack the shards first"
        )
    return Path(os.path.relpath(os.path.abspath(rec.image), os.path.abspath(folder))).as_posix()


def make_noisy(
    manifest: str | Path,
    out: str | Path,
    fraction: float = 0.3,
    seed: int = 0,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
) -> dict[str, Any]:
    """Write `out` (JSONL: image paths relative to its folder) with `fraction` of the items' captions
    shuffled among them, and the side file. Returns a summary (paths, counts, the keys)."""
    if not 0 <= fraction <= 1:
        raise UserError(f"--fraction {fraction}: a share of the items, in [0, 1]")
    src, out = Path(manifest), Path(out)
    if not src.exists():
        raise UserError(f"{manifest}: file not found")
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: the noisy manifest is written as JSONL; name it *.jsonl")
    if out.exists() and src.is_file() and out.resolve() == src.resolve():
        raise UserError(f"--out {out}: is the input manifest; write the noisy variant to a new file")
    stats = DataStats()
    records = read_records(
        str(src), image_key=image_key, caption_key=caption_key, label_key=label_key, stats=stats
    )
    n = len(records)
    k = round(fraction * n)
    if fraction > 0 and k < 2:
        raise UserError(
            f"--fraction {fraction}: {fraction} of {n} items is {k}; at least 2 are needed to trade captions"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    images = [_image_field(r, out.parent) for r in records]
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=k, replace=False)).tolist() if k else []
    source_of = {i: i for i in range(n)}  # item → the item whose captions it gets
    for j, p in enumerate(cyclic_permutation(k, rng)):
        source_of[picked[j]] = picked[p]

    rows, shuffled, changed = [], [], []
    for i, rec in enumerate(records):
        donor = records[source_of[i]]
        row: dict[str, Any] = {"image": images[i], "caption": list(donor.captions)}
        if rec.label is not None:
            row["label"] = rec.label
        if donor.lang is not None:
            row["lang"] = donor.lang
        extra = {k_: v for k_, v in rec.extra.items() if k_ not in ("caption_langs", "noisy", "caption_from")}
        if "caption_langs" in donor.extra:
            extra["caption_langs"] = donor.extra["caption_langs"]
        row.update(extra)
        moved = source_of[i] != i
        row["noisy"] = moved
        row["caption_from"] = images[source_of[i]] if moved else None
        if moved:
            shuffled.append(images[i])
            if sorted(donor.captions) != sorted(rec.captions):
                changed.append(images[i])
        rows.append(row)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = {
        "source": str(src),
        "manifest": str(out),
        "fraction": fraction,
        "seed": seed,
        "n_items": n,
        "n_shuffled": len(shuffled),
        "n_changed": len(changed),
        "skipped": stats.as_dict(),
        "shuffled": shuffled,  # keys (image paths as written in `out`) whose captions came from another item
        "changed": changed,  # of those, the ones whose captions now differ from their own (truly noisy)
    }
    side = side_file(out)
    write_text_atomic(side, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    summary["side_file"] = str(side)
    return summary
