"""ASGI middleware of the search server: request-body limit, security headers, and the Host check that
protects a loopback server without an API key from DNS rebinding."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from starlette.exceptions import HTTPException

HOST_CHECK_STATUS = 400  # what a request with a foreign Host header gets (like Django's DisallowedHost)


class TooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


async def send_json(send: Any, status: int, body: dict) -> None:
    """Answer a request straight from middleware with a JSON body (the app never sees it)."""
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuse request bodies over `max_bytes` (by Content-Length, or while streaming)."""

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
                    await send_json(send, 413, {"error": f"request body over {self.max_bytes} bytes"})
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
                await send_json(send, 413, {"error": e.detail})


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


def is_loopback_address(host: str | None) -> bool:
    """True for a bind address on this machine only: 127.0.0.0/8, ::1 or localhost."""
    if not host:
        return False
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def is_loopback_host_header(value: str) -> bool:
    """True when a Host header names loopback: localhost, 127.x.x.x or [::1], with or without a port."""
    v = value.strip().lower()
    if v.startswith("["):  # [v6] or [v6]:port
        name, sep, rest = v[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and _is_port(rest[1:]))):
            return False
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:
            return False
        return addr.version == 6 and addr.is_loopback
    name, sep, port = v.partition(":")
    if sep and not _is_port(port):
        return False
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    return addr.version == 4 and addr.is_loopback


def _is_port(s: str) -> bool:
    return s.isascii() and s.isdigit() and 0 < int(s) < 65536


class HostCheck:
    """Answer only requests whose Host header is a loopback name (DNS-rebinding guard).

    A web page on evil.example can make its own name resolve to 127.0.0.1 and then read a keyless loopback
    server from the victim's browser; the browser still sends `Host: evil.example`, so such requests get a
    400 here. Installed only when the server binds loopback and has no API key."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = ""
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1")
                break
        if not is_loopback_host_header(host):
            shown = host[:100] if host.isprintable() else ascii(host[:100])
            await send_json(
                send,
                HOST_CHECK_STATUS,
                {
                    "error": f"Host header {shown!r} refused: this server listens on loopback without an "
                    "API key and answers only to localhost, 127.0.0.1 or [::1] (--api-key lifts this)"
                },
            )
            return
        await self.app(scope, receive, send)
