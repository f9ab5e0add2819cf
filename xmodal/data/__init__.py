"""Data layer: manifest readers, safe decoding, the preprocessed cache, and the built-in datasets.

The names below load on first use (PEP 562), so `import xmodal.data` (the CLI's help, the index layer)
does not import torch until a dataset is actually read."""

from xmodal.lazy import lazy_exports

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

__getattr__ = lazy_exports("xmodal.data", _EXPORTS)
