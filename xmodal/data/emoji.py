"""`emoji`: every fully-qualified emoji drawn with Noto Color Emoji, captioned with CLDR names and keywords.

A real-looking, license-clean image–text set that is on every Debian machine: ~3,700 images in ~100
subgroups and 9 groups (the zero-shot labels), with captions in any CLDR language (`langs`). Variants of
one emoji (skin tones) stay in one split, so the test split measures more than near-duplicate lookup.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xmodal.data.records import DataStats
from xmodal.errors import UserError
from xmodal.fsutil import write_text_atomic

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR_DIR = Path("/usr/share/unicode/cldr/common")
FONT_NAME = "NotoColorEmoji.ttf"
FONT_SIZE = 109  # the one size Noto's bitmap (CBDT) strikes come in
_CANVAS = 192  # glyphs are 136×128; room for anything slightly wider
_MAX_GLYPH_W = 150
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_LINE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([\w-]+)\s*#\s*(\S+)\s+E\d+\.\d+\s+(.+?)\s*$")


@dataclass
class Emoji:
    text: str
    name: str
    group: str | None
    subgroup: str | None
    captions: list[str] = field(default_factory=list)
    caption_langs: list[str] = field(default_factory=list)

    @property
    def codepoints(self) -> str:
        return " ".join(f"{ord(c):04X}" for c in self.text)

    @property
    def file_name(self) -> str:
        return "_".join(f"{ord(c):x}" for c in self.text) + ".png"

    @property
    def base(self) -> str:
        """The emoji without skin-tone modifiers: all tones of one emoji share a split."""
        return "".join(c for c in self.text if c not in _SKIN_TONES)


# -- sources ------------------------------------------------------------------------------------------------


def find_font(font: str | Path | None = None) -> Path:
    candidates = [Path(font)] if font else []
    if not font and os.environ.get("XMODAL_EMOJI_FONT"):
        candidates.append(Path(os.environ["XMODAL_EMOJI_FONT"]))
    if not font:
        candidates.append(Path("/usr/share/fonts/truetype/noto") / FONT_NAME)
        fonts = Path("/usr/share/fonts")
        candidates += sorted(fonts.rglob(FONT_NAME)) if fonts.is_dir() else []
    for c in candidates:
        if c.is_file():
            return c
    where = font or FONT_NAME
    raise UserError(f"{where}: emoji font not found; install the Debian package fonts-noto-color-emoji "
                    "(apt-get install fonts-noto-color-emoji) or pass --font")


def parse_emoji_test(path: Path) -> list[Emoji]:
    """Fully-qualified emoji with group and subgroup, in the file's (Unicode's) order."""
    out: list[Emoji] = []
    group = subgroup = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif line.strip() and not line.startswith("#"):
                m = _LINE.match(line)
                if m and m.group(2) == "fully-qualified":
                    text = "".join(chr(int(cp, 16)) for cp in m.group(1).split())
                    out.append(Emoji(text, m.group(4), group, subgroup))
    if not out:
        raise UserError(f"{path}: no fully-qualified emoji found; is it Unicode's emoji-test.txt?")
    return out


def _from_emoji_package() -> list[Emoji]:
    """Fallback when emoji-test.txt is missing: the `emoji` package has names and status, but no groups."""
    import emoji as emoji_pkg

    fq = emoji_pkg.STATUS["fully_qualified"]
    out = [Emoji(e, d["en"].strip(":").replace("_", " "), None, None)
           for e, d in emoji_pkg.EMOJI_DATA.items() if d.get("status") == fq]
    return sorted(out, key=lambda e: [ord(c) for c in e.text])


def read_annotations(cldr_dir: Path, lang: str) -> dict[str, tuple[str | None, list[str]]]:
    """CLDR annotations (plus derived: skin tones, flags…) → {emoji without FE0F: (tts name, keywords)}."""
    out: dict[str, tuple[str | None, list[str]]] = {}
    files = [cldr_dir / "annotations" / f"{lang}.xml", cldr_dir / "annotationsDerived" / f"{lang}.xml"]
    if not files[0].is_file():
        raise UserError(f"{files[0]}: no CLDR annotations for language {lang!r}; check --langs (e.g. de,fr) "
                        "or install the Debian package unicode-cldr-core")
    for path in files:
        if not path.is_file():
            continue
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise UserError(f"{path}: not valid XML ({e}); reinstall unicode-cldr-core") from e
        for node in root.iter("annotation"):
            cp, text = node.get("cp"), (node.text or "").strip()
            if not cp or not text or "↑↑↑" in text:  # ↑↑↑ = inherited from a parent locale: no own text
                continue
            key = cp.replace("\ufe0f", "")
            name, words = out.get(key, (None, []))
            if node.get("type") == "tts":
                name = text
            else:
                words = [w.strip() for w in text.split("|") if w.strip()]
            out[key] = (name, words)
    return out


def _add_captions(e: Emoji, ann: dict[str, tuple[str | None, list[str]]], lang: str,
                  fallback_name: bool) -> None:
    name, words = ann.get(e.text.replace("\ufe0f", ""), (None, []))
    name = name or (e.name if fallback_name else None)
    words = [w for w in words if w.casefold() != (name or "").casefold()]
    new = ([name] if name else []) + ([", ".join(words)] if words else [])
    for c in new:
        if c not in e.captions:
            e.captions.append(c)
            e.caption_langs.append(lang)


# -- rendering ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_SIZE)


def render(text: str, font_path: str, image_size: int) -> Image.Image | None:
    """Emoji → RGB image_size² on white, centred and scaled to fill; None when the font cannot draw it
    (nothing drawn, or a sequence drawn as several glyphs side by side)."""
    font = _font(font_path)
    layer = Image.new("RGBA", (_CANVAS, _CANVAS), (255, 255, 255, 0))
    draw = ImageDraw.Draw(layer)
    draw.text((_CANVAS // 2, _CANVAS // 2), text, font=font, anchor="mm", embedded_color=True)
    box = layer.getchannel("A").getbbox()
    if box is None:
        return None
    w, h = box[2] - box[0], box[3] - box[1]
    if w > _MAX_GLYPH_W:  # a sequence the font lacks, drawn as two or more glyphs in a row
        return None
    side = int(max(w, h) * 1.08) + 2  # a thin white margin
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(layer.crop(box), ((side - w) // 2, (side - h) // 2))
    return square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)


def _render_to(job: tuple[str, str, int, str]) -> bool:
    text, font_path, size, out = job
    img = render(text, font_path, size)
    if img is None or not (np.asarray(img) < 250).any():
        return False
    img.save(out, format="PNG", compress_level=1)
    return True


def _render_all(jobs: list[tuple[str, str, int, str]], workers: int | None) -> list[bool]:
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers <= 1 or len(jobs) < 500:
        return [_render_to(j) for j in jobs]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        return pool.map(_render_to, jobs, chunksize=32)


# -- the dataset ----------------------------------------------------------------------------------------


def make_emoji(out: str | Path, image_size: int = 64, langs: list[str] | tuple[str, ...] = (), seed: int = 0,
               val_frac: float = 0.1, test_frac: float = 0.1, *, limit: int | None = None,
               font: str | Path | None = None, emoji_test: str | Path | None = None,
               cldr_dir: str | Path | None = None, workers: int | None = None,
               stats: DataStats | None = None) -> dict[str, Path]:
    """Render the emoji set under out (images/*.png, train/val/test.jsonl). label = the emoji's group.

    Captions: the English name and the CLDR keywords, plus the same for each of `langs`; records then carry
    "caption_langs" (one language per caption). `limit` renders an evenly spread subset (for tests)."""
    if image_size < 8:
        raise UserError(f"--image-size: must be at least 8, got {image_size}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise UserError("--val-frac/--test-frac: must be in [0, 1) and sum to less than 1")
    stats = stats if stats is not None else DataStats()
    font_path = find_font(font)
    test_path = Path(emoji_test) if emoji_test else EMOJI_TEST
    if test_path.is_file():
        emojis = parse_emoji_test(test_path)
    elif emoji_test:
        raise UserError(f"{test_path}: not found; install the Debian package unicode-data or omit "
                        "--emoji-test")
    else:
        emojis = _from_emoji_package()  # no groups: labels stay empty
    if limit is not None and limit < len(emojis):
        emojis = [emojis[int(i)] for i in np.linspace(0, len(emojis) - 1, max(limit, 0))]

    cldr = Path(cldr_dir) if cldr_dir else CLDR_DIR
    en = read_annotations(cldr, "en") if (cldr / "annotations" / "en.xml").is_file() else {}
    extra_langs = [lang.strip() for lang in langs if lang.strip() and lang.strip() != "en"]
    others = {lang: read_annotations(cldr, lang) for lang in extra_langs}
    for e in emojis:
        _add_captions(e, en, "en", fallback_name=True)
        for lang, ann in others.items():
            _add_captions(e, ann, lang, fallback_name=False)

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(e.text, str(font_path), image_size, str(out / "images" / e.file_name)) for e in emojis]
    ok = _render_all(jobs, workers)
    stats.add("emoji_not_in_font", ok.count(False))
    drawn = [e for e, good in zip(emojis, ok, strict=True) if good]

    split_of = _split(drawn, seed, val_frac, test_frac)
    paths = {}
    for split in ("train", "val", "test"):
        rows = [_row(e, bool(extra_langs)) for e in drawn if split_of[e.base] == split]
        paths[split] = out / f"{split}.jsonl"
        write_text_atomic(paths[split], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


def _split(emojis: list[Emoji], seed: int, val_frac: float, test_frac: float) -> dict[str, str]:
    bases = sorted({e.base for e in emojis})
    order = np.random.default_rng(seed).permutation(len(bases))
    n_test, n_val = round(len(bases) * test_frac), round(len(bases) * val_frac)
    split = {}
    for rank, i in enumerate(order):
        split[bases[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def _row(e: Emoji, multilingual: bool) -> dict:
    row = {"image": f"images/{e.file_name}", "caption": e.captions, "label": e.group}
    if multilingual:
        row["caption_langs"] = e.caption_langs
    else:
        row["lang"] = "en"
    row.update({"emoji": e.text, "name": e.name, "subgroup": e.subgroup, "codepoints": e.codepoints})
    return row
