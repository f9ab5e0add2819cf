"""Shared fixtures: tiny image-text manifests made on the fly, an isolated cache dir."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


# the smallest model, in plain fp32, quiet, batch 8: what CLI tests train with
MICRO_TRAIN = ["--model", "xm-micro", "--precision", "fp32", "--no-progress", "--batch-size", "8"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path_factory.getbasetemp() / "xmodal-cache"))


def write_tiny_manifest(folder: Path, n: int = 40, size: int = 40, seed: int = 0) -> Path:
    """n small images of one coloured shape, captioned with colour and shape; label = shape."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        img = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(img)
        x0, y0 = rng.randint(0, size // 3), rng.randint(0, size // 3)
        box = (x0, y0, x0 + size // 2, y0 + size // 2)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
        name = f"img_{i:03d}.png"
        img.save(folder / name)
        lines.append(
            {"image": name, "caption": [f"a {color} {shape}", f"{color} {shape} on white"], "label": shape}
        )
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def tiny_manifest(tmp_path) -> Path:
    return write_tiny_manifest(tmp_path / "tiny")


def run_cli(
    *args: str, env: dict | None = None, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `python -m xmodal ARGS` as a user would; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "xmodal", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"xmodal {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class Result:
    """What a CLI call left: exit code, stdout, stderr (the shape of subprocess.CompletedProcess)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_in_process(*args, check: bool = True) -> Result:
    """`xmodal ARGS` in this process through the console script's entry point: no interpreter or torch
    start-up per call. `run_cli` runs a real subprocess where a test needs one."""
    import contextlib
    import io

    from xmodal.cli import main

    out, err, saved = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["xmodal", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    if check and rc != 0:
        raise AssertionError(
            f"xmodal {' '.join(map(str, args))} failed ({rc}):\n{out.getvalue()}\n{err.getvalue()}"
        )
    return Result(rc, out.getvalue(), err.getvalue())


def sigkill_at_line(args: list[str], prefix: str, env: dict | None = None, timeout: float = 240) -> str:
    """Run `xmodal ARGS` as a real process, SIGKILL it as soon as a stderr line starts with `prefix`, and
    return the stderr it printed; fails unless the kill is what ended it (a crash test's first half)."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "xmodal", *map(str, args)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith(prefix):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


def train_fused_and_plain(manifest: Path, root: Path) -> tuple[Path, Path]:
    """Two xm-micro runs on `manifest` for the re-ranking tests: one with a fusion encoder
    (clip+itm+mlm, 6 steps) and one without (clip, 1 step)."""
    fused, plain = root / "fused", root / "plain"
    run_in_process("train", "--data", manifest, "--out", fused, *MICRO_TRAIN, "--steps", "6",
                   "--objective", "clip+itm+mlm")  # fmt: skip
    run_in_process("train", "--data", manifest, "--out", plain, *MICRO_TRAIN, "--steps", "1",
                   "--objective", "clip")  # fmt: skip
    return fused, plain


COCA_TRAIN = ["--model", "xm-coca-tiny", "--precision", "fp32", "--no-progress", "--batch-size", "8"]


@pytest.fixture(scope="session")
def coca_run(tmp_path_factory) -> Path:
    """One tiny CoCa run (xm-coca-tiny, clip+caption:2, 6 steps on 24 tiny shapes) shared by the
    captioning tests: read it, never write into it. Its captions are gibberish; the tests check
    mechanics (decoding, files, resumption, metrics), not quality."""
    root = tmp_path_factory.mktemp("coca")
    manifest = write_tiny_manifest(root / "data", n=24)
    with pytest.MonkeyPatch.context() as mp:  # session scope: the autouse cache fixture is not active yet
        mp.setenv("XMODAL_CACHE", str(root / "cache"))
        run_in_process("train", "--data", manifest, "--out", root / "run", *COCA_TRAIN, "--steps", "6",
                       "--objective", "clip+caption:2")  # fmt: skip
    return root / "run"


def assert_one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    """A CLI refusal as users should see it: exit 2, one stderr line naming `needle`, no traceback."""
    assert p.returncode == 2, (p.stdout, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in p.stderr, p.stderr


# Headless Chromium as root on this closed network: no sandbox, no background connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def one_thread():
    """The test machine is small and shared: oversubscribed BLAS/OpenMP threads spin instead of working."""
    import faiss
    from threadpoolctl import threadpool_limits

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    faiss.omp_set_num_threads(n)


# -- brute-force references for the objectives' tests (float64, python loops) ----------------------------


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """n seeded random unit vectors in float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def dot(a, b) -> float:
    return sum(p * q for p, q in zip(a, b, strict=True))


def log_softmax(logits) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in logits))
    return [v - lse for v in logits]
