"""Evaluation suite: retrieval, zero-shot, compositional probe, hubness, modality gap, robustness,
with JSON + self-contained HTML reports. Metric definitions: docs/eval.md."""

from xmodal.eval.cache import EmbeddingCache
from xmodal.eval.core import TASKS, EvalOptions, read_templates
from xmodal.eval.suite import DEFAULT_TASKS, evaluate, parse_tasks, write_json

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "EmbeddingCache",
    "EvalOptions",
    "evaluate",
    "parse_tasks",
    "read_templates",
    "write_json",
]
