"""The search server: a FastAPI app over one index directory, plus the web page at `/`.

Endpoints (JSON; errors are always `{"error": "..."}` with a 4xx status, never a traceback):
    GET  /health                       status, item count, available hubness norms, limits (no key needed)
    GET  /search?q=&k=&norm=           text → images
    POST /search/image                 multipart `file` (+ form k, norm, target=images|captions)
    GET  /items/{id}                   one item's metadata (indexed ids only)
    GET  /thumb/{id}                   its JPEG thumbnail (from the index's own thumbnail store)
    GET  /docs                         OpenAPI docs

Safety: ids are only ever looked up in the index's id table — no path is built from user input, so
`../` and friends are simply unknown ids (404). Uploads are capped in bytes before parsing (413) and in
pixels before decoding (`xmodal.data.load_image` reads only the header first), optional `X-API-Key`.
"""

from __future__ import annotations

import hmac
import io
import logging
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from xmodal.errors import UserError

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("xmodal.serve")

PUBLIC_FIELDS_DROP = ("path",)  # server-side file paths are not the client's business


class TooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` (by Content-Length, or while streaming)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_json(send, 413, {"error": f"request body over {self.max_bytes} bytes"})
                    return
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise TooLarge(f"request body over {self.max_bytes} bytes")
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except TooLarge as e:
            if not started:
                await _send_json(send, 413, {"error": e.detail})


class SecurityHeaders:
    """Same-origin-only page: no external scripts, no framing, no MIME sniffing."""

    CSP = (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope.get("path", "").startswith(("/docs", "/redoc"))

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if not docs:  # the Swagger UI page loads its own assets; leave it its defaults
                    headers.append((b"content-security-policy", self.CSP.encode()))
                    headers.append((b"x-frame-options", b"DENY"))
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.app(scope, receive, send_with_headers)


async def _send_json(send: Any, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _LRU:
    """A small thread-safe LRU for text-query embeddings (popular queries repeat)."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.data: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        return None

    def put(self, key: str, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)


def create_app(
    index_path: str | Path | None = None,
    api_key: str | None = None,
    *,
    max_upload_mb: float = 10.0,
    max_pixels: int = 40_000_000,
    max_k: int = 100,
    max_query_chars: int = 1000,
    encoder: Any = None,
    index: Any = None,
    load_model: bool = True,
) -> FastAPI:
    """Build the app for the index at `index_path` (or an already opened `index`).

    api_key: when set, every endpoint but /health, the page and the docs needs header `X-API-Key: <key>`.
    max_upload_mb / max_pixels: limits for image uploads. encoder: use this model instead of the one the
    index records (the demo passes its in-memory model). load_model=False defers loading to the first
    query."""
    from xmodal.index import open_index

    idx = index if index is not None else open_index(index_path, encoder=encoder)
    if encoder is not None:
        idx.encoder = encoder
    model_error: str | None = None
    if load_model:
        try:
            _ = idx.encoder
        except (UserError, OSError, RuntimeError) as e:  # items and thumbnails still work without the model
            model_error = str(e)
            log.warning("model not available: %s", e)
    max_upload = int(max_upload_mb * 1024 * 1024)
    lock = threading.Lock()  # one model/search at a time: predictable latency on small CPUs
    text_cache = _LRU()

    app = FastAPI(title="xmodal search", version="1", description="Cross-modal search over an xmodal index.")
    app.add_middleware(BodyLimit, max_bytes=max_upload + 64 * 1024)  # multipart framing on top of the file
    app.add_middleware(SecurityHeaders)
    app.state.index = idx

    # -- errors: always {"error": ...} ------------------------------------------------------------------
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if errs:
            e = errs[0]
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            msg = f"{where}: {e.get('msg', 'invalid')}"
        else:
            msg = "invalid request"
        return JSONResponse({"error": msg}, status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(
        request: Request, exc: Exception
    ) -> JSONResponse:  # pragma: no cover - safety net
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": "internal error"}, status_code=500)

    # -- helpers ----------------------------------------------------------------------------------------
    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key (send it in the X-API-Key header)",
                headers={"WWW-Authenticate": "X-API-Key"},
            )

    def need_model() -> None:
        if model_error is not None:
            raise HTTPException(503, f"the index's model is not available on this server: {model_error}")

    def check_norm(norm: str, modality: str) -> str:
        norm = (norm or "none").strip().lower()
        allowed = idx.available_norms(modality)
        if norm not in allowed:
            raise HTTPException(
                400,
                f"norm={norm!r} is not available for {modality} queries here; "
                f"use one of {', '.join(allowed)}",
            )
        return norm

    def public(hit: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in hit.items() if k not in PUBLIC_FIELDS_DROP}
        out["thumb"] = f"/thumb/{quote(str(hit['id']), safe='')}"
        out["item"] = f"/items/{quote(str(hit['id']), safe='')}"
        return out

    def text_vector(q: str):
        v = text_cache.get(q)
        if v is None:
            v = idx.embed_text([q])
            text_cache.put(q, v)
        return v

    # -- endpoints ------------------------------------------------------------------------------------
    @app.get("/health", summary="Liveness and what this index offers")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "items": len(idx),
            "kind": idx.kind,
            "model": (idx.info.get("model") or {}).get("name"),
            "model_ready": model_error is None,
            "norms": {"text": idx.available_norms("text"), "image": idx.available_norms("image")},
            "captions": idx.has_captions,
            "auth": api_key is not None,
            "limits": {
                "max_k": max_k,
                "max_query_chars": max_query_chars,
                "max_upload_bytes": max_upload,
                "max_pixels": max_pixels,
            },
        }

    @app.get("/search", summary="Text → images", dependencies=[Depends(check_key)])
    def search(
        q: str = Query("", description="Query text"),
        k: int = Query(10, ge=1, le=max_k),
        norm: str = Query("none", max_length=32, description="Hubness correction"),
    ) -> dict[str, Any]:
        q = q.strip()
        if not q:
            raise HTTPException(400, "q: empty query")
        if len(q) > max_query_chars:
            raise HTTPException(400, f"q: longer than {max_query_chars} characters")
        norm = check_norm(norm, "text")
        need_model()
        t0 = time.perf_counter()
        with lock:
            scores, rows = idx.search_rows(text_vector(q), k=k, norm=norm, modality="text")
        hits = [public(h) for h in idx.hits(scores[0], rows[0])]
        return {
            "query": q,
            "k": k,
            "norm": norm,
            "results": hits,
            "took_ms": round(1000 * (time.perf_counter() - t0), 2),
        }

    @app.post("/search/image", summary="Image → images (or → captions)", dependencies=[Depends(check_key)])
    async def search_image(
        file: UploadFile = File(..., description="The query image"),
        k: int = Form(10, ge=1, le=max_k),
        norm: str = Form("none", max_length=32),
        target: str = Form("images", max_length=16),
    ) -> dict[str, Any]:
        if target not in ("images", "captions"):
            raise HTTPException(400, "target: use images or captions")
        if target == "captions" and not idx.has_captions:
            raise HTTPException(400, "target=captions: this index has no caption gallery")
        norm = check_norm(norm, "image") if target == "images" else "none"
        need_model()
        data = await file.read(max_upload + 1)
        await file.close()
        if len(data) > max_upload:
            raise HTTPException(413, f"file: over {max_upload} bytes")
        if not data:
            raise HTTPException(400, "file: empty upload")
        t0 = time.perf_counter()
        img = await run_in_threadpool(_decode, data, max_pixels)

        def run_search() -> list[dict[str, Any]]:
            with lock:
                if target == "captions":
                    return idx.search_captions(img, k=k)
                scores, rows = idx.search_rows(idx.embed_image(img), k=k, norm=norm, modality="image")
                return idx.hits(scores[0], rows[0])

        hits = [public(h) for h in await run_in_threadpool(run_search)]
        return {
            "query": {"image": file.filename or "upload", "size": list(img.size)},
            "k": k,
            "norm": norm,
            "target": target,
            "results": hits,
            "took_ms": round(1000 * (time.perf_counter() - t0), 2),
        }

    @app.get("/items/{item_id:path}", summary="One item's metadata", dependencies=[Depends(check_key)])
    def item(item_id: str) -> dict[str, Any]:
        row = idx.item(item_id)
        if row is None:
            raise HTTPException(404, "no such item")
        return public(row)

    @app.get(
        "/thumb/{item_id:path}",
        summary="One item's thumbnail (JPEG)",
        dependencies=[Depends(check_key)],
        response_class=Response,
    )
    def thumb(item_id: str) -> Response:
        data = idx.thumbnail(item_id)
        if data is None:
            raise HTTPException(404, "no thumbnail for this id")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _decode(data: bytes, max_pixels: int):
    """Uploaded bytes → RGB PIL image, or a 400/413 HTTPException (bombs are refused from the header)."""
    from PIL import Image

    from xmodal.data import load_image
    from xmodal.data.records import DataStats

    # Header-only look first: a clear 413 for huge images, before any pixel is decoded.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            probe = Image.open(io.BytesIO(data))
        w, h = probe.size
        fmt = probe.format
        probe.close()
    except Image.DecompressionBombError:
        raise TooLarge(f"image over {max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is not an image for us
        raise HTTPException(400, "file: not a decodable image (use PNG, JPEG, WebP, GIF or BMP)") from None
    if w * h > max_pixels and fmt != "JPEG":  # big JPEGs decode downscaled (load_image uses draft)
        raise TooLarge(f"image is {w}×{h} = {w * h} pixels; the limit is {max_pixels}")
    stats = DataStats()
    img = load_image(data, stats, max_pixels=max_pixels)
    if img is None:
        if "too_large" in stats.counts:
            raise TooLarge(f"image is {w}×{h} = {w * h} pixels; the limit is {max_pixels}")
        raise HTTPException(400, "file: not a decodable image (corrupt or truncated)")
    return img
