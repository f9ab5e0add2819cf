"""`digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download) as an image–text set.

Each 8×8 scan is upsampled (bicubic) to an RGB image, dark ink on white; its captions are a few templates
filled with the digit ("a handwritten digit seven", "the number 7", …); label = the digit ("0"–"9"). The
train/val/test split is seeded and stratified by digit. Every caption names only the class, so many test
images share each caption: retrieval on this set is best read with identical-caption positives
(`xmodal eval --positives caption`), and zero-shot accuracy is the natural headline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from xmodal.errors import UserError
from xmodal.fsutil import write_text_atomic

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}",
    "a handwritten {digit}",
    "the digit {word}, written by hand",
    "a scan of a handwritten {word}",
    "a small picture of the number {word}",
)
CAPTIONS_PER_IMAGE = 3
_SPLITS = ("train", "val", "test")


def captions_for(digit: int, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`n` distinct templates (seeded choice, template order kept) filled with the digit and its word."""
    pick = np.sort(rng.choice(len(TEMPLATES), size=min(n, len(TEMPLATES)), replace=False))
    return [TEMPLATES[int(i)].format(word=WORDS[digit], digit=digit) for i in pick]


def render(pixels: np.ndarray, image_size: int) -> Image.Image:
    """One 8×8 scan (values 0–16, ink high) → image_size² RGB, dark ink on white, bicubic upsampling."""
    ink = np.clip(pixels.astype(np.float32) * (255.0 / 16.0), 0, 255)
    small = Image.fromarray((255 - ink).round().astype(np.uint8), mode="L")
    return small.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")


def split_indices(targets: np.ndarray, seed: int, val_frac: float, test_frac: float) -> dict[str, np.ndarray]:
    """Stratified split: within each digit a seeded permutation; the first test_frac go to test, the
    next val_frac to val, the rest to train. Indices are returned sorted."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in _SPLITS}
    for d in range(10):
        idx = np.flatnonzero(targets == d)
        idx = idx[rng.permutation(len(idx))]
        n_test, n_val = round(len(idx) * test_frac), round(len(idx) * val_frac)
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test : n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val :].tolist()
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}


def make_digits(
    out: str | Path,
    image_size: int = 64,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
) -> dict[str, Path]:
    """Write images/NNNN.png (NNNN = the sklearn index) and train/val/test.jsonl under out.
    Same arguments → same bytes."""
    if image_size < 8:
        raise UserError(f"--image-size: at least the scans' 8 pixels, got {image_size}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise UserError("--val-frac/--test-frac: must be in [0, 1) and sum to less than 1")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise UserError("the digits data set needs scikit-learn (pip install scikit-learn)") from e

    digits = load_digits()  # bundled with scikit-learn: no download
    images, targets = digits.images, digits.target.astype(np.int64)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cap_rng = np.random.default_rng([seed, 1])
    caps = [captions_for(int(t), cap_rng) for t in targets]
    for i, px in enumerate(images):
        render(px, image_size).save(out / "images" / f"{i:04d}.png", format="PNG", compress_level=1)
    paths = {}
    for split, idx in split_indices(targets, seed, val_frac, test_frac).items():
        rows = [
            {
                "image": f"images/{i:04d}.png",
                "caption": caps[i],
                "label": str(int(targets[i])),
                "digit_word": WORDS[int(targets[i])],
                "sklearn_index": int(i),
            }
            for i in idx.tolist()
        ]
        paths[split] = out / f"{split}.jsonl"
        write_text_atomic(paths[split], "".join(json.dumps(r) + "\n" for r in rows))
    return paths
