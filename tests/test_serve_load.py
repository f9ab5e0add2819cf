"""Bounded loopback load: 50 concurrent clients, a few requests each, zero errors (speed: benchmarks/)."""

from __future__ import annotations

from test_serve_api import make_index

from xmodal.serve import start_in_thread
from xmodal.serve.loadtest import percentile, run_load


def test_percentile():
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([7], 99) == 7


def test_fifty_concurrent_clients_zero_errors(tmp_path):
    out, _, enc = make_index(tmp_path, n=30, banks=False)
    server = start_in_thread(out, encoder=enc)
    try:
        r = run_load(server.url, clients=50, requests_per_client=4, timeout=60)
    finally:
        server.stop()
    assert r["requests"] == 200 and r["errors"] == 0, r["error_samples"]
    assert r["ok"] == 200 and r["wall_s"] < 120
    assert r["p50_ms"] <= r["p95_ms"]
