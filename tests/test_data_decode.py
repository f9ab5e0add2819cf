"""Bad, exotic and hostile images: none raise; broken ones and bombs are skipped and counted."""

import io
import json
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmodal.data import DataStats, load_dataset, load_image


def png_bomb(path: Path, side: int) -> Path:
    """A valid side×side 1-bit PNG written straight from zlib: ~20 kB on disk, side² pixels when decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


@pytest.fixture
def zoo(tmp_path) -> dict[str, Path]:
    """One file per case; the bombs are ~170 and ~196 megapixels (the second beyond PIL's own hard limit)."""
    d = tmp_path / "zoo"
    d.mkdir()
    files = {}
    good = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    good.save(d / "good.jpg", quality=90)
    files["good"] = d / "good.jpg"
    data = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    files["truncated"] = d / "truncated.jpg"
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    files["garbage"] = d / "garbage.png"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)  # pure red in CMYK
    files["cmyk"] = d / "cmyk.jpg"
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 5, 10))  # left half red, right half palette index 0 = transparent black
    pal.save(d / "palette.png", transparency=0)
    files["palette"] = d / "palette.png"
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 2] = (0, 0, 0, 128)  # half-transparent black → mid grey on white
    rgba[:, 3] = (255, 0, 0, 0)  # fully transparent red → white
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    files["rgba"] = d / "rgba.png"
    Image.fromarray(np.array([[0, 32768, 65535, 257]], np.uint16)).save(d / "gray16.png")
    files["gray16"] = d / "gray16.png"
    t0 = time.perf_counter()
    files["bomb"] = png_bomb(d / "bomb.png", 13000)
    files["bigger_bomb"] = png_bomb(d / "bigger_bomb.png", 14000)
    assert time.perf_counter() - t0 < 3  # cheap to make, and tiny on disk
    assert files["bomb"].stat().st_size < 100_000
    return files


def test_none_raise_and_reasons_are_counted(zoo):
    expected_skip = {"truncated": "corrupt_image", "garbage": "corrupt_image", "bomb": "too_large",
                     "bigger_bomb": "too_large"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for name, path in zoo.items():
            for src in (str(path), path.read_bytes()):
                stats = DataStats()
                t0 = time.perf_counter()
                img = load_image(src, stats)
                assert time.perf_counter() - t0 < 2, name  # a bomb is refused from its header
                if name in expected_skip:
                    assert img is None, name
                    assert stats.as_dict() == {expected_skip[name]: 1}, name
                else:
                    assert img is not None and img.mode == "RGB", name
                    assert stats.total() == 0, name


def test_pixel_conversions(zoo):
    cmyk = np.asarray(load_image(str(zoo["cmyk"])), dtype=int)
    assert (cmyk[..., 0] > 230).all() and (cmyk[..., 1:] < 40).all()
    pal = np.asarray(load_image(str(zoo["palette"])))
    assert (pal[:, :5] == (255, 0, 0)).all() and (pal[:, 5:] == 255).all()  # transparency → white
    rgba = np.asarray(load_image(str(zoo["rgba"])), dtype=int)
    assert (rgba[:, :2] == (0, 0, 255)).all()
    assert (np.abs(rgba[:, 2] - 127) <= 1).all()
    assert (rgba[:, 3] == 255).all()
    g16 = np.asarray(load_image(str(zoo["gray16"])))
    assert g16.shape == (1, 4, 3)
    assert g16[0, :, 0].tolist() == [0, 128, 255, 1]  # scaled, not clipped (PIL's convert: 0,255,255,255)
    assert (g16[..., 0] == g16[..., 2]).all()


def test_missing_and_la_and_mode_I(tmp_path):
    stats = DataStats()
    assert load_image(str(tmp_path / "nope.png"), stats) is None
    assert stats.as_dict() == {"missing_image": 1}
    la = Image.fromarray(np.dstack([np.full((2, 2), 0, np.uint8), np.full((2, 2), 0, np.uint8)]), "LA")
    assert np.asarray(load_image(_png_bytes(la))).tolist() == [[[255] * 3] * 2] * 2
    buf = io.BytesIO()
    Image.fromarray(np.array([[65535, 0, 32768]], np.int32), "I").save(buf, "TIFF")  # 32-bit int mode "I"
    assert np.asarray(load_image(buf.getvalue()))[0, :, 1].tolist() == [255, 0, 128]


def test_big_jpeg_is_drafted_other_formats_skipped():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    stats = DataStats()
    small = load_image(buf.getvalue(), stats, max_pixels=20_000)
    assert small is not None and small.size == (100, 75) and stats.total() == 0  # 1/4 scale: first that fits
    assert load_image(buf.getvalue(), stats, max_pixels=1_000) is None  # even 1/8 (50×38) is too large
    assert load_image(_png_bytes(img), stats, max_pixels=20_000) is None
    assert stats.as_dict() == {"too_large": 2}


def test_load_dataset_counts_the_skips(zoo, tmp_path):
    rows = [{"image": f"zoo/{p.name}", "caption": f"case {n}"} for n, p in zoo.items()]
    rows.append({"image": "zoo/absent.png", "caption": "gone"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(manifest, 16, use_cache=False, progress=False)
    assert sorted(c[0] for c in data.captions) == ["case cmyk", "case good", "case gray16", "case palette",
                                                   "case rgba"]
    assert data.images.shape == (5, 3, 16, 16)
    assert data.stats.as_dict() == {"corrupt_image": 2, "too_large": 2, "missing_image": 1}
    assert "2 too_large" in data.stats.summary()
