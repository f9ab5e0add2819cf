"""`shapes`: a procedural image–caption set a tiny model learns in CPU minutes, with a compositional probe.

Images hold one or two coloured shapes; captions name each shape's size, colour and kind and, for two
shapes, their spatial relation. Because every caption is generated from a known scene, exact hard negatives
can be made by changing one thing (an attribute, the relation, an object), which is what `probe.jsonl` tests:
does the model bind attributes to objects and read relations, or only bag the words?
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xmodal.errors import UserError
from xmodal.fsutil import write_text_atomic

KINDS = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SIZES = {"small": 0.1, "large": 0.17}  # radius as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_SPLITS = ("train", "val", "test")
_SINGLE_FRAC = 0.3  # share of images with one shape
_SUPERSAMPLE = 4  # draw large, then downsample: smooth edges at 64 px
_BACKGROUND = 45  # dark grey: every colour, yellow included, stands out


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str

    def words(self) -> str:
        return f"{self.size} {self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """One image: one or two shapes (a, b) with "a <relation> b", plus the jitter that places them."""

    a: Shape
    b: Shape | None
    relation: str | None
    jitter: tuple[float, ...]  # position/size jitter in [-1, 1]
    noise_seed: int


def _sample_scene(rng: np.random.Generator) -> Scene:
    def shape(exclude_kind: str | None = None, exclude_color: str | None = None) -> Shape:
        kinds = [k for k in KINDS if k != exclude_kind]
        colors = [c for c in COLORS if c != exclude_color]
        return Shape(kinds[rng.integers(len(kinds))], colors[rng.integers(len(colors))],
                     list(SIZES)[rng.integers(len(SIZES))])

    a = shape()
    jitter = tuple(float(x) for x in rng.uniform(-1, 1, 6))
    noise_seed = int(rng.integers(2**31))
    if rng.random() < _SINGLE_FRAC:
        return Scene(a, None, None, jitter, noise_seed)
    # the two shapes differ in kind and colour, so a swapped caption is never also true
    b = shape(exclude_kind=a.kind, exclude_color=a.color)
    return Scene(a, b, RELATIONS[rng.integers(len(RELATIONS))], jitter, noise_seed)


# -- captions -------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """The canonical caption: "a small red circle left of a large blue square" / "a large green triangle"."""
    if scene.b is None:
        return f"a {scene.a.words()}"
    return f"a {scene.a.words()} {scene.relation} a {scene.b.words()}"


def captions(scene: Scene) -> list[str]:
    """2–3 paraphrases: canonical, a wordier one, and (for two shapes) the inverse relation."""
    a = scene.a
    if scene.b is None:
        return [caption(scene), f"a picture of a {a.words()}", f"a {a.size} {a.kind} in {a.color}"]
    b, rel = scene.b, scene.relation
    assert rel is not None
    wordy = {"left of": "to the left of", "right of": "to the right of", "above": "over", "below": "under"}
    return [caption(scene), f"a {a.words()} {wordy[rel]} a {b.words()}",
            f"{b.words()} {_INVERSE[rel]} {a.words()}"]


def negatives(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """One hard negative per type for a two-shape scene; each differs from every true caption."""
    assert scene.b is not None and scene.relation is not None
    a, b = scene.a, scene.b
    swapped = Scene(Shape(a.kind, b.color, a.size), Shape(b.kind, a.color, b.size), scene.relation, (), 0)
    relation = Scene(a, b, _INVERSE[scene.relation], (), 0)
    others = [k for k in KINDS if k not in (a.kind, b.kind)]
    new_kind = others[rng.integers(len(others))]
    obj = (Scene(Shape(new_kind, a.color, a.size), b, scene.relation, (), 0) if rng.random() < 0.5
           else Scene(a, Shape(new_kind, b.color, b.size), scene.relation, (), 0))
    out = [{"caption": caption(s), "type": t} for s, t in ((swapped, "attribute"), (relation, "relation"),
                                                              (obj, "object"))]
    true = set(captions(scene))
    assert all(n["caption"] not in true for n in out)
    return out


# -- drawing ----------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = r * 0.88  # equal visual weight to the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif kind == "triangle":
        draw.regular_polygon((cx, cy + r * 0.15, r * 1.15), 3, fill=fill)
    elif kind == "star":
        pts = []
        for i in range(10):
            ang = -math.pi / 2 + i * math.pi / 5
            rr = r * 1.1 if i % 2 == 0 else r * 0.48
            pts.append((cx + rr * math.cos(ang), cy + rr * math.sin(ang)))
        draw.polygon(pts, fill=fill)
    elif kind == "cross":
        t = r * 0.36
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(kind)


def _layout(scene: Scene) -> list[tuple[Shape, float, float, float]]:
    """Shapes with centre and radius in unit coordinates: relation clear, no overlap, mild jitter."""
    j = scene.jitter
    radius = [SIZES[s.size] * (1 + 0.08 * j[5]) for s in (scene.a, scene.b) if s is not None]
    if scene.b is None:
        return [(scene.a, 0.5 + 0.15 * j[0], 0.5 + 0.15 * j[1], radius[0])]
    main, cross = 0.25 + 0.04 * j[0], 0.5 + 0.08 * j[1]  # first shape in one half, the other opposite
    other, cross_b = 0.75 + 0.04 * j[2], 0.5 + 0.08 * j[3]
    if scene.relation in ("right of", "below"):
        main, other = 1 - main, 1 - other
    if scene.relation in ("left of", "right of"):
        return [(scene.a, main, cross, radius[0]), (scene.b, other, cross_b, radius[1])]
    return [(scene.a, cross, main, radius[0]), (scene.b, cross_b, other, radius[1])]


def render(scene: Scene, image_size: int) -> Image.Image:
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(img)
    for shape, x, y, r in _layout(scene):
        _draw_shape(draw, shape.kind, x * big, y * big, r * big, COLORS[shape.color])
    small = np.asarray(img.reduce(_SUPERSAMPLE), dtype=np.int16)  # box filter: fast and smooth
    noise = np.random.default_rng(scene.noise_seed).integers(-6, 7, small.shape, dtype=np.int16)
    return Image.fromarray(np.clip(small + noise, 0, 255).astype(np.uint8))


def _render_to(job: tuple[Scene, int, str]) -> None:
    scene, size, path = job
    render(scene, size).save(path, format="PNG", compress_level=1)  # fast; noise barely compresses


# -- the dataset ----------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _scene_row(scene: Scene, image: str) -> dict:
    shapes = [s for s in (scene.a, scene.b) if s is not None]
    return {"image": image, "caption": captions(scene), "label": scene.a.kind,
            "shapes": [{"kind": s.kind, "color": s.color, "size": s.size} for s in shapes],
            "relation": scene.relation}


def make_shapes(out: str | Path, n_train: int = 5000, n_val: int = 500, n_test: int = 1000,
                image_size: int = 64, seed: int = 0, workers: int | None = None) -> dict[str, Path]:
    """Write images/<split>/NNNNNN.png and train/val/test/probe.jsonl under out. Same seed → same bytes.

    probe.jsonl has one line per two-shape test image: its canonical caption and one attribute, relation and
    object negative (single-shape images have no relation to swap, so they are left out)."""
    for name, n in (("--n-train", n_train), ("--n-val", n_val), ("--n-test", n_test)):
        if n < 0:
            raise UserError(f"{name}: must be ≥ 0, got {n}")
    if image_size < 16:
        raise UserError(f"--image-size: at least 16 pixels are needed to tell shapes apart, got {image_size}")
    out = Path(out)
    paths: dict[str, Path] = {}
    jobs: list[tuple[Scene, int, str]] = []
    scenes: dict[str, list[Scene]] = {}
    for split_id, (split, n) in enumerate(zip(_SPLITS, (n_train, n_val, n_test), strict=True)):
        rng = np.random.default_rng([seed, split_id])  # one stream per split: n_train changes no other split
        scenes[split] = [_sample_scene(rng) for _ in range(n)]
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        jobs += [(s, image_size, str(folder / f"{i:06d}.png")) for i, s in enumerate(scenes[split])]
    _run(jobs, workers)
    for split in _SPLITS:
        rows = [_scene_row(s, f"images/{split}/{i:06d}.png") for i, s in enumerate(scenes[split])]
        paths[split] = out / f"{split}.jsonl"
        _write_jsonl(paths[split], rows)
    rng = np.random.default_rng([seed, 99])
    probe = [{"image": f"images/test/{i:06d}.png", "caption": caption(s), "negatives": negatives(s, rng)}
             for i, s in enumerate(scenes["test"]) if s.b is not None]
    paths["probe"] = out / "probe.jsonl"
    _write_jsonl(paths["probe"], probe)
    return paths


def _run(jobs: list[tuple[Scene, int, str]], workers: int | None) -> None:
    """Render in a process pool for big sets (10k images: seconds); inline for small ones."""
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers <= 1 or len(jobs) < 2000:
        for job in jobs:
            _render_to(job)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        for _ in pool.imap_unordered(_render_to, jobs, chunksize=64):
            pass
