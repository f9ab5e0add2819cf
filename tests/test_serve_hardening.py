"""Server hardening: upload formats (EPS never reached), the loopback Host check (DNS rebinding), the
--expose column filter, and random weights reported by /health and `xmodal serve`."""

from __future__ import annotations

import http.client
import io
import json
import sys

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve_api import KEY, assert_error, make_index, png_bytes

from xmodal.errors import UserError
from xmodal.index import open_index
from xmodal.serve import create_app, start_in_thread
from xmodal.serve.middleware import is_loopback_address, is_loopback_host_header

EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return make_index(tmp_path_factory.mktemp("hardening"), n=20, banks=False)


@pytest.fixture(scope="module")
def client(index_dir):
    out, _, enc = index_dir
    return TestClient(
        create_app(out, encoder=enc), base_url="http://localhost", raise_server_exceptions=False
    )


def image_bytes(fmt: str, size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, format=fmt)
    return buf.getvalue()


def upload(client, data: bytes, name: str = "q", ctype: str = "application/octet-stream"):
    return client.post("/search/image", files={"file": (name, data, ctype)}, data={"k": "3"})


# -- uploads ---------------------------------------------------------------------------------------------


def test_the_five_formats_are_accepted(client):
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        r = upload(client, image_bytes(fmt), f"q.{fmt.lower()}")
        assert r.status_code == 200, (fmt, r.text)
        assert len(r.json()["results"]) == 3


def test_eps_and_tiff_are_refused_and_eps_is_never_reached(client, monkeypatch):
    from PIL import EpsImagePlugin

    Image.init()  # every plugin registered now, so the spies below stay in place
    calls = []
    factory, accept = Image.OPEN["EPS"]

    def spy_accept(prefix):
        calls.append("accept")
        return accept(prefix)

    def spy_factory(*a, **kw):
        calls.append("open")
        return factory(*a, **kw)

    def no_ghostscript(*a, **kw):
        calls.append("ghostscript")
        raise AssertionError("Ghostscript reached")

    monkeypatch.setitem(Image.OPEN, "EPS", (spy_factory, spy_accept))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    assert Image.open(io.BytesIO(EPS)).format == "EPS" and calls  # the spy sees a plain Image.open
    calls.clear()

    for data, name in ((EPS, "q.eps"), (b"\xc5\xd0\xd3\xc6" + EPS, "q.eps"), (image_bytes("TIFF"), "q.tif")):
        r = upload(client, data, name)
        assert_error(r, 400)
        assert "PNG, JPEG, WebP, GIF or BMP" in r.json()["error"], r.json()
    assert calls == []
    assert upload(client, image_bytes("PNG")).status_code == 200  # still serving


# -- the Host check --------------------------------------------------------------------------------------


def test_loopback_names():
    for ok in (
        "localhost",
        "LOCALHOST:8765",
        "127.0.0.1",
        "127.0.0.1:80",
        "127.9.8.7:65535",
        "[::1]",
        "[::1]:8765",
    ):
        assert is_loopback_host_header(ok), ok
    for bad in (
        "",
        "evil.example",
        "evil.example:8765",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "localhost:abc",
        "localhost:",
        "localhost:0",
        "127.0.0.1:99999",
        "[::1]evil",
        "[::1",
        "::1",
        "10.0.0.1",
        "0.0.0.0",
        "[::ffff:8.8.8.8]",
        "127.1",
    ):
        assert not is_loopback_host_header(bad), bad
    for ok in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback_address(ok), ok
    for bad in ("0.0.0.0", "::", "192.168.1.5", "example.org", "", None):
        assert not is_loopback_address(bad), bad


