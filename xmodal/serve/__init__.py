"""Serving an index over HTTP: `create_app` (FastAPI), `run` (blocking), `start_in_thread` (tests, demo)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def __getattr__(name: str) -> Any:
    """`create_app` loads FastAPI on first use (`xmodal serve --help` and the other commands never do)."""
    if name == "create_app":
        from xmodal.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'xmodal.serve' has no attribute {name!r}")


def run(
    index_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    api_key: str | None = None,
    *,
    max_upload_mb: float = 10.0,
    max_pixels: int = 40_000_000,
    encoder: Any = None,
    expose: str | Sequence[str] | None = None,
    log_level: str = "info",
    rerank: int = 0,
    max_rerank: int = 64,
) -> None:
    """Serve the index at `index_path` until interrupted (blocking). Binds loopback unless `host` says
    otherwise; a non-loopback host without an API key gets a warning on stderr (random weights get one
    from `load_encoder`). rerank / max_rerank: ITM re-ranking depth by default and per request at most
    (see `create_app`)."""
    import uvicorn

    from xmodal.serve.app import create_app
    from xmodal.serve.middleware import is_loopback_address

    if not is_loopback_address(host) and not api_key:
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach this port can search "
            "the index",
            file=sys.stderr,
        )
    app = create_app(
        index_path,
        api_key=api_key,
        max_upload_mb=max_upload_mb,
        max_pixels=max_pixels,
        encoder=encoder,
        expose=expose,
        host=host,
        rerank=rerank,
        max_rerank=max_rerank,
    )
    if rerank:
        print(f"ITM re-ranking on: the top {rerank} candidates of each text query", file=sys.stderr)
    print(f"serving {index_path} at http://{host}:{port}/  (API docs: /docs)", file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        limit_concurrency=512,
        timeout_keep_alive=5,
    )


class ServerThread:
    """A uvicorn server on a background thread. `.url` once started; `.stop()` to shut it down."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the OS picks a free one, no race with other tests
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level=log_level, server_header=False, limit_concurrency=512, timeout_keep_alive=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self.sock]},
            daemon=True,
            name=f"xmodal-serve-{self.port}",
        )

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start() if not self.thread.is_alive() else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_in_thread(
    index_path: str | Path | None = None, host: str = "127.0.0.1", port: int = 0, **app_kwargs: Any
) -> ServerThread:
    """Start a server for the index on a background thread and return it (started). port=0 picks a free port.
    app_kwargs go to `create_app` (api_key, max_upload_mb, max_pixels, encoder, index, expose, ...)."""
    from xmodal.serve.app import create_app

    app = create_app(index_path, host=host, **app_kwargs)
    return ServerThread(app, host=host, port=port).start()


run_server = run  # the name xmodal.demo uses

__all__ = ["ServerThread", "create_app", "run", "run_server", "start_in_thread"]
