"""The HTTP API: search by text and image, items, thumbnails, auth, and hostile input (always 4xx JSON,
and the server keeps serving)."""

from __future__ import annotations

import http.client
import io
import struct
import zlib

import httpx
import pytest
from conftest import write_tiny_manifest
from fastapi.testclient import TestClient
from PIL import Image

from xmodal.index import add_bank, build_index, open_index
from xmodal.models import load_encoder
from xmodal.serve import create_app, start_in_thread

KEY = "s3cret-key"


def make_index(root, n=40, banks=True):
    """A small index (real images, caption gallery, text+image banks) and its encoder."""
    enc = load_encoder("xm-micro")
    manifest = write_tiny_manifest(root / "data", n=n)
    out = root / "idx"
    build_index(
        enc, manifest, out, model_source="xm-micro", caption_gallery=True, progress=False, log=lambda m: None
    )
    if banks:
        add_bank(out, data=manifest, encoder=enc, progress=False, log=lambda m: None)
    return out, manifest, enc


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return make_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(index_dir):
    out, _, enc = index_dir
    return TestClient(
        create_app(out, encoder=enc, max_upload_mb=1, max_pixels=4_000_000),
        base_url="http://localhost",  # a loopback server without a key answers only to loopback names
        raise_server_exceptions=False,
    )


@pytest.fixture(scope="module")
def keyed(index_dir):
    out, _, enc = index_dir
    return TestClient(create_app(out, api_key=KEY, encoder=enc), raise_server_exceptions=False)  # any Host