def test_loopback_server_without_key_answers_only_loopback_hosts(index_dir):
    out, _, enc = index_dir
    c = TestClient(create_app(out, encoder=enc), raise_server_exceptions=False)
    for path in ("/health", "/", "/search?q=red", "/items/img_000.png", "/static/app.js", "/openapi.json"):
        r = c.get(path, headers={"Host": "evil.example:8765"})
        assert_error(r, 400)
        assert "evil.example:8765" in r.json()["error"] and "loopback" in r.json()["error"]
        assert r.headers["x-content-type-options"] == "nosniff"
    for host in ("localhost:8765", "127.0.0.1", "127.0.0.2:1", "[::1]:8765"):
        assert c.get("/health", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("kw", [{"api_key": KEY}, {"host": "0.0.0.0"}, {"host": None}])
def test_no_host_check_with_a_key_or_another_address(index_dir, kw):
    out, _, enc = index_dir
    c = TestClient(create_app(out, encoder=enc, **kw), raise_server_exceptions=False)
    assert c.get("/health", headers={"Host": "search.example.org"}).status_code == 200
    assert "400" not in c.get("/openapi.json").json()["paths"]["/health"]["get"]["responses"]


def test_real_loopback_server_refuses_a_rebound_host(index_dir):
    out, _, enc = index_dir
    server = start_in_thread(out, encoder=enc)
    try:

        def get(host: str) -> tuple[int, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/health", headers={"Host": host})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            conn.close()
            return resp.status, body

        status, body = get("attacker.example")
        assert status == 400 and "attacker.example" in body["error"]
        assert get(f"127.0.0.1:{server.port}")[0] == 200
        assert get(f"localhost:{server.port}")[0] == 200
    finally:
        server.stop()


# -- --expose --------------------------------------------------------------------------------------------


def test_default_expose_is_id_caption_label(client, index_dir):
    out, _, _ = index_dir
    columns = set(open_index(out).meta.schema.names)
    assert {"path", "captions", "lang"} <= columns  # there is something to hide
    links = {"thumb", "item"}
    item = client.get("/items/img_003.png").json()
    assert set(item) == {"id", "caption", "label"} | links, item
    hits = client.get("/search", params={"q": "a red circle", "k": 5}).json()["results"]
    assert hits and all(set(h) == {"rank", "score", "id", "caption", "label"} | links for h in hits), hits
    hits = upload(client, image_bytes("PNG")).json()["results"]
    assert hits and all(set(h) == {"rank", "score", "id", "caption", "label"} | links for h in hits), hits
    assert client.get("/health").json()["fields"] == ["id", "caption", "label"]


def test_expose_chooses_the_columns(index_dir):
    out, _, enc = index_dir
    c = TestClient(create_app(out, encoder=enc, expose="path,lang"), base_url="http://localhost")
    item = c.get("/items/img_003.png").json()
    assert set(item) == {"id", "path", "lang", "thumb", "item"} and item["path"].endswith("img_003.png")
    hits = c.get("/search", params={"q": "a red circle", "k": 4}).json()["results"]
    assert all(set(h) == {"rank", "score", "id", "path", "lang", "thumb", "item"} for h in hits), hits
    # captions are not public here, so neither is the caption gallery
    h = c.get("/health").json()
    assert h["captions"] is False and h["fields"] == ["id", "path", "lang"]
    r = c.post(
        "/search/image", files={"file": ("q.png", png_bytes(), "image/png")}, data={"target": "captions"}
    )
    assert_error(r, 422)
    schema = c.get("/openapi.json").json()
    body = schema["components"]["schemas"]["Body_search_image_search_image_post"]
    target = body["properties"]["target"]
    assert target.get("enum", [target.get("const")]) == ["images"]  # a one-value Literal is a const

    only_id = TestClient(create_app(out, encoder=enc, expose=[]), base_url="http://localhost")
    assert set(only_id.get("/items/img_003.png").json()) == {"id", "thumb", "item"}
    with pytest.raises(UserError, match="--expose nope"):
        create_app(out, encoder=enc, expose="caption,nope")


# -- random weights --------------------------------------------------------------------------------------


def test_health_reports_random_init(client, index_dir):
    out, _, enc = index_dir
    assert client.get("/health").json()["random_init"] is True  # built from the bare name xm-micro
    idx = open_index(out, encoder=enc)
    idx.info["model"] = {**idx.info["model"], "random_init": False}
    trained = TestClient(create_app(index=idx), base_url="http://localhost")
    assert trained.get("/health").json()["random_init"] is False


def test_serve_command_warns_about_random_weights(index_dir, monkeypatch, capsys):
    """`xmodal serve` up to the point where uvicorn would start: one warning line on stderr."""
    import uvicorn

    from xmodal.cli import main

    out, _, _ = index_dir
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))

    def serve(*args: str) -> list[str]:
        monkeypatch.setattr(sys, "argv", ["xmodal", "serve", str(out), "--port", "8799", *args])
        main()  # a UserError would exit 2
        err = capsys.readouterr().err.splitlines()
        return [line for line in err if line.startswith("warning:") and "random" in line]

    # One line, from load_encoder as it loads the model the index records.
    lines = serve()
    assert len(lines) == 1, lines
    assert apps[-1].state.serve.random_init is True
    assert apps[-1].state.serve.expose == ("id", "caption", "label")
    assert len(serve("--model", "xm-micro", "--expose", "caption,lang")) == 1
    assert apps[-1].state.serve.expose == ("id", "caption", "lang")

    # index.json says the weights are trained: /health says so (load_encoder still warns about xm-micro)
    info_path = out / "index.json"
    saved = info_path.read_text()
    info = json.loads(saved)
    info["model"] = {**info["model"], "random_init": False}
    try:
        info_path.write_text(json.dumps(info))
        serve()
        assert apps[-1].state.serve.random_init is False
    finally:
        info_path.write_text(saved)
