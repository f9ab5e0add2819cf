"""Loopback load test of `xmodal serve`: prints p50/p95 latency and QPS.

    python benchmarks/serve_load.py                       # builds a tiny demo index, serves it, loads it
    python benchmarks/serve_load.py INDEX                 # serve an existing index
    python benchmarks/serve_load.py --url http://127.0.0.1:8765 [--api-key KEY]   # an already running server
    options: --clients 50 --requests 10 --k 10

The server runs in its own process (`python -m xmodal serve`), so the load generator does not share its GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xmodal.serve.loadtest import format_report, run_load  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_index(root: Path, n: int = 500) -> Path:
    """Coloured shapes with captions, indexed with a (seeded random) xm-micro model."""
    from PIL import Image, ImageDraw

    from xmodal.index import build_index
    from xmodal.models import load_encoder

    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    rng = random.Random(0)
    (root / "data").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        color, shape = rng.choice(list(colors)), rng.choice(["circle", "square"])
        img = Image.new("RGB", (48, 48), "white")
        x, y = rng.randint(0, 20), rng.randint(0, 20)
        (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
            (x, y, x + 24, y + 24), fill=colors[color]
        )
        img.save(root / "data" / f"{i:05d}.png")
        lines.append(json.dumps({"image": f"{i:05d}.png", "caption": f"a {color} {shape}"}))
    (root / "data" / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "index"
    build_index(
        load_encoder("xm-micro"),
        root / "data" / "data.jsonl",
        out,
        model_source="xm-micro",
        progress=False,
        log=lambda m: None,
    )
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit("server did not become healthy")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", nargs="?", help="index directory (default: build a tiny demo index)")
    ap.add_argument("--url", help="load an already running server instead")
    ap.add_argument("--api-key")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=10, help="requests per client")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--no-write",
        "--no-record",
        dest="no_write",
        action="store_true",
        help="print only; do not append to BENCHMARKS.md",
    )
    ap.add_argument("--record-to", type=Path, default=None, metavar="FILE", help="append to FILE instead")
    args = ap.parse_args(argv)
    started = time.time()
    if args.url:
        result = run_load(
            args.url, clients=args.clients, requests_per_client=args.requests, api_key=args.api_key, k=args.k
        )
    else:
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(args.index) if args.index else demo_index(Path(tmp))
            port = free_port()
            env = {**os.environ, **({"XMODAL_API_KEY": args.api_key} if args.api_key else {})}
            proc = subprocess.Popen(
                [sys.executable, "-m", "xmodal", "serve", str(index), "--port", str(port)],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, proc)
                run_load(url, clients=5, requests_per_client=2, api_key=args.api_key, k=args.k)  # warm-up
                result = run_load(
                    url,
                    clients=args.clients,
                    requests_per_client=args.requests,
                    api_key=args.api_key,
                    k=args.k,
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(json.dumps({k: v for k, v in result.items() if k != "error_samples"}))
    if not args.no_write:
        import _common as C

        body = (
            f"{args.clients} concurrent loopback clients × {args.requests} `GET /search` requests "
            f"(k = {args.k}) "
            f"against `xmodal serve` in its own process"
            f"{'' if args.index or args.url else ' (a 500-item xm-micro index)'}.\n\n"
            + C.table(
                ["requests", "errors", "wall s", "QPS", "p50 ms", "p95 ms", "mean ms"],
                [
                    [
                        result["requests"],
                        result["errors"],
                        result["wall_s"],
                        result["qps"],
                        result["p50_ms"],
                        result["p95_ms"],
                        result["mean_ms"],
                    ]
                ],
            )
        )
        C.record(
            "serve_load",
            "Search server under load",
            body,
            C.machine_line(),
            started=started,
            path=args.record_to,
        )
    else:
        print(format_report(result))
    return result


if __name__ == "__main__":
    main()
