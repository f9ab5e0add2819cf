"""What every route of the search server shares: its settings (`ServeState`), the API-key check, query
validation, the model-needed check, which metadata columns are public, and the documented errors."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from cachetools import LRUCache
from fastapi import Security
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from xmodal.errors import UserError

DEFAULT_EXPOSE = ("id", "caption", "label", "caption_generated")  # those the index has
# Not blank: a character that str.strip() keeps (\s is the same set in Python's and pydantic's Rust regex,
# bar \x1c-\x1f, which only str.strip() removes).
NOT_BLANK = r"[^\s\x1c-\x1f]"


class ErrorBody(BaseModel):
    """Every error answer: one line saying what was wrong."""

    error: str


ERROR_TEXT = {
    400: "Bad request (the message says which field and why)",
    401: "Missing or wrong X-API-Key header",
    404: "Unknown id",
    413: "Upload over the size or pixel limit",
    422: "A parameter outside its documented type or range",
    503: "The index's model is not available on this server",
}


@dataclass
class ServeState:
    """One server's index and settings; the routes read it, nothing writes it after start."""

    idx: Any
    api_key: str | None
    expose: tuple[str, ...]
    max_k: int
    max_query_chars: int
    max_upload: int
    max_pixels: int
    random_init: bool
    host_check: bool
    model_error: str | None = None
    rerank: int = 0  # ITM re-ranking depth of every text query (and image → caption query) by default
    max_rerank: int = 64  # the most a request's `rerank` may ask for: k fusion passes, bounded latency
    can_rerank: bool = False  # the model has a fusion (ITM) head
    # POST /caption: True/False once the model is loaded (a CoCa model has a caption decoder), None before
    can_caption: bool | None = None
    caption_decoding: dict[str, Any] | None = None  # POST /caption's decoding as recorded; None: defaults
    lock: threading.Lock = field(default_factory=threading.Lock)  # one model/search at a time
    text_cache: LRUCache = field(default_factory=lambda: LRUCache(maxsize=1024))  # popular queries repeat
    cache_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def caption_search(self) -> bool:
        """Image → caption search is offered only when captions are public."""
        return bool(self.idx.has_captions) and "caption" in self.expose

    def text_vector(self, q: str) -> Any:
        with self.cache_lock:
            v = self.text_cache.get(q)
        if v is None:
            v = self.idx.embed_text([q])
            with self.cache_lock:
                self.text_cache[q] = v
        return v

    def errors(self, *codes: int, auth: bool = True) -> dict[int | str, dict[str, Any]]:
        """`responses=` for a route: the given codes, plus 401 where the key is needed (auth) and 400 with
        the Host check."""
        want = (
            set(codes) | ({401} if auth and self.api_key else set()) | ({400} if self.host_check else set())
        )
        out: dict[int | str, dict[str, Any]] = {}
        for c in sorted(want):
            text = ERROR_TEXT[c]
            if c == 400 and self.host_check:
                text += "; also a Host header that is not a loopback name"
            out[c] = {"model": ErrorBody, "description": text}
        return out


def resolve_expose(idx: Any, expose: str | Sequence[str] | None) -> tuple[str, ...]:
    """The metadata columns clients may see: `expose` (comma-separated or a list; `id` always), checked
    against the index's columns, else the default id, caption, label where present."""
    columns = list(idx.meta.schema.names)
    if expose is None:
        return tuple(c for c in DEFAULT_EXPOSE if c in columns or c == "id")
    names = expose.split(",") if isinstance(expose, str) else list(expose)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise UserError(
            f"--expose {','.join(unknown)}: no such column in the index (it has: {', '.join(columns)})"
        )
    return tuple(dict.fromkeys(["id", *names]))


def public(hit: dict[str, Any], expose: Sequence[str]) -> dict[str, Any]:
    """A hit or item as clients see it: rank and score (plus itm and retrieval_rank when re-ranked, and
    embedded_by old/new after `index upgrade`), the exposed columns, and links to item and thumb."""
    always = ("rank", "score", "itm", "retrieval_rank", "embedded_by")
    out = {k: v for k, v in hit.items() if k in expose or k in always}
    out["thumb"] = f"/thumb/{quote(str(hit['id']), safe='')}"
    out["item"] = f"/items/{quote(str(hit['id']), safe='')}"
    return out


def key_dependency(api_key: str | None) -> list[Any]:
    """Route dependencies for the API key: none without one, else an `X-API-Key` check (in the schema)."""
    if api_key is None:
        return []
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's --api-key")

    def check_key(given: str | None = Security(header)) -> None:
        if not hmac.compare_digest((given or "").encode(), api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key (send it in the X-API-Key header)",
                headers={"WWW-Authenticate": "X-API-Key"},
            )

    return [Security(check_key)]


def need_model(state: ServeState) -> None:
    if state.model_error is not None:
        raise HTTPException(503, f"the index's model is not available on this server: {state.model_error}")


def no_caption_decoder(model: Any) -> str:
    """The 400 of POST /caption on a server whose model cannot caption."""
    return (
        f"POST /caption: this server's model has no caption decoder (it is a {type(model).__name__}, "
        "not a CoCa model); build the index from a CoCa run (xmodal train --model xm-coca-tiny "
        "--objective clip+caption:2)"
    )


def rerank_depth(state: ServeState, requested: int) -> int:
    """The ITM re-ranking depth of one request (the `rerank` field, whose default is the server's
    --rerank; 0 = off). A request for re-ranking the model cannot do is a 400."""
    if requested and not state.can_rerank:
        why = state.model_error or "its model has no fusion (ITM) head (train with --objective clip+itm)"
        raise HTTPException(400, f"rerank={requested}: this server cannot ITM re-rank: {why}")
    return requested


def check_norm(state: ServeState, norm: str, modality: str) -> str:
    """The enum in the schema already limits `norm`; this is the same rule for callers that bypass it."""
    allowed = state.idx.available_norms(modality)
    if norm not in allowed:
        use = ", ".join(allowed)
        raise HTTPException(
            400, f"norm={norm!r} is not available for {modality} queries here; use one of {use}"
        )
    return norm


def enum_of(values: Sequence[str]) -> Any:
    """A `Literal[...]` of these values, so that /openapi.json lists exactly what this server accepts."""
    return Literal[tuple(values)]  # type: ignore[valid-type]


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """FastAPI's list of validation errors → one line naming the first bad field."""
    if not errors:
        return "invalid request"
    e = errors[0]
    where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
    return f"{where}: {e.get('msg', 'invalid')}"
