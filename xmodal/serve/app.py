"""The search server: a FastAPI app over one index directory, plus the web page at `/`.

Endpoints (JSON; errors are always `{"error": "..."}` with a 4xx status, never a traceback):
    GET  /health                       status, item count, available hubness norms, limits (no key needed)
    GET  /search?q=&k=&norm=&rerank=   text → images (rerank: ITM re-ranking depth, with a fusion head)
    POST /search/image                 multipart `file` (+ form k, norm, target=images|captions, rerank)
    POST /caption                      multipart `file` → the model's caption of it (CoCa models only)
    GET  /items/{id}                   one item's public metadata (the --expose columns)
    GET  /thumb/{id}                   its JPEG thumbnail (from the index's own thumbnail store)
    GET  /docs                         OpenAPI docs; /openapi.json lists the valid values and every error

Safety: ids are only ever looked up in the index's id table — no path is built from user input, so
`../` and friends are simply unknown ids (404). Uploads are capped in bytes before parsing (413), limited
to five formats, and capped in pixels before decoding (uploads.py); optional `X-API-Key`. A loopback
server without a key answers only to loopback Host names (middleware.py, DNS rebinding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from xmodal.errors import UserError
from xmodal.serve.deps import ServeState, resolve_expose, validation_message
from xmodal.serve.middleware import BodyLimit, HostCheck, SecurityHeaders, is_loopback_address
from xmodal.serve.routes import STATIC, build_router

log = logging.getLogger("xmodal.serve")


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
    expose: str | Sequence[str] | None = None,
    host: str | None = "127.0.0.1",
    rerank: int = 0,
    max_rerank: int = 64,
) -> FastAPI:
    """Build the app for the index at `index_path` (or an already opened `index`).

    api_key: when set, every endpoint but /health, the page and the docs needs header `X-API-Key: <key>`.
    max_upload_mb / max_pixels: limits for image uploads. encoder: use this model instead of the one the
    index records (the demo passes its in-memory model). load_model=False defers loading to the first
    query. expose: the metadata columns clients see (default id, caption, label). host: the address the
    server binds; a loopback one without api_key turns the Host-header check on (None: no check).
    rerank: ITM re-ranking depth of text queries (and image → caption queries) by default, 0 = off; it
    needs a model with a fusion head (so the model is loaded at start even with load_model=False).
    max_rerank: the most a request's `rerank` field may ask for (latency: one fusion pass per candidate)."""
    from xmodal.index import open_index

    if not 0 <= max_rerank <= 1000:
        raise UserError(f"--max-rerank {max_rerank}: must be between 0 and 1000")
    if not 0 <= rerank <= max_rerank:
        raise UserError(f"--rerank {rerank}: must be between 0 (off) and --max-rerank ({max_rerank})")
    idx = index if index is not None else open_index(index_path, encoder=encoder)
    if encoder is not None:
        idx.encoder = encoder
    model_error: str | None = None
    can_rerank = False
    can_caption: bool | None = None  # unknown until the model loads
    if load_model or rerank:
        try:
            enc = idx.encoder
        except (UserError, OSError, RuntimeError) as e:  # items and thumbnails still work without the model
            model_error = str(e)
            log.warning("model not available: %s", e)
        else:
            from xmodal.models.fusion import has_fusion

            can_rerank = has_fusion(enc.model)
            from xmodal.models.captioner import is_coca

            can_caption = is_coca(enc.model)
            if rerank and not can_rerank:
                from xmodal.index.rerank import check_fusion

                check_fusion(enc)  # the one-line UserError naming --rerank
    state = ServeState(
        idx=idx,
        api_key=api_key,
        expose=resolve_expose(idx, expose),
        max_k=max_k,
        max_query_chars=max_query_chars,
        max_upload=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        # random weights: as the given encoder says, else as index.json records (load_encoder warns)
        random_init=bool(
            encoder.random_init if encoder is not None else (idx.info.get("model") or {}).get("random_init")
        ),
        host_check=api_key is None and is_loopback_address(host),
        model_error=model_error,
        rerank=rerank,
        max_rerank=max_rerank,
        can_rerank=can_rerank,
        can_caption=can_caption,
        caption_decoding=_caption_decoding(idx.info),
    )

    app = FastAPI(title="xmodal search", version="1", description="Cross-modal search over an xmodal index.")
    # The last added runs first: security headers on every answer, then the Host check, then the body limit.
    app.add_middleware(BodyLimit, max_bytes=state.max_upload + 64 * 1024)  # multipart framing on top
    if state.host_check:
        app.add_middleware(HostCheck)
    app.add_middleware(SecurityHeaders)
    app.state.index = idx
    app.state.serve = state

    # -- errors: always {"error": ...} ------------------------------------------------------------------
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc.errors())}, status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(
        request: Request, exc: Exception
    ) -> JSONResponse:  # pragma: no cover - safety net
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": "internal error"}, status_code=500)

    app.include_router(build_router(state))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _caption_decoding(info: dict[str, Any]) -> dict[str, Any] | None:
    """POST /caption decodes as the index's generated captions were (`index build --captions generate`
    records the decoding), else (None) with the captioner's defaults: greedy, ≤ 30 tokens."""
    c = info.get("captions")
    if isinstance(c, dict) and c.get("mode") == "generate" and isinstance(c.get("decoding"), dict):
        return dict(c["decoding"])
    return None