def png_bytes(size=(40, 40), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int = 13000) -> bytes:
    """A 1-bit palette PNG of side×side pixels: ~20 kB on the wire, gigabytes if decoded to RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0))
        + chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff")
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def assert_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"], body
    assert "Traceback" not in r.text


# -- the happy paths -----------------------------------------------------------------------------------


def test_health_and_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["items"] == 40 and h["captions"] is True
    assert "qbnorm" in h["norms"]["text"] and "dbnorm-dynamic" in h["norms"]["text"]
    assert h["rerank"] == {"available": False, "default": 0, "max": 64}  # xm-micro has no ITM head
    page = client.get("/")
    assert page.status_code == 200 and "<title>xmodal search</title>" in page.text
    assert "content-security-policy" in page.headers
    assert client.get("/static/app.js").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_text_search_items_and_thumbs(client, index_dir):
    out, _, enc = index_dir
    r = client.get("/search", params={"q": "a red circle", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert len(body["results"]) == 5 and body["norm"] == "none" and body["rerank"] is None
    hit = body["results"][0]
    assert "path" not in hit  # server paths stay private
    idx = open_index(out, encoder=enc)
    assert [h["id"] for h in body["results"]] == [h["id"] for h in idx.search_text("a red circle", k=5)]
    item = client.get(hit["item"]).json()
    assert item["id"] == hit["id"] and item["caption"]
    t = client.get(hit["thumb"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(t.content)).size[0] > 0
    for norm in ("qbnorm", "qbnorm-dynamic", "dbnorm", "dbnorm-dynamic"):
        r = client.get("/search", params={"q": "a red circle", "norm": norm})
        assert r.status_code == 200 and r.json()["norm"] == norm and len(r.json()["results"]) == 10


def test_image_search_finds_the_same_image_and_captions(client, index_dir):
    _, manifest, _ = index_dir
    data = (manifest.parent / "img_007.png").read_bytes()
    r = client.post("/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == "img_007.png"
    r = client.post(
        "/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "4", "target": "captions"}
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 4 and r.json()["results"][0]["caption"]
    r = client.post("/search/image", files={"file": ("q.png", data, "image/png")}, data={"norm": "qbnorm"})
    assert r.status_code == 200 and r.json()["norm"] == "qbnorm"


# -- hostile input -------------------------------------------------------------------------------------


def test_bad_queries_are_4xx_json(client):
    # Outside the schema (/openapi.json: required, not blank, ≤ 1000 chars, k in 1..100, norm enum): 422.
    assert_error(client.get("/search", params={"q": ""}), 422)
    assert_error(client.get("/search", params={"q": "   "}), 422)
    assert_error(client.get("/search", params={"q": "\x1c\u3000"}), 422)  # blank to str.strip() too
    assert_error(client.get("/search"), 422)
    assert_error(
        client.get("/search", params={"q": "x" * 60_000}), 422
    )  # httpx caps URLs at 64 kB; 100 kB: below
    assert_error(client.get("/search", params={"q": "x" * 1001}), 422)
    assert_error(client.get("/search", params={"q": "cat", "k": 0}), 422)
    assert_error(client.get("/search", params={"q": "cat", "k": 101}), 422)
    assert_error(client.get("/search", params={"q": "cat", "k": "ten"}), 422)
    assert_error(client.get("/search", params={"q": "cat", "norm": "bogus"}), 422)
    assert_error(client.get("/search", params={"q": "cat", "norm": "QBNorm"}), 422)
    assert_error(client.post("/search"), 405)
    assert_error(client.get("/nope"), 404)
    assert client.get("/search", params={"q": "ünïcödé 🐱 <script>alert(1)</script>"}).status_code == 200


def test_bad_uploads_are_4xx_json(client):
    def up(data, name="q.png", ctype="image/png", **form):
        return client.post("/search/image", files={"file": (name, data, ctype)}, data=form)

    assert_error(up(b"hello, not an image", "q.txt", "text/plain"), 400)
    assert_error(up(b""), 400)
    assert_error(up(png_bytes()[:60]), 400)  # truncated PNG
    assert_error(up(b"GIF89a" + b"\x00" * 100, "q.gif", "image/gif"), 400)
    assert_error(up(bomb_png(13000)), 413)  # decompression bomb: refused from the header
    assert_error(up(bomb_png(2100)), 413)  # 4.4 MP > this app's 4 MP limit
    assert_error(up(b"\x00" * (2 * 1024 * 1024)), 413)  # over --max-upload-mb 1
    assert_error(up(png_bytes(), k="0"), 422)
    assert_error(up(png_bytes(), target="everything"), 422)
    assert_error(client.post("/search/image"), 422)  # no file at all
    assert_error(
        client.post("/search/image", content=b"garbage", headers={"content-type": "multipart/form-data"}), 400
    )
    assert client.get("/health").json()["status"] == "ok"


def test_streamed_oversize_body_is_413(client):
    def gen():
        for _ in range(40):
            yield b"\x00" * 65536  # 2.5 MiB, sent chunked (no Content-Length)

    r = client.post(
        "/search/image", content=gen(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert_error(r, 413)


@pytest.mark.parametrize(
    "path",
    [
        "/items/..%2F..%2F..%2Fetc%2Fpasswd",
        "/items/%2e%2e/%2e%2e/etc/passwd",
        "/thumb/..%2F..%2Findex.json",
        "/thumb/%252e%252e%252fmeta.parquet",
        "/thumb/..%5c..%5cwindows%5cwin.ini",
        "/items/%00",
        "/thumb/img_000.png%00.jpg",
        "/items/nope",
    ],
)
def test_traversal_ids_are_404(client, path):
    assert_error(client.get(path), 404)


def test_api_key(keyed):
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/").status_code == 200
    assert_error(keyed.get("/search", params={"q": "cat"}), 401)
    assert_error(keyed.get("/search", params={"q": "cat"}, headers={"X-API-Key": "wrong"}), 401)
    assert_error(keyed.get("/thumb/img_000.png"), 401)
    assert_error(keyed.get("/items/img_000.png", headers={"X-API-Key": KEY + "x"}), 401)
    assert_error(keyed.post("/search/image", files={"file": ("q.png", png_bytes(), "image/png")}), 401)
    assert keyed.get("/search", params={"q": "cat"}, headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.get("/thumb/img_000.png", headers={"X-API-Key": KEY}).status_code == 200


def test_real_server_raw_requests_and_keeps_serving(index_dir):
    """Through uvicorn itself: raw `../` request lines, a 100 kB URL, and health afterwards."""
    out, _, enc = index_dir
    server = start_in_thread(out, encoder=enc)
    try:

        def raw(path: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.putrequest("GET", path, skip_accept_encoding=True)
            conn.endheaders()
            resp = conn.getresponse()
            resp.read()
            conn.close()
            return resp.status

        assert raw("/thumb/../../../../etc/passwd") == 404
        assert raw("/items/../index.json") == 404
        assert raw("/static/../index.json") == 404
        assert raw("/static/..%2f..%2findex.json") == 404
        status = raw("/search?q=" + "x" * 100_000)
        assert 400 <= status < 500
        assert server.host == "127.0.0.1"
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/health").json()["status"] == "ok"
            assert c.get("/search", params={"q": "a red circle"}).status_code == 200
    finally:
        server.stop()


# -- POST /caption: the model's caption of an uploaded image (CoCa models) ----------------------------


def make_coca_index(root, coca_run, n=8):
    """An index of an image folder without captions, built from the tiny CoCa run with generated captions,
    and its encoder."""
    enc = load_encoder(str(coca_run))
    write_tiny_manifest(root / "photos", n=n)
    (root / "photos" / "data.jsonl").unlink()
    out = root / "idx"
    build_index(
        enc, root / "photos", out, model_source=str(coca_run), captions="generate", progress=False,
        log=lambda m: None,
    )  # fmt: skip
    return out, root / "photos", enc


_COCA_INDEXES: dict[str, tuple] = {}


def shared_coca_index(tmp_path_factory, coca_run):
    """One CoCa index per test session for the serve tests (API, browser, schema); read it only."""
    if str(coca_run) not in _COCA_INDEXES:
        _COCA_INDEXES[str(coca_run)] = make_coca_index(tmp_path_factory.mktemp("serve-coca"), coca_run)
    return _COCA_INDEXES[str(coca_run)]


@pytest.fixture(scope="module")
def coca_index(tmp_path_factory, coca_run):
    return shared_coca_index(tmp_path_factory, coca_run)


def test_caption_route_gives_the_captioners_caption(coca_index):
    import torch

    from xmodal.data import resize_center_crop
    from xmodal.models.captioner import Decoding, caption_images

    out, photos, enc = coca_index
    c = TestClient(create_app(out, encoder=enc), base_url="http://localhost", raise_server_exceptions=False)
    h = c.get("/health").json()
    assert h["caption"]["available"] is True and h["caption"]["decoding"]["max_len"] == 30
    img = Image.open(photos / "img_002.png").convert("RGB")
    img = img.resize((53, 47))  # not the model's size: the server resizes and crops as index build does
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    r = c.post("/caption", files={"file": ("q.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = caption_images(enc, torch.stack([resize_center_crop(img, enc.image_size)]), Decoding())[0]
    assert body["caption"] == expected and expected.strip()
    assert body["model"] == h["model"] and body["decoding"] == h["caption"]["decoding"]
    assert body["query"] == {"image": "q.png", "size": [53, 47]}
    # the page's cards mark generated captions; caption search hits say so too
    hits = c.post("/search/image", files={"file": ("q.png", buf.getvalue(), "image/png")},
                  data={"target": "captions", "k": "2"}).json()["results"]  # fmt: skip
    assert hits and all(x["caption_generated"] is True for x in hits)
    assert_error(c.post("/caption", files={"file": ("q.png", b"", "image/png")}), 400)
    assert_error(c.post("/caption", files={"file": ("q.png", b"not an image", "image/png")}), 400)
    op = c.get("/openapi.json").json()["paths"]["/caption"]["post"]
    assert set(op["responses"]) == {"200", "400", "413", "422", "503"}
    encoding = op["requestBody"]["content"]["multipart/form-data"]["encoding"]
    assert "image/png" in encoding["file"]["contentType"]


def test_caption_route_without_a_caption_decoder_is_400(client):
    assert client.get("/health").json()["caption"] == {"available": False, "decoding": None}
    r = client.post("/caption", files={"file": ("q.png", png_bytes(), "image/png")})
    assert_error(r, 400)
    assert "no caption decoder" in r.json()["error"] and "CoCa" in r.json()["error"]
    # it can never succeed here, so the schema leaves it out (schemathesis: valid requests succeed)
    assert "/caption" not in client.get("/openapi.json").json()["paths"]
