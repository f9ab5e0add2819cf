"""Decoding an uploaded query image: five formats only, limits checked from the header before decoding.

Only PNG, JPEG, WebP, GIF and BMP are ever tried (`Image.open(..., formats=...)`): PIL's other plugins are
not reached at all, so EPS (rendered by Ghostscript, an interpreter) and exotic decoders are no attack
surface here."""

from __future__ import annotations

import io
import math
import warnings

from PIL import Image
from starlette.exceptions import HTTPException

from xmodal.serve.middleware import TooLarge

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # PIL format names, tried in this order
MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
ACCEPTED_NAMES = "PNG, JPEG, WebP, GIF or BMP"
_JPEG_SCALES = (2, 4, 8)  # reductions libjpeg decodes directly (Image.draft)


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes → RGB PIL image, or a 400/413 HTTPException (bombs are refused from the header)."""
    from xmodal.data.decode import decode_pixels

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise TooLarge(f"image over {max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 - anything these five decoders do not identify is refused
        raise HTTPException(400, f"file: not a {ACCEPTED_NAMES} image (other formats are refused)") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise HTTPException(400, f"file: the image is {w}×{h} pixels")
    if w * h > max_pixels and not _draft_under(img, max_pixels):
        raise TooLarge(f"image is {w}×{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        return decode_pixels(img)
    except Exception:  # noqa: BLE001 - truncated or corrupt pixel data, or any decoder failure
        raise HTTPException(400, "file: not a decodable image (corrupt or truncated)") from None


def _draft_under(img: Image.Image, max_pixels: int) -> bool:
    """Big JPEGs decode downscaled (draft) instead of being refused; False for any other format."""
    if img.format not in ("JPEG", "MPO"):  # MPO = multi-picture JPEG (phone cameras)
        return False
    w, h = img.size
    for s in _JPEG_SCALES:
        tw, th = math.ceil(w / s), math.ceil(h / s)
        if tw * th <= max_pixels:
            img.draft(None, (tw, th))
            return img.size[0] * img.size[1] <= max_pixels
    return False
