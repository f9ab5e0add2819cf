"""Evaluation suite: retrieval, zero-shot, compositional probe, hubness, modality gap, robustness,
with JSON + self-contained HTML reports. Metric definitions: docs/eval.md.

The names below load on first use (PEP 562): `xmodal eval --help` imports no torch."""

from xmodal.lazy import lazy_exports

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

__getattr__ = lazy_exports("xmodal.eval", _EXPORTS)
