"""Atomic checkpoints: a crash (even SIGKILL) mid-write never leaves a broken latest.pt."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict[str, Any], ckpt_dir: Path, step: int, keep: int = 3) -> Path:
    """Write step_N.pt and point latest.pt at the same bytes (hard link, renamed atomically)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step}.pt"
    atomic_save(state, path)
    tmp = ckpt_dir / f".latest.pt.tmp{os.getpid()}"
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)
        os.replace(tmp, ckpt_dir / "latest.pt")
    except OSError:  # filesystems without hard links
        atomic_save(state, ckpt_dir / "latest.pt")
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
    return torch.load(path, map_location="cpu", weights_only=False)
