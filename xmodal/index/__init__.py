"""Cross-modal search indexes: embed a collection, store it as FAISS + metadata, search it (with optional
hubness correction), keep it up to date. See docs/search.md."""

from xmodal.index.build import add_bank, add_to_index, build_index, delete_from_index
from xmodal.index.store import KINDS, NORMS, SearchIndex, open_index

__all__ = [
    "KINDS",
    "NORMS",
    "SearchIndex",
    "add_bank",
    "add_to_index",
    "build_index",
    "delete_from_index",
    "open_index",
]
