"""`xmodal search --rerank N` and `xmodal serve --rerank N` (ITM re-ranking of the top N candidates with the
model's fusion head) against brute force: one fusion pass per (query, candidate) pair, images decoded
from the files by hand, a python sort; plus the one-line errors and the web page's badge."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import assert_one_line_error, train_fused_and_plain, write_tiny_manifest
from tests.conftest import run_in_process as cli

K = 12  # candidates re-scored: more than the results shown (5), fewer than the 24 items


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(manifest, index of a clip+itm run with a caption gallery, its encoder, index of a clip-only run)."""
    from xmodal.index import build_index
    from xmodal.models import load_encoder

    root = tmp_path_factory.mktemp("search-rerank")
    manifest = write_tiny_manifest(root / "data", n=24)
    fused, plain = train_fused_and_plain(manifest, root)
    enc = load_encoder(fused, device="cpu")
    quiet = {"progress": False, "log": lambda m: None}
    build_index(enc, manifest, root / "fused.idx", model_source=str(fused), caption_gallery=True, **quiet)
    build_index(
        load_encoder(plain, device="cpu"), manifest, root / "plain.idx", model_source=str(plain), **quiet
    )
    return manifest, root / "fused.idx", enc, root / "plain.idx"


def pair_itm(enc, caption: str, pixels: torch.Tensor) -> float:
    """ITM log-odds of ONE (caption, image) pair, one fusion pass, states from `encode_hidden`."""
    from xmodal.models.fusion import encode_hidden, itm_scores

    with torch.no_grad():
        px = enc.normalize_pixels(pixels[None].float() / 255)
        h = encode_hidden(enc.model, px, enc.tokenize([caption]))
        return float(itm_scores(enc.model, h.text_hidden, h.text_attn, h.image_hidden)[0])


def pixels_of(enc, path: str) -> torch.Tensor:
    from xmodal.data import resize_center_crop

    return resize_center_crop(Image.open(path).convert("RGB"), enc.image_size)


def brute_text(enc, query: str, plain: list[dict], depth: int, k: int) -> list[tuple[str, float | None, int]]:
    """(id, itm, retrieval rank): the first `depth` plain hits sorted by pair-by-pair ITM (ties: retrieval
    order), then the plain tail, first k."""
    scored = [(h["id"], pair_itm(enc, query, pixels_of(enc, h["path"])), h["rank"]) for h in plain[:depth]]
    scored.sort(key=lambda t: (-t[1], t[2]))
    return (scored + [(h["id"], None, h["rank"]) for h in plain[depth:]])[:k]


def assert_matches(hits: list[dict], want: list[tuple[str, float | None, int]], plain: list[dict]) -> None:
    assert [h["id"] for h in hits] == [w[0] for w in want]
    assert [h["rank"] for h in hits] == list(range(1, len(want) + 1))
    assert [h["retrieval_rank"] for h in hits] == [w[2] for w in want]
    for h, (_, itm, _) in zip(hits, want, strict=True):
        assert (h["itm"] is None) if itm is None else h["itm"] == pytest.approx(itm, abs=1e-4)
        assert h["score"] == pytest.approx(plain[h["retrieval_rank"] - 1]["score"], abs=1e-6)  # kept


def test_search_rerank_json_is_the_brute_force_answer(built):
    _, out, enc, _ = built
    plain = json.loads(cli("search", out, "a red circle", "--k", K, "--json").stdout)
    assert len(plain) == K and all("itm" not in h for h in plain)  # without --rerank: as before
    hits = json.loads(cli("search", out, "a red circle", "--k", 5, "--rerank", K, "--json").stdout)
    assert_matches(hits, brute_text(enc, "a red circle", plain, K, 5), plain)
    assert [h["id"] for h in hits] != [h["id"] for h in plain[:5]]  # the re-ranking changed something
    # --k beyond --rerank: the first 4 re-ranked, ranks 5..7 the plain 5..7 without an ITM score
    plain = json.loads(cli("search", out, "a green circle", "--k", 7, "--json").stdout)
    hits = json.loads(cli("search", out, "a green circle", "--k", 7, "--rerank", 4, "--json").stdout)
    assert_matches(hits, brute_text(enc, "a green circle", plain, 4, 7), plain)
    assert [h["itm"] is None for h in hits] == [False] * 4 + [True] * 3


def test_search_rerank_captions_is_the_brute_force_answer(built):
    manifest, out, enc, _ = built
    img = str(manifest.parent / "img_005.png")
    plain = json.loads(cli("search", out, "--image", img, "--captions", "--k", K, "--json").stdout)
    hits = json.loads(
        cli("search", out, "--image", img, "--captions", "--rerank", K, "--k", 6, "--json").stdout
    )
    px = pixels_of(enc, img)
    want = sorted(
        ((h["id"], pair_itm(enc, h["caption"], px), h["rank"]) for h in plain), key=lambda t: (-t[1], t[2])
    )
    assert [h["caption"] for h in hits] == [plain[w[2] - 1]["caption"] for w in want[:6]]
    assert_matches(hits, want[:6], plain)


def test_search_rerank_table_says_so(built):
    _, out, _, _ = built
    table = cli("search", out, "a red circle", "--k", 3, "--rerank", 8).stdout
    assert "re-ranked by ITM (top 8" in table and "itm" in table and "was" in table


