"""Atomic checkpoints: a crash (even SIGKILL) mid-write never leaves a broken latest.pt."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from xmodal.fsutil import load_torch_safe, save_torch_atomic


def save_checkpoint(state: dict[str, Any], ckpt_dir: Path, step: int, keep: int = 3) -> Path:
    """Write step_N.pt and point latest.pt at the same bytes (hard link, renamed atomically)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step}.pt"
    save_torch_atomic(state, path)
    tmp = ckpt_dir / f".latest.pt.tmp{os.getpid()}"
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)
        os.replace(tmp, ckpt_dir / "latest.pt")
    except OSError:  # filesystems without hard links
        save_torch_atomic(state, ckpt_dir / "latest.pt")
    if keep > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [
        (int(m.group(1)), p)
        for p in ckpt_dir.glob("step_*.pt")
        if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))
    ]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> dict[str, Any]:
    return load_torch_safe(path, "checkpoint")
