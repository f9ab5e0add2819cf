"""Persistence: the `PersistMixin` part of `SearchIndex` (`save` writes the whole directory atomically) and
`open_index`, which loads one and checks that every side file agrees with the number of items.

Loading runs no code from the files: numpy arrays load with allow_pickle=False, metadata is parquet,
the ANN is FAISS's own format, file names are fixed (index.json cannot point elsewhere), and the model
named in index.json is only loaded later, through `xmodal.index.model`'s checks.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal import fsutil
from xmodal.errors import UserError
from xmodal.index.ann import BINARY_KINDS, PAD
from xmodal.index.binary import BinaryCoder, LearnedCoder
from xmodal.index.folding import BANKS
from xmodal.index.meta import FORMAT
from xmodal.index.thumbs import Thumbs

ANN_FILE = {"float": "ann.faiss", "binary": "ann.faissb"}
CODER_FILE = {"binary": "binary.npz", "learned-binary": "learned_codes.npz"}  # the code's parameters


class PersistMixin:
    """Writing a `SearchIndex` to its directory."""

    def save(self, path: str | Path | None = None) -> Path:
        """Write the whole index directory atomically (temp folder beside it, then swapped in)."""
        final = Path(path) if path is not None else self.path
        if final is None:
            raise UserError("save(): no path given")
        final = final.absolute()
        with fsutil.locked(final):
            revision = int(self.info.get("revision", 0))
            if final == self.path and _revision_on_disk(final) not in (None, revision):
                raise UserError(
                    f"{final}: another writer saved this index after it was opened here; open it again "
                    "and repeat the change (saving now would lose theirs)"
                )
            tmp = fsutil.temp_dir_for(final)
            self.info["revision"] = revision + 1
            try:
                self._write(tmp)
                self.thumbs.close()
                fsutil.replace_dir(tmp, final)
            except BaseException:
                self.info["revision"] = revision
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.path = final
        # Thumbnails now live in the new folder's blob.
        idx = np.load(final / "thumbs.npy", allow_pickle=False)
        self.thumbs = Thumbs(final / "thumbs.bin", idx)
        return final

    def _write(self, d: Path) -> None:
        """Every file of the index into the (temporary) folder d; index.json last."""
        info = dict(self.info)
        info["count"] = len(self)
        files = {"meta": "meta.parquet", "vectors": "vectors.npy", "thumbs": "thumbs.bin"}
        pq.write_table(self._meta, d / "meta.parquet")
        np.save(d / "vectors.npy", np.ascontiguousarray(self.vectors, dtype=np.float32))
        self.thumbs.write(d)
        if self.kind in BINARY_KINDS:
            faiss.write_index_binary(self.ann, str(d / ANN_FILE["binary"]))
            self.coder.save(d / CODER_FILE[self.kind])
            files.update(ann=ANN_FILE["binary"], binary=CODER_FILE[self.kind])
        else:
            faiss.write_index(self.ann, str(d / ANN_FILE["float"]))
            files["ann"] = ANN_FILE["float"]
        if self.info.get("caption_gallery") and self.caption_vectors is not None:
            np.save(d / "captions.npy", np.ascontiguousarray(self.caption_vectors, dtype=np.float32))
            pq.write_table(self.caption_meta, d / "captions.parquet")
            files.update(captions="captions.npy", caption_meta="captions.parquet")
        for b in self.bank_names:
            np.save(d / f"bank_{b}.npy", self.banks[b])
            files[f"bank_{b}"] = f"bank_{b}.npy"
        if self.bank_names:
            np.save(d / "bank_lse.npy", self.bank_lse)
            np.save(d / "bank_hubs.npy", self.bank_hubs)
        if self.invgc_vectors is not None:
            np.save(d / "vectors_invgc.npy", self.invgc_vectors)
        info["files"] = files
        info["ann_dim"] = self.ann_dim()
        (d / "index.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def _npy(path: Path, mmap: bool = False) -> np.ndarray:
    """np.load of a plain array: never unpickles (object arrays are refused)."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        raise UserError(
            f"{path}: not a plain numeric array ({str(e).strip()[:120]}); xmodal never unpickles index "
            "files — rebuild the index (`xmodal index build MODEL --data DATA --out INDEX`)"
        ) from e


def _damaged(path: Path, what: str) -> UserError:
    return UserError(
        f"{path}: {what}; the index is damaged or mixed from different builds — rebuild it "
        f"(`xmodal index build MODEL --data DATA --out {path.parent}`)"
    )


def _rows(a: np.ndarray) -> str:
    return "×".join(str(x) for x in a.shape) or "a scalar"


