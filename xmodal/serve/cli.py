"""`xmodal serve INDEX`: the search API and web page."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from xmodal.errors import UserError

DEFAULT_EXPOSE = "id,caption,label"


def serve_cmd(
    index: Path = typer.Argument(..., help="Index directory (xmodal index build)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: loopback only)."),
    port: int = typer.Option(8765, "--port", help="TCP port."),
    api_key: str = typer.Option(
        None, "--api-key", help="Require this X-API-Key header (or set XMODAL_API_KEY)."
    ),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Largest accepted image upload."),
    max_pixels: float = typer.Option(40e6, "--max-pixels", help="Largest accepted image, in pixels."),
    model: str = typer.Option(None, "--model", help="Override the model recorded in the index."),
    pretrained: str = typer.Option(None, "--pretrained"),
    expose: str = typer.Option(
        DEFAULT_EXPOSE,
        "--expose",
        help="Comma-separated metadata columns that /items and search hits show (id always; "
        "columns the index lacks are skipped only in the default).",
    ),
    rerank: int = typer.Option(
        0,
        "--rerank",
        help="Re-score the top N candidates of each text query (and image → caption query) with the "
        "model's ITM (fusion) head; requests may override it with `rerank` (0: off).",
    ),
    max_rerank: int = typer.Option(
        64, "--max-rerank", help="The largest `rerank` a request may ask for (N fusion passes each)."
    ),
) -> None:
    """Serve an index: JSON API (/search, /search/image, /caption, /items, /thumb, /health, /docs) and a web
    page at /. On loopback without --api-key it answers only to loopback Host names (else 400), so that a
    web page cannot reach it through DNS rebinding."""
    from xmodal.index import open_index
    from xmodal.serve import run

    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be 1-65535")
    if max_upload_mb <= 0 or max_pixels <= 0:
        raise UserError("--max-upload-mb and --max-pixels must be positive")
    if not 0 <= max_rerank <= 1000:
        raise UserError(f"--max-rerank {max_rerank}: must be between 0 and 1000")
    if not 0 <= rerank <= max_rerank:
        raise UserError(f"--rerank {rerank}: must be between 0 (off) and --max-rerank ({max_rerank})")
    key = api_key or os.environ.get("XMODAL_API_KEY") or None
    open_index(index)  # a clear error for a bad path before uvicorn starts
    encoder = None
    if model:
        from xmodal.models import load_encoder

        encoder = load_encoder(model, pretrained)
    run(
        index,
        host=host,
        port=port,
        api_key=key,
        max_upload_mb=max_upload_mb,
        max_pixels=int(max_pixels),
        encoder=encoder,
        expose=None if expose == DEFAULT_EXPOSE else expose,
        rerank=rerank,
        max_rerank=max_rerank,
    )


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
