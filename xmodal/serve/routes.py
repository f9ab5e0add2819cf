"""The endpoints of the search server, built per app: value sets in the schema (norms, targets, k) are
this index's, so /openapi.json says exactly what this server accepts."""

# No `from __future__ import annotations`: FastAPI must see the per-app Literal types as objects.

import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from xmodal.serve.deps import (
    NOT_BLANK,
    ServeState,
    check_norm,
    enum_of,
    key_dependency,
    need_model,
    no_caption_decoder,
    public,
    rerank_depth,
)
from xmodal.serve.uploads import ACCEPTED_NAMES, MEDIA_TYPES, decode_upload

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("xmodal.serve")


def build_router(state: ServeState) -> APIRouter:
    """All routes of one server, over `state`."""
    idx = state.idx
    router = APIRouter()
    auth = key_dependency(state.api_key)
    text_norms = idx.available_norms("text")
    image_norms = idx.available_norms("image")
    targets = ["images", "captions"] if state.caption_search else ["images"]
    TextNorm = enum_of(text_norms)  # noqa: N806 - a type
    ImageNorm = enum_of(image_norms)  # noqa: N806
    Target = enum_of(targets)  # noqa: N806
    # An id that exists, as the docs' example (and a start for schema-driven tests); only when ids are public.
    id_examples = [idx.ids[0]] if len(idx) and state.api_key is None else None
    # ITM re-ranking: in the schema only where the model can do it (a request for it elsewhere is a 400).
    rerank_doc = (
        f"Re-score the top N candidates with the model's ITM head and order them by it (0: off; "
        f"default: the server's --rerank, {state.rerank}). Costs N fusion passes."
    )

    @router.get("/health", summary="Liveness and what this index offers", responses=state.errors(auth=False))
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "items": len(idx),
            "kind": idx.kind,
            "model": (idx.info.get("model") or {}).get("name"),
            "model_ready": state.model_error is None,
            "random_init": state.random_init,
            "norms": {"text": text_norms, "image": image_norms},
            "captions": state.caption_search,
            "rerank": {"available": state.can_rerank, "default": state.rerank, "max": state.max_rerank},
            # POST /caption: the model's own caption of an uploaded image (a CoCa model)
            "caption": {
                "available": bool(state.can_caption) and state.model_error is None,
                "decoding": caption_decoding() if state.can_caption else None,
            },
            "fields": list(state.expose),
            "auth": state.api_key is not None,
            "limits": {
                "max_k": state.max_k,
                "max_query_chars": state.max_query_chars,
                "max_upload_bytes": state.max_upload,
                "max_pixels": state.max_pixels,
            },
        }

    @router.get("/search", summary="Text → images", dependencies=auth, responses=state.errors(400, 422, 503))
    def search(
        q: str = Query(
            ...,
            min_length=1,
            max_length=state.max_query_chars,
            pattern=NOT_BLANK,
            description="Query text (not blank)",
        ),
        k: int = Query(10, ge=1, le=state.max_k, description="How many results"),
        norm: TextNorm = Query("none", description="Hubness correction (those this index has banks for)"),
        rerank: int = Query(
            state.rerank,
            ge=0,
            le=state.max_rerank,
            description=rerank_doc,
            include_in_schema=state.can_rerank,
        ),
    ) -> dict[str, Any]:
        q = q.strip()
        if not q:  # the schema's pattern already refuses it; kept for callers that bypass validation
            raise HTTPException(400, "q: empty query")
        norm = check_norm(state, norm, "text")
        need_model(state)
        depth = rerank_depth(state, rerank)
        t0 = time.perf_counter()
        info = None
        with state.lock:
            scores, rows = idx.search_rows(state.text_vector(q), k=max(k, depth), norm=norm, modality="text")
            hits = idx.hits(scores[0], rows[0])
            if depth:
                hits, info = idx.rerank_images(q, hits, depth, k, log=log.warning)
        return {
            "query": q,
            "k": k,
            "norm": norm,
            "rerank": info,
            "results": [public(h, state.expose) for h in hits[:k]],
            "took_ms": round(1000 * (time.perf_counter() - t0), 2),
        }

    upload_encoding = {"file": {"contentType": ", ".join(MEDIA_TYPES)}}

    def caption_decoding() -> dict[str, Any]:
        from xmodal.index.captions import decoding_dict

        return decoding_dict(state.caption_decoding)

    async def read_upload(file: UploadFile) -> bytes:
        """The uploaded bytes, refused over the size limit (413) or empty (400)."""
        data = await file.read(state.max_upload + 1)
        await file.close()
        if len(data) > state.max_upload:
            raise HTTPException(413, f"file: over {state.max_upload} bytes")
        if not data:
            raise HTTPException(400, "file: empty upload")
        return data

    @router.post(
        "/search/image",
        summary="Image → images (or → captions)",
        dependencies=auth,
        responses=state.errors(400, 413, 422, 503),
        openapi_extra={"requestBody": {"content": {"multipart/form-data": {"encoding": upload_encoding}}}},
    )
    async def search_image(
        file: UploadFile = File(..., description=f"The query image: {ACCEPTED_NAMES}"),
        k: int = Form(10, ge=1, le=state.max_k, description="How many results"),
        norm: ImageNorm = Form("none", description="Hubness correction (ignored for target=captions)"),
        target: Target = Form("images", description="Search the images, or the caption gallery"),
        rerank: int = Form(
            state.rerank,
            ge=0,
            # a form field stays in the multipart schema even when hidden: there it admits only 0
            le=state.max_rerank if state.can_rerank else 0,
            description=rerank_doc + " For target=captions only: image → image results cannot be ITM "
            're-ranked, so there it is ignored (the answer says "rerank": null).',
            include_in_schema=state.can_rerank,
        ),
    ) -> dict[str, Any]:
        if target == "captions" and not state.caption_search:
            raise HTTPException(400, "target=captions: this server has no public caption gallery")
        norm = check_norm(state, norm, "image") if target == "images" else "none"
        need_model(state)
        depth = rerank_depth(state, rerank) if target == "captions" else 0  # image → image: no ITM
        data = await read_upload(file)
        t0 = time.perf_counter()
        img = await run_in_threadpool(decode_upload, data, state.max_pixels)

        def run_search() -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
            with state.lock:
                if target == "captions":
                    hits = idx.search_captions(img, k=max(k, depth))
                    return idx.rerank_captions(img, hits, depth, k) if depth else (hits, None)
                scores, rows = idx.search_rows(idx.embed_image(img), k=k, norm=norm, modality="image")
                return idx.hits(scores[0], rows[0]), None

        hits, info = await run_in_threadpool(run_search)
        return {
            "query": {"image": file.filename or "upload", "size": list(img.size)},
            "k": k,
            "norm": norm,
            "target": target,
            "rerank": info,
            "results": [public(h, state.expose) for h in hits[:k]],
            "took_ms": round(1000 * (time.perf_counter() - t0), 2),
        }

    @router.post(
        "/caption",
        summary="Image → the model's caption (CoCa models)",
        description="The caption the index's model generates for the uploaded image, decoded as the "
        "index's generated captions were (else greedy, at most 30 tokens). Only a model with a caption "
        "decoder (CoCa) can; elsewhere this route is left out of the schema and answers 400.",
        dependencies=auth,
        responses=state.errors(400, 413, 422, 503),
        # a server whose model cannot caption answers every request with 400: no operation to offer
        include_in_schema=state.can_caption is True,
        openapi_extra={"requestBody": {"content": {"multipart/form-data": {"encoding": upload_encoding}}}},
    )
    async def caption(
        file: UploadFile = File(..., description=f"The image to caption: {ACCEPTED_NAMES}"),
    ) -> dict[str, Any]:
        need_model(state)
        if state.can_caption is False:  # known from the start: before reading the upload
            raise HTTPException(400, no_caption_decoder(idx.encoder.model))
        data = await read_upload(file)
        t0 = time.perf_counter()
        img = await run_in_threadpool(decode_upload, data, state.max_pixels)

        def run_caption() -> str:
            from xmodal.data import resize_center_crop
            from xmodal.index.captions import decoding_of
            from xmodal.models.captioner import caption_images, is_coca

            with state.lock:
                enc = idx.encoder  # loaded here when the server started without it
                if not is_coca(enc.model):
                    raise HTTPException(400, no_caption_decoder(enc.model))
                x = resize_center_crop(img, int(enc.image_size))[None]  # as index build preprocesses
                return caption_images(enc, x, decoding_of(state.caption_decoding), batch_size=1)[0]

        text = await run_in_threadpool(run_caption)
        return {
            "caption": text,
            "model": (idx.info.get("model") or {}).get("name") or getattr(idx.encoder, "name", None),
            "decoding": caption_decoding(),
            "query": {"image": file.filename or "upload", "size": list(img.size)},
            "took_ms": round(1000 * (time.perf_counter() - t0), 2),
        }

    @router.get(
        "/items/{item_id:path}",
        summary="One item's public metadata (the --expose columns)",
        dependencies=auth,
        responses=state.errors(404, 422),
    )
    def item(
        item_id: str = PathParam(..., description="An indexed id", examples=id_examples),
    ) -> dict[str, Any]:
        row = idx.item(item_id)
        if row is None:
            raise HTTPException(404, "no such item")
        return public(row, state.expose)

    @router.get(
        "/thumb/{item_id:path}",
        summary="One item's thumbnail (JPEG)",
        dependencies=auth,
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
            **state.errors(404, 422),
        },
    )
    def thumb(item_id: str = PathParam(..., description="An indexed id", examples=id_examples)) -> Response:
        data = idx.thumbnail(item_id)
        if data is None:
            raise HTTPException(404, "no thumbnail for this id")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return router