def _check_shape(path: Path, a: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if tuple(a.shape) != shape:
        want = "×".join(str(x) for x in shape)
        raise _damaged(path, f"holds {_rows(a)} values but the index needs {want} ({what})")


def migrate_info(info: dict[str, Any]) -> dict[str, Any]:
    """index.json of earlier xmodal versions → today's keys (model.seeded_random_init → random_init)."""
    model = info.get("model")
    if isinstance(model, dict) and "seeded_random_init" in model:
        old = model.pop("seeded_random_init")
        model.setdefault("random_init", bool(old))
    return info


def _revision_on_disk(folder: Path) -> int | None:
    """The save count index.json records (each save adds one), None where there is no readable one."""
    try:
        return int(json.loads((folder / "index.json").read_text()).get("revision", 0))
    except (OSError, ValueError, AttributeError):
        return None


def open_index(path: str | Path, encoder: Any = None, mmap: bool = True) -> Any:
    """Load an index directory. Needs only faiss, numpy and pyarrow (no torch); the model loads lazily when
    a text or image query needs it (or pass `encoder`). Every side file is checked against the item count;
    a mismatch is a UserError naming the file."""
    from xmodal.index.store import SearchIndex

    p = Path(path).absolute()
    fsutil.recover_dir(p)
    if not (p / "index.json").is_file():
        raise UserError(f"{path}: not an xmodal index (no index.json); build one with `xmodal index build`")
    try:
        info = json.loads((p / "index.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{p / 'index.json'}: not valid JSON ({e}); rebuild the index") from e
    if not isinstance(info, dict):
        raise UserError(f"{p / 'index.json'}: not an index record (a JSON object); rebuild the index")
    if int(info.get("format", 0)) > FORMAT:
        raise UserError(
            f"{path}: index format {info.get('format')} is newer than this xmodal; upgrade xmodal"
        )
    migrate_info(info)
    try:
        kind = info["effective_kind"]
        binary = kind in BINARY_KINDS
        dim = int(info["dim"])
        meta = pq.read_table(p / "meta.parquet")
        vectors = _npy(p / "vectors.npy", mmap=mmap)
        coder = None
        if binary:
            ann = faiss.read_index_binary(str(p / ANN_FILE["binary"]))
            coder = (LearnedCoder if kind == "learned-binary" else BinaryCoder).load(p / CODER_FILE[kind])
        else:
            ann = faiss.read_index(str(p / ANN_FILE["float"]))
        thumb_idx = _npy(p / "thumbs.npy") if (p / "thumbs.npy").is_file() else None
        cap_v = cap_m = None
        files = info.get("files") or {}
        if info.get("caption_gallery") and ((p / "captions.npy").is_file() or "captions" in files):
            cap_v = _npy(p / "captions.npy")
            cap_m = pq.read_table(p / "captions.parquet")
        bank_cfg = info.get("banks") or {}
        banks = {b: _npy(p / f"bank_{b}.npy") for b in BANKS if b in bank_cfg}
        lse = _npy(p / "bank_lse.npy") if banks else None
        hubs = _npy(p / "bank_hubs.npy") if banks else None
        inv = _npy(p / "vectors_invgc.npy") if info.get("invgc") else None
    except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(
            f"{path}: index files are missing or damaged ({type(e).__name__}: {first}); rebuild it "
            f"(`xmodal index build MODEL --data DATA --out {p}`)"
        ) from e
    n = meta.num_rows
    _check_meta(p, info, meta)
    _check_shape(p / "vectors.npy", vectors, (n, dim), f"{n} items × {dim} dims")
    e = len(banks)
    if binary:
        bits = int(info.get("params", {}).get("bits", ann.d))
        if ann.d != bits or coder.bits != bits or coder.dim != dim:
            raise _damaged(
                p / CODER_FILE[kind], f"codes of {coder.bits} bits over {coder.dim} dims, ANN {ann.d}"
            )
    else:
        ann_dim = dim if e == 0 else int(math.ceil((dim + e) / PAD) * PAD)
        if ann.d != ann_dim:
            raise _damaged(p / ANN_FILE["float"], f"holds {ann.d}-d vectors but the index needs {ann_dim}-d")
    if ann.ntotal != n:
        name = ANN_FILE["binary" if binary else "float"]
        raise _damaged(p / name, f"holds {ann.ntotal} vectors but meta.parquet has {n} items")
    if thumb_idx is not None:
        _check_shape(p / "thumbs.npy", thumb_idx, (n, 2), f"one (offset, length) per item, {n} items")
        blob = p / "thumbs.bin"
        end = int((thumb_idx[:, 0] + thumb_idx[:, 1]).max()) if n else 0
        size = blob.stat().st_size if blob.is_file() else 0
        if end > size or (thumb_idx < 0).any():
            raise _damaged(blob, f"is {size} bytes but thumbs.npy points up to byte {end}")
        thumbs = Thumbs(blob, thumb_idx)
    else:
        thumbs = Thumbs()
        thumbs.extend([None] * n)
    if cap_v is not None:
        _check_shape(p / "captions.npy", cap_v, (cap_m.num_rows, dim), "one vector per captions.parquet row")
        known = set(meta.column("id").to_pylist())
        if "id" not in cap_m.column_names or not set(cap_m.column("id").to_pylist()) <= known:
            raise _damaged(p / "captions.parquet", "names items that meta.parquet does not hold")
    for b, v in banks.items():
        count = int(bank_cfg[b].get("count", len(v)))
        _check_shape(p / f"bank_{b}.npy", v, (count, dim), f"{count} bank vectors × {dim} dims")
    if banks:
        _check_shape(p / "bank_lse.npy", lse, (n, e), f"one offset per item and bank, {n} items")
        _check_shape(p / "bank_hubs.npy", hubs, (n, e), f"one hub flag per item and bank, {n} items")
    if inv is not None:
        _check_shape(p / "vectors_invgc.npy", inv, (n, dim), f"{n} items × {dim} dims")
    return SearchIndex(
        info,
        meta,
        vectors,
        path=p,
        ann=ann,
        coder=coder,
        thumbs=thumbs,
        caption_vectors=cap_v,
        caption_meta=cap_m,
        banks=banks,
        bank_lse=lse,
        bank_hubs=hubs,
        invgc_vectors=inv,
        encoder=encoder,
    )


def _check_meta(p: Path, info: dict[str, Any], meta: pa.Table) -> None:
    n = meta.num_rows
    if "id" not in meta.column_names:
        raise _damaged(p / "meta.parquet", "has no id column")
    ids = meta.column("id").to_pylist()
    if len(set(ids)) != n:
        raise _damaged(p / "meta.parquet", "repeats item ids")
    count = info.get("count")
    if count is not None and int(count) != n:
        raise _damaged(p / "meta.parquet", f"has {n} rows but index.json says {count} items")
