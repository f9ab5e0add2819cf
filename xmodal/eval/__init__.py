"""Evaluation suite: retrieval, zero-shot, compositional probe, hubness, modality gap, robustness,
with JSON + self-contained HTML reports. Metric definitions: docs/eval.md.

The names below load on first use (PEP 562): `xmodal eval --help` imports no torch."""

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_TASKS": "suite",
    "TASKS": "core",
    "EmbeddingCache": "cache",
    "EvalOptions": "core",
    "evaluate": "suite",
    "parse_tasks": "suite",
    "read_templates": "core",
    "write_json": "suite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"xmodal.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'xmodal.eval' has no attribute {name!r}")
