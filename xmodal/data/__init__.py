"""Data layer: manifest readers, safe decoding, the preprocessed cache, and the built-in datasets.

The names below load on first use (PEP 562), so `import xmodal.data` (the CLI's help, the index layer)
does not import torch until a dataset is actually read."""

import importlib
from typing import Any

_EXPORTS = {
    "DataStats": "records",
    "ImageTextData": "dataset",
    "Record": "records",
    "load_dataset": "dataset",
    "load_image": "decode",
    "make_emoji": "emoji",
    "make_shapes": "shapes",
    "read_records": "records",
    "resize_center_crop": "dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"xmodal.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'xmodal.data' has no attribute {name!r}")
