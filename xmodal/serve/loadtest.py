"""A bounded loopback load test for `xmodal serve`: N concurrent clients, M requests each, latency
percentiles.

Used by benchmarks/serve_load.py (prints the numbers) and by the tests (fewer requests). Speed is measured
here, not asserted in unit tests; the tests only assert that nothing failed.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_QUERIES = (
    "a red circle",
    "a green square",
    "blue circle on white",
    "a yellow square",
    "red square",
    "green circle",
    "a blue square on white",
    "yellow circle",
)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    rank = max(1, min(len(xs), math.ceil(p / 100 * len(xs))))
    return xs[rank - 1]


async def _client(
    client: Any, n: int, queries: Sequence[str], offset: int, k: int, lat: list[float], errors: list[str]
) -> None:
    for i in range(n):
        q = queries[(offset + i) % len(queries)]
        t0 = time.perf_counter()
        try:
            r = await client.get("/search", params={"q": q, "k": k})
            ok = r.status_code == 200 and len(r.json().get("results", [])) > 0
        except Exception as e:  # noqa: BLE001 - every failure counts as an error, none aborts the run
            errors.append(f"{type(e).__name__}: {e}")
            continue
        if ok:
            lat.append(time.perf_counter() - t0)
        else:
            errors.append(f"{r.status_code}: {r.text[:200]}")


async def _run(
    base_url: str,
    clients: int,
    requests_per_client: int,
    queries: Sequence[str],
    api_key: str | None,
    k: int,
    timeout: float,
) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(_client(client, requests_per_client, queries, c, k, lat, errors) for c in range(clients))
        )
        wall = time.perf_counter() - t0
    total = clients * requests_per_client
    return {
        "clients": clients,
        "requests": total,
        "ok": len(lat),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": round(wall, 3),
        "qps": round(len(lat) / wall, 1) if wall > 0 else float("nan"),
        "p50_ms": round(1000 * percentile(lat, 50), 2) if lat else None,
        "p95_ms": round(1000 * percentile(lat, 95), 2) if lat else None,
        "mean_ms": round(1000 * statistics.fmean(lat), 2) if lat else None,
    }


def run_load(
    base_url: str,
    *,
    clients: int = 50,
    requests_per_client: int = 10,
    queries: Sequence[str] = DEFAULT_QUERIES,
    api_key: str | None = None,
    k: int = 10,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run `clients` concurrent clients, each sending `requests_per_client` GET /search requests one after
    another. Returns counts, wall time, QPS and p50/p95 latency (ms)."""
    return asyncio.run(_run(base_url, clients, requests_per_client, list(queries), api_key, k, timeout))


def format_report(r: dict[str, Any]) -> str:
    return (
        f"{r['requests']} requests from {r['clients']} clients in {r['wall_s']} s: "
        f"{r['qps']} QPS, p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, errors {r['errors']}"
    )
