"""Start-up cost of the short commands: `xmodal --help`, a command's help, an argument error, `index info`
and a one-off `xmodal search`, each as a fresh process, now against an earlier revision, in one run.

    python benchmarks/startup.py                     # against the commit before the lazy imports
    python benchmarks/startup.py --before HEAD~3 --repeats 7

The earlier revision is checked out in a temporary git worktree and run from there (`python -m xmodal`
with that tree first on the path), so both sides share this machine, this Python and these libraries.
The floors beside them: an empty `python -c pass`, and `import torch` (which a text query needs for the
model anyway). The search index is a 1,000-image shapes test set embedded by xm-micro's seeded random
init, built once (a model that loads in milliseconds, so the imports are what is measured).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_WORK, REPO, add_record_args, ensure_shapes, fmt, machine_line, record, table  # noqa: E402

BEFORE = "a32af88"  # the last commit before the CLI's packages loaded their names lazily


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE, help="git revision to compare against")
    p.add_argument("--repeats", type=int, default=5, help="runs per command and side (median reported)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK / "startup")
    p.add_argument("--quick", action="store_true", help="2 repeats")
    add_record_args(p)
    a = p.parse_args(argv)
    if a.quick:
        a.repeats = 2
    return a


def wall(cmd: list[str], cwd: Path, repeats: int) -> float:
    """Median wall seconds of `cmd` as a fresh process (its output discarded; any exit code)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    started = time.time()
    a.work.mkdir(parents=True, exist_ok=True)
    idx = a.work / "shapes-micro.idx"
    if not (idx / "index.json").is_file():
        shapes = ensure_shapes(DEFAULT_WORK)
        build = ["index", "build", "xm-micro", "--data", str(shapes / "test.jsonl"), "--out", str(idx)]
        subprocess.run([sys.executable, "-m", "xmodal", *build, "--no-progress"], cwd=REPO, check=True)
    before = Path(tempfile.mkdtemp(prefix="xmodal-before-"))
    shutil.rmtree(before)
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), a.before], cwd=REPO, check=True)
    rev = subprocess.run(["git", "rev-parse", "--short", a.before], cwd=REPO, capture_output=True, text=True)
    try:
        py = sys.executable
        commands = [
            ("`xmodal --help`", ["--help"]),
            ("`xmodal train --help`", ["train", "--help"]),
            ("`xmodal train --no-such-flag` (argument error)", ["train", "--no-such-flag"]),
            ("`xmodal index info INDEX`", ["index", "info", str(idx)]),
            ('`xmodal search INDEX "a red circle" --k 3`', ["search", str(idx), "a red circle", "--k", "3"]),
        ]
        rows = []
        for label, args in commands:
            old = wall([py, "-m", "xmodal", *args], before, a.repeats)
            new = wall([py, "-m", "xmodal", *args], REPO, a.repeats)
            rows.append([label, f"{old:.2f}", f"{new:.2f}", f"{old / new:.1f}×"])
            print(rows[-1], flush=True)
        floor = wall([py, "-c", "pass"], REPO, a.repeats)
        torch_s = wall([py, "-c", "import torch"], REPO, a.repeats)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False)
    body = (
        f"Each command as a fresh process, median of {a.repeats}, seconds; before = {rev.stdout.strip()} "
        f"(`{a.before}`), now = this checkout. Floors: `python -c pass` {fmt(floor, 2)} s, "
        f"`python -c 'import torch'` {fmt(torch_s, 2)} s.\n\n"
        + table(["command", "before s", "now s", "speed-up"], rows)
    )
    record("startup", "Start-up of the short commands", body, machine_line(), started=started,
           write=not a.no_write, path=a.record_to)  # fmt: skip


if __name__ == "__main__":
    main()
