"""Thumbnails of indexed items: one blob file (thumbs.bin) plus (offset, length) per row (thumbs.npy)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class Thumbs:
    """Thumbnails as (offset, length) into one blob file, plus in-memory ones not yet saved."""

    def __init__(self, blob: Path | None = None, index: np.ndarray | None = None) -> None:
        self.blob = blob
        self.entries: list[tuple[int, int] | bytes | None] = []
        if index is not None:
            self.entries = [(int(o), int(n)) if n > 0 else None for o, n in index]
        self._lock = threading.Lock()
        # Opened now, so a reader keeps the blob it was loaded with even if a writer swaps the folder later.
        self._fh = open(blob, "rb") if blob is not None and blob.is_file() else None  # noqa: SIM115

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, i: int) -> bytes | None:
        e = self.entries[i]
        if e is None or isinstance(e, bytes):
            return e
        off, n = e
        with self._lock:
            if self._fh is None:
                self._fh = open(self.blob, "rb")  # noqa: SIM115 - kept open for the server's lifetime
            self._fh.seek(off)
            return self._fh.read(n)

    def extend(self, items: Sequence[bytes | None]) -> None:
        self.entries.extend(items)

    def keep(self, mask: np.ndarray) -> None:
        self.entries = [e for e, k in zip(self.entries, mask, strict=True) if k]

    def write(self, folder: Path) -> None:
        """Write thumbs.bin and thumbs.npy into `folder` (the temp folder that `save` swaps in whole)."""
        idx = np.zeros((len(self.entries), 2), dtype=np.int64)
        off = 0
        with open(folder / "thumbs.bin", "wb") as f:
            for i in range(len(self.entries)):
                data = self.get(i)
                if data:
                    f.write(data)
                    idx[i] = (off, len(data))
                    off += len(data)
        np.save(folder / "thumbs.npy", idx)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self) -> None:
        self.close()
