"""Safe image decoding: any file or byte string → an 8-bit RGB PIL image, or None with the reason counted.

Crawled image collections always hold some broken, exotic or hostile files; one of them must never end
a long preprocessing run. The pixel count is checked from the header before any pixel is decoded, so a
decompression bomb costs nothing; big JPEGs are decoded downscaled by the JPEG decoder itself (draft).
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from xmodal.data.records import DataStats

_JPEG_SCALES = (2, 4, 8)  # the reductions libjpeg can decode directly (Image.draft)
_pil_limit_lock = threading.Lock()


def _open(fp: BinaryIO) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(fp)
        except Image.DecompressionBombError:
            # PIL refuses sizes over 2×MAX_IMAGE_PIXELS before we can look; our own limit (and JPEG draft)
            # decides instead. Reading the header is cheap: nothing is decoded here.
            with _pil_limit_lock:
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    fp.seek(0)
                    return Image.open(fp)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved


def _fit_limit(img: Image.Image, max_pixels: int) -> bool:
    """Bring img under max_pixels before decoding; False when that is impossible (not a JPEG, or too big)."""
    w, h = img.size
    if w * h <= max_pixels:
        return True
    if img.format not in ("JPEG", "MPO"):  # MPO = multi-picture JPEG (phone cameras)
        return False
    for s in _JPEG_SCALES:
        tw, th = math.ceil(w / s), math.ceil(h / s)
        if tw * th <= max_pixels:
            img.draft(None, (tw, th))
            return img.size[0] * img.size[1] <= max_pixels
    return False


def _scale_to_uint8(img: Image.Image) -> Image.Image:
    """16-bit ("I;16*", "I") and float ("F") greyscale → "L", scaled (65535 → 255, 32768 → 128).

    PIL's own convert("L") clips 16-bit values at 255, which turns most 16-bit images white."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        out = np.clip(np.rint(a), 0, 255)
    else:
        a = np.clip(a.astype(np.int64), 0, 65535)
        out = (a * 255 + 32767) // 65535  # round half up: exact integer arithmetic
    return Image.fromarray(out.astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. Transparency is composited on white (how a viewer shows it)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _scale_to_uint8(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode == "CMYK":
        img = _cmyk_to_rgb(img)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when there is one (print CMYK is not simply 255-C); else PIL's formula."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile falls back to the plain conversion
            pass
    return img.convert("RGB")


def decode_pixels(img: Image.Image) -> Image.Image:
    """An opened image's pixels, turned upright by its EXIF orientation, as RGB. Raises on corrupt data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation / EXIF / palette warnings: errors are what count
        img.load()
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
            pass
        return to_rgb(img)


def load_image(src: str | bytes, stats: DataStats | None = None,
               max_pixels: int = 64_000_000) -> Image.Image | None:
    """Decode src (path or bytes) to 8-bit RGB. Never raises for bad image data: returns None and counts
    the reason in stats ("missing_image", "unreadable_image", "corrupt_image", "too_large")."""
    stats = stats if stats is not None else DataStats()
    try:
        fp = io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")  # noqa: SIM115
    except FileNotFoundError:
        stats.add("missing_image")
        return None
    except OSError:
        stats.add("unreadable_image")
        return None
    with fp:  # the file is closed whatever happens; the decoded image no longer needs it
        try:
            img = _open(fp)
        except Exception:  # noqa: BLE001 - unidentified, unreadable, malformed header: all one outcome
            stats.add("corrupt_image")
            return None
        try:
            if not _fit_limit(img, max_pixels):
                stats.add("too_large")
                return None
            return decode_pixels(img)
        except Exception:  # noqa: BLE001 - truncated or corrupt pixel data, or any decoder failure
            stats.add("corrupt_image")
            return None
