"""Where a training command's wall time goes: start-up (interpreter and imports), model build, data (decode
and cache), batcher (tokenisation), teacher cache, steps, validation, checkpoints, finish. Written to
RUN/profile.json and printed as one line at the end, so a user sees what is outside the steps on their CPU."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from xmodal.fsutil import write_text_atomic

PHASES = ("startup", "model", "data", "batcher", "teacher", "steps", "validation", "checkpoints", "finish")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started)


_command: dict[str, float] = {}  # when the current `xmodal` command began (see mark_command_start)


def mark_command_start() -> None:
    """Called by the CLI's entry point: the first command of a process counts the interpreter's start and
    the imports before it (the process's age); a later one in the same process (tests, benchmarks calling
    the CLI in-process) counts from its own start."""
    first = not _command
    _command["at"] = time.perf_counter()
    _command["before"] = (process_age_s() or 0.0) if first else 0.0


class Phases:
    """Wall seconds per phase. `startup` runs from the command's start (for the process's first command, the
    interpreter's start) to the trainer's creation: imports and argument parsing; absent when the trainer is
    used from Python. A phase timed with `with phases("name")` adds its duration; the steps are what remains
    of the loop once validation and checkpoints are taken out."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}
        if _command:
            self.seconds["startup"] = _command["before"] + self.t0 - _command["at"]

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return self.seconds.get("startup", 0.0) + time.perf_counter() - self.t0

    def report(self, steps: int, samples: int) -> dict:
        total = self.total()
        out = {k: round(self.seconds[k], 3) for k in PHASES if k in self.seconds}
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 3)
        return {"wall_s": round(total, 3), "phases_s": out, "steps": steps, "samples": samples}

    def write(self, run_dir: Path, steps: int, samples: int) -> str:
        """RUN/profile.json, and the one-line summary."""
        rep = self.report(steps, samples)
        write_text_atomic(run_dir / "profile.json", json.dumps(rep, indent=2) + "\n")
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in rep["phases_s"].items() if v >= 0.05)
        return f"time: {rep['wall_s']:.1f} s ({parts})"
