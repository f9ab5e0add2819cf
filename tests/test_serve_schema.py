"""/openapi.json says what the server really accepts: value sets as enums, every error answer documented;
and schemathesis, run against the real server on loopback, finds nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from fastapi.testclient import TestClient
from test_serve_api import KEY, make_index, shared_coca_index

from xmodal.serve import create_app, start_in_thread

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")

# Schemathesis hooks: real images for the upload's media types, so that schema-valid uploads are real
# images (the schema's multipart encoding names the five accepted types).
HOOKS = textwrap.dedent(
    """
    import io

    import schemathesis
    from hypothesis import strategies as st
    from PIL import Image


    def images(fmt):
        @st.composite
        def draw(draw):
            size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
            color = draw(st.tuples(*[st.integers(0, 255)] * 3))
            buf = io.BytesIO()
            Image.new("RGB", size, color).save(buf, format=fmt)
            return buf.getvalue()

        return draw()


    for media_type, fmt in [
        ("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP"), ("image/gif", "GIF"),
        ("image/bmp", "BMP"),
    ]:
        schemathesis.openapi.media_type(media_type, images(fmt))
    """
)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return make_index(tmp_path_factory.mktemp("schema"), n=20)


def schema_of(app) -> dict:
    return TestClient(app, base_url="http://localhost").get("/openapi.json").json()


def param(op: dict, name: str) -> dict:
    return next(p for p in op["parameters"] if p["name"] == name)


def test_value_sets_are_enums(index_dir):
    out, _, enc = index_dir
    s = schema_of(create_app(out, encoder=enc))
    search = s["paths"]["/search"]["get"]
    assert param(search, "norm")["schema"]["enum"] == [
        "none",
        "qbnorm",
        "qbnorm-dynamic",
        "dbnorm",
        "dbnorm-dynamic",
    ]
    q = param(search, "q")
    assert q["required"] is True and q["schema"]["minLength"] == 1 and q["schema"]["maxLength"] == 1000
    assert q["schema"]["pattern"]
    k = param(search, "k")["schema"]
    assert (k["minimum"], k["maximum"]) == (1, 100)
    body = s["components"]["schemas"]["Body_search_image_search_image_post"]["properties"]
    assert body["target"]["enum"] == ["images", "captions"]
    assert body["norm"]["enum"] == ["none", "qbnorm", "qbnorm-dynamic", "dbnorm", "dbnorm-dynamic"]
    encoding = s["paths"]["/search/image"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "encoding"
    ]
    assert "image/png" in encoding["file"]["contentType"] and "image/bmp" in encoding["file"]["contentType"]


def test_an_index_without_banks_offers_only_norm_none(tmp_path):
    out, _, enc = make_index(tmp_path, n=12, banks=False)
    s = schema_of(create_app(out, encoder=enc))
    norm = param(s["paths"]["/search"]["get"], "norm")["schema"]
    assert norm.get("enum", [norm.get("const")]) == ["none"]


def test_every_error_answer_is_documented(index_dir):
    out, _, enc = index_dir
    routes = {
        ("/health", "get"): set(),
        ("/search", "get"): {"400", "422", "503"},
        ("/search/image", "post"): {"400", "413", "422", "503"},
        ("/items/{item_id}", "get"): {"404", "422"},
        ("/thumb/{item_id}", "get"): {"404", "422"},
    }
    host_check = {r: c | {"400"} for r, c in routes.items()}  # keyless loopback: foreign Host → 400
    keyed = {r: c | ({"401"} if r[0] != "/health" else set()) for r, c in routes.items()}
    for kw, expected in (({}, host_check), ({"api_key": KEY}, keyed)):
        s = schema_of(create_app(out, encoder=enc, **kw))
        assert {(p, m) for p, ops in s["paths"].items() for m in ops} == set(expected)
        for (path, method), codes in expected.items():
            responses = s["paths"][path][method]["responses"]
            assert set(responses) - {"200"} == codes, (kw, path, sorted(responses))
            for code in codes:
                ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (path, code, ref)  # {"error": "..."}, as sent
        if kw:
            assert s["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
            assert "security" not in s["paths"]["/health"]["get"]
            assert s["paths"]["/search"]["get"]["security"]
        else:
            assert "securitySchemes" not in s.get("components", {})
    thumb = s["paths"]["/thumb/{item_id}"]["get"]["responses"]["200"]["content"]
    assert list(thumb) == ["image/jpeg"]


def schemathesis(url: str, tmp_path, *args: str) -> str:
    """`st run` against the server at `url`, with the upload hooks: asserts no issues, returns the report."""
    (tmp_path / "xmodal_st_hooks.py").write_text(HOOKS)
    st = shutil.which("st") or shutil.which("schemathesis")
    cmd = [st] if st else [sys.executable, "-m", "schemathesis.cli"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "xmodal_st_hooks", "PYTHONPATH": str(tmp_path)}
    args = ("--seed", "1", "--workers", "1", "--request-timeout", "30", *args)
    proc = subprocess.run(
        [*cmd, "run", f"{url}/openapi.json", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    assert "No issues found" in report, report[-6000:]
    return report


@pytest.mark.parametrize(
    ("api_key", "examples"),
    [(None, 20), pytest.param(KEY, 10, marks=pytest.mark.slow)],  # the key itself: test_serve_api
    ids=["loopback", "api-key"],
)
def test_schemathesis_finds_nothing(index_dir, tmp_path, api_key, examples):
    """`st run` with all default checks and phases against the real server on loopback: no failures (with a
    key, its checks of the auth contract run too)."""
    out, _, enc = index_dir
    server = start_in_thread(out, encoder=enc, api_key=api_key)
    args = ["--max-examples", str(examples)]
    if api_key:
        args += ["--header", f"X-API-Key: {api_key}"]
    try:
        report = schemathesis(server.url, tmp_path, *args)
    finally:
        server.stop()
    assert "5 selected / 5 total" in report, report[-3000:]  # no POST /caption: xm-micro cannot caption


def test_schemathesis_finds_nothing_in_the_caption_route(tmp_path_factory, coca_run, tmp_path):
    """A CoCa model's server offers POST /caption; schema-valid uploads get a caption, the rest a 4xx."""
    out, _, enc = shared_coca_index(tmp_path_factory, coca_run)
    server = start_in_thread(out, encoder=enc)
    try:
        report = schemathesis(server.url, tmp_path, "--max-examples", "10", "--include-path", "/caption")
    finally:
        server.stop()
    assert "1 selected / 6 total" in report, report[-3000:]