def test_rerank_one_line_errors(built):
    manifest, out, _, plain_idx = built
    p = cli("search", plain_idx, "a red circle", "--rerank", 8, check=False)
    assert_one_line_error(p, "--rerank: the model plain has no fusion (ITM) head")
    assert "--objective clip+itm" in p.stderr
    img = str(manifest.parent / "img_001.png")
    assert_one_line_error(cli("search", out, "--image", img, "--rerank", 4, check=False), "image → image")
    assert_one_line_error(cli("search", out, "a red circle", "--rerank", -1, check=False), "--rerank -1")
    p = cli("serve", plain_idx, "--rerank", 8, check=False)  # refused at start, before uvicorn
    assert_one_line_error(p, "--rerank: the model plain has no fusion (ITM) head")
    assert_one_line_error(cli("serve", out, "--rerank", 80, check=False), "--max-rerank (64)")


def test_unreadable_candidate_is_skipped_with_a_warning(built):
    from xmodal.index import open_index

    _, out, enc, _ = built
    idx = open_index(out, encoder=enc)
    plain = idx.search_text("a red circle", k=6)
    broken = [dict(h) for h in plain]
    broken[1]["path"] = str(out / "gone.png")
    warnings: list[str] = []
    hits, info = idx.rerank_images("a red circle", broken, 6, 6, log=warnings.append)
    assert info == {"depth": 6, "scored": 5, "skipped": [plain[1]["id"]]}
    assert len(warnings) == 1 and "gone.png" in warnings[0] and plain[1]["id"] in warnings[0]
    assert hits[-1]["id"] == plain[1]["id"] and hits[-1]["itm"] is None  # after the re-scored ones
    want = brute_text(enc, "a red circle", [h for i, h in enumerate(plain) if i != 1], 5, 5)
    assert [h["id"] for h in hits[:5]] == [w[0] for w in want]


def test_serve_rerank_same_order_and_badge(built):
    from xmodal.serve import create_app

    manifest, out, enc, _ = built
    c = TestClient(create_app(out, encoder=enc, rerank=K), base_url="http://localhost")
    h = c.get("/health").json()
    assert h["rerank"] == {"available": True, "default": K, "max": 64}
    body = c.get("/search", params={"q": "a red circle", "k": 5}).json()
    plain = json.loads(cli("search", out, "a red circle", "--k", K, "--json").stdout)
    want = brute_text(enc, "a red circle", plain, K, 5)
    assert body["rerank"] == {"depth": K, "scored": K, "skipped": []}
    assert [r["id"] for r in body["results"]] == [w[0] for w in want]
    assert [r["itm"] for r in body["results"]] == pytest.approx([w[1] for w in want], abs=1e-4)
    assert all("path" not in r for r in body["results"])  # server paths stay private
    # per request: off, another depth, bounded
    off = c.get("/search", params={"q": "a red circle", "k": 5, "rerank": 0}).json()
    assert off["rerank"] is None and [r["id"] for r in off["results"]] == [p["id"] for p in plain[:5]]
    four = c.get("/search", params={"q": "a red circle", "k": 5, "rerank": 4}).json()
    assert [r["id"] for r in four["results"]] == [w[0] for w in brute_text(enc, "a red circle", plain, 4, 5)]
    r = c.get("/search", params={"q": "a red circle", "rerank": 65})
    assert r.status_code == 422 and "rerank" in r.json()["error"]
    params = {p["name"]: p for p in c.get("/openapi.json").json()["paths"]["/search"]["get"]["parameters"]}
    schema = params["rerank"]["schema"]
    assert (schema["type"], schema["minimum"], schema["maximum"], schema["default"]) == ("integer", 0, 64, K)
    # image uploads: captions are re-ranked by default, image → image never
    png = (manifest.parent / "img_005.png").read_bytes()
    caps = c.post(
        "/search/image", files={"file": ("q.png", png, "image/png")}, data={"k": 3, "target": "captions"}
    )
    assert caps.json()["rerank"]["depth"] == K and caps.json()["results"][0]["itm"] is not None
    imgs = c.post("/search/image", files={"file": ("q.png", png, "image/png")}, data={"k": 3})
    assert imgs.json()["rerank"] is None and "itm" not in imgs.json()["results"][0]
    asked = c.post("/search/image", files={"file": ("q.png", png, "image/png")}, data={"k": 3, "rerank": 4})
    assert asked.json()["rerank"] is None and "itm" not in asked.json()["results"][0]  # ignored, and said
    # the page: a badge and the ITM score on each card
    assert 'id="rerank-badge"' in c.get("/").text
    js = c.get("/static/app.js").text
    assert "ITM re-ranking · top" in js and "hit.itm" in js and 'params.set("rerank"' in js


def test_serve_without_fusion_head(built):
    from xmodal.errors import UserError
    from xmodal.serve import create_app

    _, _, _, plain_idx = built
    with pytest.raises(UserError, match="--rerank: the model plain has no fusion"):
        create_app(plain_idx, rerank=4)
    c = TestClient(create_app(plain_idx), base_url="http://localhost")
    assert c.get("/health").json()["rerank"] == {"available": False, "default": 0, "max": 64}
    params = [p["name"] for p in c.get("/openapi.json").json()["paths"]["/search"]["get"]["parameters"]]
    assert "rerank" not in params  # the schema offers only what this server can do
    r = c.get("/search", params={"q": "a red circle", "rerank": 4})
    assert r.status_code == 400 and "no fusion (ITM) head" in r.json()["error"]
    assert c.get("/search", params={"q": "a red circle", "rerank": 0}).json()["rerank"] is None
