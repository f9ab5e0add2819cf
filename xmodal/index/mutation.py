"""Mutation: the `MutationMixin` part of `SearchIndex` — add and delete items in memory (`save` writes them).

Both hold the index folder's writer lock (`fsutil.locked`, re-entrant within a process) for an index that
lives on disk, so a Python caller and an `xmodal index add/delete/bank` in another process never interleave.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xmodal import fsutil
from xmodal.errors import UserError
from xmodal.index.ann import effective_kind, l2n
from xmodal.index.meta import concat_meta, now, rows_to_table


class MutationMixin:
    """Adding and removing items of a `SearchIndex`."""

    def _writing(self) -> AbstractContextManager:
        """The writer lock of the index's folder (re-entrant in-process); none for an unsaved index."""
        return fsutil.locked(self.path) if self.path is not None else contextlib.nullcontext()

    def add(
        self,
        data: Any,
        *,
        encoder: Any = None,
        chunk_size: int = 4096,
        progress: bool = False,
        log: Any = None,
    ) -> int:
        """Embed `data` (manifest path, ImageTextData or Records) with the index's model and append it in
        memory; `.save()` writes it. Returns the number of items added (undecodable images are skipped)."""
        import tempfile

        from xmodal.index import captions as gen_captions
        from xmodal.index.embed import embed_collection, to_collection

        with self._writing():
            if encoder is not None:
                self.encoder = encoder
            mode, decoding = gen_captions.recorded(self.info)  # generated captions go on for new items
            coll, _ = to_collection(data, captions=mode)
            dup = [i for i in coll.ids if i in self._row]
            if dup:
                raise UserError(f"{len(dup)} id(s) already in the index (e.g. {dup[0]!r}); delete them first")
            with tempfile.TemporaryDirectory(prefix="xmodal-add-") as work:
                emb = embed_collection(
                    self.encoder,
                    coll,
                    Path(work) / "chunks",
                    chunk_size=chunk_size,
                    caption_gallery=bool(self.info.get("caption_gallery")),
                    thumb_size=int(self.info.get("thumb_size") or 128),
                    progress=progress,
                    log=log or (lambda m: None),
                    captions=mode,
                    decoding=decoding,
                )
            return self.add_embedded(emb)

    def add_embedded(self, emb: Any) -> int:
        """Append already embedded items (an `embed.Embedded`). Ids must be new. Returns the count added."""
        if not emb.rows:
            return 0
        new_ids = [r["id"] for r in emb.rows]
        dup = [i for i in new_ids if i in self._row]
        if dup:
            raise UserError(
                f"{len(dup)} id(s) already in the index (e.g. {dup[0]!r}); delete them first "
                "(xmodal index delete) or index them under other names"
            )
        with self._writing():
            n0 = len(self)
            self.vectors = np.concatenate([np.asarray(self.vectors, np.float32), l2n(emb.vectors)])
            self._meta = concat_meta(self._meta, rows_to_table(emb.rows))
            self.thumbs.extend(emb.thumbs)
            if self.info.get("caption_gallery"):
                cv = (
                    emb.caption_vectors
                    if emb.caption_vectors is not None
                    else np.zeros((0, self.dim), np.float32)
                )
                cm = pa.table(
                    {
                        "id": pa.array([new_ids[i] for i in emb.caption_items], pa.string()),
                        "caption": pa.array(emb.caption_texts, pa.string()),
                    }
                )
                self.caption_vectors = (
                    np.concatenate([self.caption_vectors, cv]) if self.caption_vectors is not None else cv
                )
                self.caption_meta = (
                    concat_meta(self.caption_meta, cm) if self.caption_meta is not None else cm
                )
                self._cap_index = None
            self._reindex_ids()
            new = slice(n0, len(self))
            moved_all = self._update_hubness(new)
            kind = effective_kind(self.info["kind"], len(self))
            if kind != self.info["effective_kind"] or self.ann is None:
                self.rebuild_ann()
            elif moved_all:
                self._refill_ann()
            else:
                self._ann_add(new)
            self._count_generated()
            self.info["count"] = len(self)
            self.info["updated"] = now()
        return len(emb.rows)

    def _count_generated(self) -> None:
        """index.json's count of generated captions (`index build --captions generate`), kept current."""
        c = self.info.get("captions")
        if isinstance(c, dict) and "caption_generated" in self._meta.schema.names:
            flags = self._meta.column("caption_generated").to_pylist()
            c["generated"] = sum(1 for f in flags if f)

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items by id (unknown ids are ignored). Rebuilds the ANN contents from the kept vectors,
        keeping trained codebooks where the kind allows. Returns how many were removed."""
        with self._writing():
            rows = sorted({self._row[i] for i in ids if i in self._row})
            if not rows:
                return 0
            keep = np.ones(len(self), dtype=bool)
            keep[rows] = False
            self.vectors = np.ascontiguousarray(np.asarray(self.vectors)[keep])
            self._meta = self._meta.filter(pa.array(keep))
            self.thumbs.keep(keep)
            if self.invgc_vectors is not None:
                self.invgc_vectors = np.ascontiguousarray(self.invgc_vectors[keep])
            if self.caption_meta is not None:
                gone = {self._ids[r] for r in rows}
                ck = np.array([i not in gone for i in self.caption_meta.column("id").to_pylist()], dtype=bool)
                self.caption_meta = self.caption_meta.filter(pa.array(ck))
                self.caption_vectors = self.caption_vectors[ck]
                self._cap_index = None
            if self.bank_lse is not None:
                self.bank_lse = self.bank_lse[keep]
            self._reindex_ids()
            self._update_hubness(None)
            self._refill_ann()
            self._count_generated()
            self.info["count"] = len(self)
            self.info["updated"] = now()
        return len(rows)
