"""Cross-modal search indexes: embed a collection, store it as FAISS + metadata, search it (with optional
hubness correction), keep it up to date. See docs/search.md.

Every name loads on first use (PEP 562): importing `xmodal.index` costs nothing, opening an index for
vector search needs only faiss, numpy and pyarrow, and the build functions (which embed with the model)
import torch.
"""

from typing import Any

_STORE = ("KINDS", "NORMS", "SearchIndex", "open_index")

_BUILD = ("add_bank", "add_to_index", "build_index", "delete_from_index")
_CHUNKS = ("ChunkPlan", "embed_chunk", "plan_chunks")  # scale-out: one chunk per map task (docs/search.md)

__all__ = [
    "ChunkPlan",
    "KINDS",
    "NORMS",
    "SearchIndex",
    "add_bank",
    "add_to_index",
    "build_index",
    "delete_from_index",
    "embed_chunk",
    "open_index",
    "plan_chunks",
]


def __getattr__(name: str) -> Any:
    if name in _STORE:
        from xmodal.index import store

        return getattr(store, name)
    if name in _BUILD:
        from xmodal.index import build

        return getattr(build, name)
    if name in _CHUNKS:
        from xmodal.index import embed

        return getattr(embed, name)
    raise AttributeError(f"module 'xmodal.index' has no attribute {name!r}")
