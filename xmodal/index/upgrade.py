"""Model upgrades with no gallery item re-embedded: `xmodal index upgrade`, `rollback` and `backfill`.

A new model's embeddings do not live in the old model's space, so an index built with the old model
cannot answer its queries — unless the new model was trained to be compatible (`--objective clip+bct`) or
a projection maps its space onto the old one (`xmodal compat fit`, XBT-style). `upgrade` makes the index
embed its queries with the new model (through the projection, if any) and score them against the old
gallery; only index.json changes, in one atomic write, and it keeps the exact previous index.json so that
`rollback` restores the directory byte for byte.

index.json after an upgrade:
    model          the gallery's model (what embedded vectors.npy; `index add` still embeds with it)
    query_model    {model, dim, image_size, projection: {path, fingerprint} | null, at}: embeds queries
    upgrade        {previous_index_json, files}: the text to restore and the other files' stamps
    chain          every model the index has served: build, upgrade, backfill events in order
    backfill       {fingerprint, items, chunk_size, work, started} once `index backfill` has begun

`backfill` re-embeds the gallery with the new model chunk by chunk into INDEX.work-backfill/ (each chunk
written atomically, so a killed run loses no finished chunk and the next run goes on from there). While
it is partial, a search scores re-embedded items with the new query against their new vectors and the
rest through the compatibility layer against their old ones, merges both by score, and marks each hit
`embedded_by: new | old`. When every chunk is done the index is rewritten (atomically) as a plain index
of the new model: the compatibility layer, the hubness banks and InvGC (the old model's) are dropped.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from xmodal import fsutil
from xmodal.errors import UserError
from xmodal.index.ann import l2n
from xmodal.index.meta import now

WORK_SUFFIX = ".work-backfill"
REFRESH_S = 1.0  # a searching process looks for newly finished backfill chunks at most this often


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def work_dir_of(path: Path) -> Path:
    return path.parent / f"{path.name}{WORK_SUFFIX}"


def _file_stamps(path: Path) -> dict[str, list[int]]:
    """(size, mtime_ns, inode) of every file but index.json: any save rewrites the folder (new inodes)."""
    out = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name != "index.json":
            st = p.stat()
            out[p.name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def _write_info(path: Path, info: dict[str, Any]) -> None:
    """Replace index.json alone, atomically, as the next revision (a writer holding an older one is refused
    on save, as with any other change)."""
    info["revision"] = int(info.get("revision", 0)) + 1
    info["updated"] = now()
    fsutil.write_text_atomic(path / "index.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def _read_info(path: Path) -> tuple[bytes, dict[str, Any]]:
    raw = (path / "index.json").read_bytes()
    return raw, json.loads(raw)


def load_projection(record: dict[str, Any], where: Any) -> Any:
    """The projection index.json names, checked against the fingerprint recorded at upgrade time."""
    from xmodal.compat.projection import load_projection as load

    proj = load(record["path"])
    if proj.fingerprint != record.get("fingerprint"):
        raise UserError(
            f"{where}: the projection at {record['path']} changed since the upgrade (fingerprint "
            f"{proj.fingerprint}, recorded {record.get('fingerprint')}); run `xmodal index rollback` and "
            "upgrade again with it"
        )
    return proj


class BackfillView:
    """The finished chunks of a backfill as a searching process sees them: which rows have a new vector."""

    def __init__(self, n: int, dim: int) -> None:
        self.done = np.zeros(n, dtype=bool)
        self.rows = np.zeros(0, np.int64)
        self.vectors = np.zeros((0, dim), np.float32)
        self.files: frozenset[str] = frozenset()
        self.checked = 0.0

    @property
    def count(self) -> int:
        return int(self.done.sum())


class UpgradeMixin:
    """The compatibility layer of a `SearchIndex` after `xmodal index upgrade`."""

    _query_encoder: Any = None
    _projection: Any = None
    _backfill_view: BackfillView | None = None

    @property
    def query_model(self) -> dict[str, Any] | None:
        return self.info.get("query_model") or None

    @property
    def query_dim(self) -> int:
        qm = self.query_model
        return int(qm["dim"]) if qm else self.dim

    @property
    def query_encoder(self) -> Any:
        """The model that embeds text and image queries: the upgrade's new model, else the gallery's."""
        qm = self.query_model
        if qm is None:
            return self.encoder
        if self._query_encoder is None:
            with self._encoder_lock:
                if self._query_encoder is None:
                    from xmodal.index.model import load_recorded_encoder

                    where = (self.path / "index.json") if self.path is not None else "the index"
                    self._query_encoder = load_recorded_encoder(
                        {"model": qm["model"], "dim": qm["dim"]}, f"{where} (query_model)"
                    )
        return self._query_encoder

    @query_encoder.setter
    def query_encoder(self, enc: Any) -> None:
        self._query_encoder = enc

    def to_gallery(self, q: np.ndarray, modality: str) -> np.ndarray:
        """Query embeddings of the query model → the gallery's space (the projection, or as they are for a
        compatible model), L2-normalised."""
        qm = self.query_model
        if not qm or not qm.get("projection"):
            return l2n(q)
        if self._projection is None:
            self._projection = load_projection(qm["projection"], self.path / "index.json")
        return l2n(self._projection.apply(np.asarray(q, np.float32), modality))

    def refuse_during_backfill(self) -> None:
        """Items may not change part-way through a backfill: its chunks are planned over the items as they
        were when it began."""
        bf = self.info.get("backfill")
        if bf:
            where = self.path if self.path is not None else "INDEX"
            raise UserError(
                f"{where}: a backfill to the new model is under way ({bf['items']} items planned); finish it "
                f"(xmodal index backfill {where}) or undo the upgrade (xmodal index rollback {where}) first"
            )

    # -- a partial backfill ------------------------------------------------------------------------
    def backfill_view(self) -> BackfillView | None:
        """The rows re-embedded so far (from INDEX.work-backfill/), refreshed at most every REFRESH_S; None
        when no backfill has begun."""
        bf = self.info.get("backfill")
        if not bf or self.path is None or not self.query_model:
            return None
        view = self._backfill_view
        if view is not None and time.monotonic() - view.checked < REFRESH_S:
            return view
        work = Path(bf["work"])
        files = frozenset(p.name for p in work.glob("chunk_*.npz")) if work.is_dir() else frozenset()
        if view is None or files != view.files:
            view = self._read_backfill(bf, work, files)
        view.checked = time.monotonic()
        self._backfill_view = view
        return view

    def _read_backfill(self, bf: dict[str, Any], work: Path, files: frozenset[str]) -> BackfillView:
        """The chunks `xmodal.index.embed` wrote (chunk c: items [c·size, (c+1)·size), `vectors` and `ok`),
        read here without torch; a damaged or half-visible chunk just counts as not done yet."""
        n, cs, dim = int(bf["items"]), int(bf["chunk_size"]), self.query_dim
        view = BackfillView(len(self), dim)
        view.files = files
        try:
            stamp = json.loads((work / "work.json").read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            stamp = None
        if n != len(self) or stamp != bf["fingerprint"]:
            return view  # replanned, or not this index's any more: nothing counts as re-embedded
        rows, vecs = [], []
        for c in range((n + cs - 1) // cs):
            i0, i1 = c * cs, min(n, (c + 1) * cs)
            name = f"chunk_{c:06d}.npz"
            if name not in files:
                continue
            try:
                with np.load(work / name, allow_pickle=False) as z:
                    v, ok = z["vectors"], np.asarray(z["ok"], bool)
            except Exception:  # noqa: BLE001 - the backfill recomputes a damaged chunk
                continue
            if v.shape != (i1 - i0, dim) or ok.shape != (i1 - i0,):
                continue
            rows.append(np.arange(i0, i1)[ok])
            vecs.append(l2n(v[ok]))
        if rows:
            view.rows = np.concatenate(rows)
            view.vectors = np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32)
            view.done[view.rows] = True
        return view

    def embedded_by(self, row: int) -> str | None:
        """'new' or 'old' for each hit of an upgraded index (which model's vector scored it), else None."""
        if not self.query_model:
            return None
        view = self._backfill_view if self.info.get("backfill") else None
        return "new" if view is not None and view.done[row] else "old"

    def _merged_rows(
        self, q: np.ndarray, k: int, modality: str, view: BackfillView
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over both parts of a partial backfill: re-embedded rows by ⟨q, new vector⟩ (exact), the
        others by ⟨to_gallery(q), old vector⟩ (the index's ANN, fetched deeper until enough of them are
        not re-embedded), merged by score."""
        n = len(self)
        k = min(k, n)
        s_new = q @ view.vectors.T
        if view.count > k:
            top = np.argpartition(-s_new, k - 1, axis=1)[:, :k]
            s_new, r_new = np.take_along_axis(s_new, top, 1), view.rows[top]
        else:
            r_new = np.broadcast_to(view.rows, s_new.shape)
        n_old = n - view.count
        s_old = np.zeros((len(q), 0), np.float32)
        r_old = np.zeros((len(q), 0), np.int64)
        if n_old:
            qg = self.to_gallery(q, modality)
            zero = np.zeros((len(q), len(self.bank_names)), np.float32)
            want, fetch = min(k, n_old), min(n, 2 * k)
            while True:
                s, r = self._search_raw(qg, fetch, zero, modality)
                keep = (r >= 0) & ~view.done[np.maximum(r, 0)]
                if keep.sum(1).min() >= want or fetch >= n:
                    break
                fetch = min(n, 4 * fetch)
            s_old = np.where(keep, s, -np.inf).astype(np.float32)
            r_old = np.where(keep, r, -1)
        scores = np.concatenate([s_new.astype(np.float32), s_old], 1)
        rows = np.concatenate([r_new, r_old], 1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        return scores, np.where(np.isfinite(scores), rows, -1)


# -- the commands --------------------------------------------------------------------------------------


def _index_path(path: str | Path) -> Path:
    p = Path(path).absolute()
    fsutil.recover_dir(p)
    if not (p / "index.json").is_file():
        raise UserError(
            f"INDEX {path}: not an xmodal index (no index.json); build one with `xmodal index build`"
        )
    return p


def _model_name(record: dict[str, Any]) -> str:
    return str(record.get("source") or record.get("name") or "?")


def upgrade_index(
    path: str | Path,
    model: str,
    *,
    pretrained: str | None = None,
    projection: str | Path | None = None,
    log: Any = _log,
) -> dict[str, Any]:
    """`xmodal index upgrade`: queries of `model` (through `projection`, if given) answered from the
    gallery as it is. Returns the new index.json record `query_model`."""
    from xmodal.index.model import describe_source
    from xmodal.index.persist import open_index
    from xmodal.models import load_encoder

    path = _index_path(path)
    with fsutil.locked(path):
        raw, info = _read_info(path)
        idx = open_index(path)  # every file checked before anything changes
        where = path / "index.json"
        if info.get("query_model"):
            qm = info["query_model"]
            raise UserError(
                f"{where}: already upgraded to {_model_name(qm['model'])}; finish it with `xmodal index "
                f"backfill {path}` or undo it with `xmodal index rollback {path}` first"
            )
        enc = load_encoder(model, pretrained)
        proj_record = None
        if projection is not None:
            from xmodal.compat.projection import load_projection as load

            proj = load(projection)
            if int(proj.d_new) != int(enc.dim) or int(proj.d_old) != idx.dim:
                raise UserError(
                    f"--projection {projection}: maps {proj.d_new}-d to {proj.d_old}-d vectors, but the new "
                    f"model gives {enc.dim}-d and the index holds {idx.dim}-d ones; fit one for these models "
                    "(xmodal compat fit --old OLD --new NEW --data M --out PROJ)"
                )
            old_src = (getattr(proj, "old_model", None) or {}).get("source")
            if old_src and info["model"].get("source") and old_src != info["model"]["source"]:
                raise UserError(
                    f"--projection {projection}: was fitted for old model {old_src}, but {where} was built "
                    f"with {info['model']['source']}; fit one against the index's model"
                )
            proj_record = {"path": str(Path(projection).absolute()), "fingerprint": proj.fingerprint}
        elif int(enc.dim) != idx.dim:
            raise UserError(
                f"--model {model}: gives {enc.dim}-d vectors but the index holds {idx.dim}-d ones; give "
                "--projection PROJ (xmodal compat fit --old OLD --new NEW --data M --out PROJ)"
            )
        record = {"name": getattr(enc, "name", None), **describe_source(model, pretrained)}
        at = now()
        qm = {
            "model": record,
            "dim": int(enc.dim),
            "image_size": int(enc.image_size),
            "projection": proj_record,
            "at": at,
        }
        new = copy.deepcopy(info)
        chain = new.get("chain") or [{"event": "build", "model": info["model"], "at": info.get("created")}]
        new["chain"] = [*chain, {"event": "upgrade", "model": record, "projection": proj_record, "at": at}]
        new["query_model"] = qm
        new["upgrade"] = {"previous_index_json": raw.decode("utf-8"), "files": _file_stamps(path)}
        _write_info(path, new)
    how = f"through the projection {proj_record['path']}" if proj_record else "directly (a compatible model)"
    log(
        f"{path}: queries now embedded by {record['source']} {how}, scored against the {len(idx)} items "
        f"as they are; `xmodal index backfill {path}` re-embeds them, `xmodal index rollback {path}` "
        "undoes it"
    )
    return qm


def rollback_index(path: str | Path, *, log: Any = _log) -> dict[str, Any]:
    """`xmodal index rollback`: undo the last upgrade (and a backfill still in progress). With no other
    change since, index.json gets back its exact previous bytes — the whole folder is as it was; after
    items were added or removed it drops the compatibility layer and keeps those changes. Returns
    {"exact": bool, "dropped_chunks": n}."""
    path = _index_path(path)
    with fsutil.locked(path):
        _, info = _read_info(path)
        up = info.get("upgrade")
        if not up or not info.get("query_model"):
            raise UserError(f"{path / 'index.json'}: records no upgrade to roll back")
        exact = _file_stamps(path) == up.get("files")
        if exact:
            fsutil.write_bytes_atomic(path / "index.json", up["previous_index_json"].encode("utf-8"))
        else:
            new = copy.deepcopy(info)
            for key in ("query_model", "upgrade", "backfill"):
                new.pop(key, None)
            new["chain"] = [*new.get("chain", []), {"event": "rollback", "at": now()}]
            _write_info(path, new)
        work = work_dir_of(path)
        dropped = len(list(work.glob("chunk_*.npz"))) if work.is_dir() else 0
        shutil.rmtree(work, ignore_errors=True)
    log(
        f"{path}: rolled back to {_model_name(info['model'])}"
        + (" (index.json restored byte for byte)" if exact else " (items changed since the upgrade are kept)")
        + (f"; {dropped} backfilled chunk(s) dropped" if dropped else "")
    )
    return {"exact": exact, "dropped_chunks": dropped}


def _gallery_collection(idx: Any, where: Path) -> Any:
    """The index's items, in row order, as a collection to embed again from their image files."""
    from xmodal.data.records import Record
    from xmodal.index.embed import collection_from_records

    paths = idx.meta.column("path").to_pylist() if "path" in idx.meta.column_names else [None] * len(idx)
    missing = [i for i, p in zip(idx.ids, paths, strict=True) if not p]
    if missing:
        raise UserError(
            f"{where}: {len(missing)} item(s) record no image path (e.g. {missing[0]!r}), so they cannot be "
            "embedded again; rebuild the index with the new model (xmodal index build NEW --data M --out I)"
        )
    caps = idx.meta.column("captions").to_pylist() if "captions" in idx.meta.column_names else None
    recs = [
        Record(key=i, image=p, captions=list(caps[j] or []) if caps else [])
        for j, (i, p) in enumerate(zip(idx.ids, paths, strict=True))
    ]
    return collection_from_records(recs, source=str(where.parent))


def backfill_index(
    path: str | Path,
    *,
    chunk_size: int = 4096,
    max_chunks: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
    log: Any = _log,
) -> dict[str, Any]:
    """`xmodal index backfill`: re-embed the gallery with the upgrade's new model, chunk by chunk (at most
    `max_chunks` this call), then, once all are done, rewrite the index as the new model's. Holds the
    index's writer lock throughout (add/delete wait for it to end). Returns {"done", "total", "finished",
    "computed", "embedded_images"}."""
    from xmodal.index.embed import assemble_chunks, embed_chunks, plan_chunks
    from xmodal.index.persist import open_index

    if chunk_size < 1:
        raise UserError(f"--chunk-size {chunk_size}: must be at least 1")
    if max_chunks is not None and max_chunks < 0:
        raise UserError(f"--max-chunks {max_chunks}: must be 0 or more")
    path = _index_path(path)
    where = path / "index.json"
    with fsutil.locked(path):
        idx = open_index(path, mmap=False)
        qm = idx.query_model
        if not qm:
            raise UserError(
                f"{where}: not upgraded, so there is nothing to backfill; run `xmodal index upgrade {path} "
                "--model NEW_RUN` first"
            )
        enc = idx.query_encoder
        if idx.info["kind"] == "learned-binary":
            from xmodal.index.build import _learned_coder

            new_coder = _learned_coder(enc)  # fails before any embedding when the new model has no heads
        bf = idx.info.get("backfill")
        if bf and int(bf["chunk_size"]) != chunk_size:
            log(f"going on with the chunk size this backfill began with ({bf['chunk_size']})")
            chunk_size = int(bf["chunk_size"])
        work = work_dir_of(path)
        caption_gallery = bool(idx.info.get("caption_gallery"))
        plan = plan_chunks(
            enc,
            _gallery_collection(idx, where),
            work,
            chunk_size=chunk_size,
            caption_gallery=caption_gallery,
            thumb_size=0,
            batch_size=batch_size,
            replace_stale=True,
            log=log,
        )
        if not bf or bf.get("fingerprint") != plan.fingerprint:
            _, info = _read_info(path)
            info["backfill"] = {
                "fingerprint": plan.fingerprint,
                "items": len(idx),
                "chunk_size": chunk_size,
                "work": str(work),
                "started": now(),
            }
            _write_info(path, info)
        todo = plan.missing()
        n_chunks = len(plan)
        this_call = todo if max_chunks is None else todo[:max_chunks]
        log(
            f"backfill of {path}: {n_chunks - len(todo)} of {n_chunks} chunk(s) done, {len(this_call)} to "
            f"compute now"
        )
        computed, _, _ = embed_chunks(plan, this_call, progress=progress, log=log)
        images = sum(i1 - i0 for i0, i1 in map(plan.bounds, this_call))
        left = plan.missing()
        out = {
            "done": n_chunks - len(left),
            "total": n_chunks,
            "finished": not left,
            "computed": computed,
            "embedded_images": images,
        }
        if left:
            log(f"backfill paused: {len(left)} of {n_chunks} chunk(s) left; run it again to go on")
            return out
        emb = assemble_chunks(plan, embed_missing=False, log=log)
        new = _backfilled(idx, emb, enc, plan, new_coder if idx.info["kind"] == "learned-binary" else None)
        new.save(path)
        shutil.rmtree(work, ignore_errors=True)
    dropped = len(idx) - len(new)
    log(
        f"backfill finished: {path} is now an index of {_model_name(qm['model'])} ({len(new)} items"
        + (f"; {dropped} whose images no longer decode were removed" if dropped else "")
        + ")"
    )
    return {**out, "removed": dropped}


def _backfilled(idx: Any, emb: Any, enc: Any, plan: Any, coder: Any) -> Any:
    """The finished backfill as a plain index of the new model: same items (less any that no longer
    decode), metadata and thumbnails; new vectors, caption gallery and ANN; no banks or InvGC."""
    import pyarrow as pa

    from xmodal.index.store import SearchIndex
    from xmodal.index.thumbs import Thumbs

    ok = np.concatenate([plan.load(c)["ok"] for c in plan.chunks]) if len(plan) else np.zeros(0, bool)
    qm = idx.query_model
    info = copy.deepcopy(idx.info)
    for key in ("query_model", "upgrade", "backfill", "invgc", "trained_on"):
        info.pop(key, None)
    if info.get("banks"):
        info["dropped_banks"] = sorted(info["banks"])  # the old model's: add them again (xmodal index bank)
    info["banks"] = {}
    info.update(model=qm["model"], dim=int(enc.dim), image_size=int(enc.image_size), count=int(ok.sum()))
    info["chain"] = [
        *info.get("chain", []),
        {"event": "backfill", "model": qm["model"], "at": now(), "re_embedded": int(ok.sum())},
    ]
    thumbs = Thumbs(idx.thumbs.blob)
    thumbs.entries = [e for e, k in zip(idx.thumbs.entries, ok, strict=True) if k]
    cap_v = cap_m = None
    if info.get("caption_gallery"):
        cap_v = emb.caption_vectors
        cap_m = emb.caption_table()
    new = SearchIndex(
        info,
        idx.meta.filter(pa.array(ok)),
        emb.vectors,
        thumbs=thumbs,
        caption_vectors=cap_v,
        caption_meta=cap_m,
        encoder=enc,
        coder=coder,
    )
    new.rebuild_ann()
    return new
