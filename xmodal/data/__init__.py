"""Data layer: manifest readers, safe decoding, the preprocessed cache, and the built-in datasets."""

from xmodal.data.dataset import ImageTextData, load_dataset, resize_center_crop
from xmodal.data.decode import load_image
from xmodal.data.emoji import make_emoji
from xmodal.data.records import DataStats, Record, read_records
from xmodal.data.shapes import make_shapes

__all__ = [
    "DataStats",
    "ImageTextData",
    "Record",
    "load_dataset",
    "load_image",
    "make_emoji",
    "make_shapes",
    "read_records",
    "resize_center_crop",
]
