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
from xmodal.index.ann import effective_kind, l2n, new_float_index, search_params
from xmodal.index.meta import concat_meta, now, rows_to_table

GROWTH_HINT = 2.0  # `index add` suggests `index optimize` once the collection outgrows its training by this


def has_trained_parts(kind: str, dim: int, binary_index: str = "flat") -> bool:
    """Whether an ANN of (effective) `kind` holds parts fitted to the data — IVF centroids, PQ codebooks,
    the ITQ rotation / LSH mean, a binary IVF's lists — that go stale as the collection changes (flat,
    HNSW, learned codes over a flat or HNSW Hamming index: no)."""
    if kind in ("ivfpq", "binary") or (kind == "learned-binary" and binary_index == "ivf"):
        return True
    if kind in ("flat", "hnsw", "learned-binary"):
        return False
    try:  # a factory string: IVF…, PQ…, OPQ… need training; Flat, HNSW… do not
        return not new_float_index(kind, dim, {}).is_trained
    except UserError:
        return False


class MutationMixin:
    """Adding and removing items of a `SearchIndex`."""

    def _writing(self) -> AbstractContextManager:
        """The writer lock of the index's folder (re-entrant in-process); none for an unsaved index. Refused
        part-way through a backfill, whose chunks are planned over the items as they were when it began."""
        self.refuse_during_backfill()
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
            n = self.add_embedded(emb)
            if log is not None and (hint := self.training_hint()):
                log(hint)
            return n

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
                cm = emb.caption_table()
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
            params = self.info["params"]  # efSearch, nprobe and the re-rank depth follow the new size
            params.update(search_params(kind, len(self), params, self.info.get("options", {})))
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

    def training_hint(self) -> str | None:
        """A one-line suggestion to run `xmodal index optimize` once the collection has grown past
        GROWTH_HINT × the items its trained parts saw (None when they are current, or the kind has none)."""
        trained_on = self.info.get("trained_on")
        if not trained_on or not has_trained_parts(
            self.kind, self.ann_dim(), self.info["params"].get("binary_index", "flat")
        ):
            return None
        if len(self) <= GROWTH_HINT * int(trained_on):
            return None
        where = self.path if self.path is not None else "INDEX"
        return (
            f"{where}: the {self.kind} index was trained on {trained_on} items and now holds {len(self)}; "
            f"retrain it for better recall: xmodal index optimize {where}"
        )

    def optimize(self, force: bool = False) -> dict[str, Any]:
        """Retrain the ANN's fitted parts (IVF centroids, PQ codebooks, ITQ rotation / LSH mean) and its
        N-dependent parameters (nlist, nprobe, PQ bits) on the current vectors, in memory (`.save()` writes
        it). Ids, metadata, vectors, banks and caption gallery stay as they are: only the ANN is replaced.

        Kinds without fitted parts (flat, hnsw, learned-binary) are left alone — deleted items leave no
        tombstones (delete refills the ANN), so a rebuild would give the same structure. Without `force`,
        an ANN already trained on exactly the current item count is kept too.
        Returns {"retrained", "kind", "count", "trained_on_before", "trained_on", "params", "reason"}."""
        with self._writing():
            n = len(self)
            before = self.info.get("trained_on")
            target = effective_kind(self.info["kind"], n)
            out: dict[str, Any] = {
                "retrained": False,
                "kind": target,
                "count": n,
                "trained_on_before": before,
                "trained_on": before,
            }
            if target == self.kind and not has_trained_parts(
                target, self.ann_dim(), self.info["params"].get("binary_index", "flat")
            ):
                kind = self.info["kind"]
                shown = kind if kind == target else f"{kind} (searched as {target} at {n} items)"
                out["reason"] = f"kind {shown} has no trained parts; nothing to retrain"
                return out
            if target == self.kind and before == n and not force:
                out["reason"] = f"already trained on all {n} items (--force retrains anyway)"
                return out
            self.rebuild_ann()
            self.info["trained_on"] = n  # also for an ann.py whose rebuild_ann does not record it
            self.info["optimized"] = now()
            out.update(retrained=True, kind=self.kind, trained_on=n, params=dict(self.info["params"]))
            out["reason"] = f"retrained on {n} items" + (f" (was {before})" if before is not None else "")
            return out


def optimize_index(path: str | Path, *, force: bool = False, log: Any = None) -> dict[str, Any]:
    """`xmodal index optimize`: retrain the ANN of the index at `path` on its current items and write the
    directory atomically under the writer lock (as add/delete do); a crash leaves the previous index."""
    import sys

    from xmodal.index.persist import open_index

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    path = Path(path).absolute()
    if not (path / "index.json").is_file() and not fsutil.backup_path(path).is_dir():
        raise UserError(
            f"INDEX {path}: not an xmodal index (no index.json); build one with `xmodal index build`"
        )
    with fsutil.locked(path):
        idx = open_index(path, mmap=False)
        res = idx.optimize(force=force)
        if res["retrained"]:
            idx.save(path)
    log(f"{path}: {res['reason']}" + (f"; params {res['params']}" if res["retrained"] else ""))
    return res
