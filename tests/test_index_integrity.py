"""`open_index` checks every side file of an index directory against the number of items: each file of a
saved tiny index, corrupted on its own, gives a one-line UserError naming that file and saying to rebuild;
numpy side files never unpickle."""

from __future__ import annotations

import json
import pathlib
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xmodal.errors import UserError
from xmodal.index import SearchIndex, open_index
from xmodal.index.thumbs import Thumbs

N, D = 12, 8


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
    """A tiny index with every side file: thumbnails, caption gallery, both banks, InvGC vectors."""
    rng = np.random.default_rng(0)
    ids = [f"i{i}" for i in range(N)]
    idx = SearchIndex.from_vectors(unit(rng, N, D), ids=ids, kind="flat")
    idx.thumbs = Thumbs()
    idx.thumbs.extend([f"thumb-{i}".encode() for i in range(N)])
    idx.info["caption_gallery"] = True
    idx.caption_vectors = unit(rng, 2 * N, D)
    idx.caption_meta = pa.table({"id": [ids[i // 2] for i in range(2 * N)], "caption": ["c"] * (2 * N)})
    idx.set_bank("text", unit(rng, 30, D), refresh=False)
    idx.set_bank("image", unit(rng, 20, D), refresh=False)
    idx.set_invgc("localadj", pool_rate=0.2)
    path = tmp_path_factory.mktemp("integrity") / "idx"
    idx.save(path)
    return path


def _drop_last_row(name):
    def f(p: pathlib.Path) -> None:
        np.save(p / name, np.load(p / name)[:-1])

    return f


def _drop_last_column(name):
    def f(p: pathlib.Path) -> None:
        np.save(p / name, np.ascontiguousarray(np.load(p / name)[:, :-1]))

    return f


def _truncate_thumbs(p: pathlib.Path) -> None:
    data = (p / "thumbs.bin").read_bytes()
    (p / "thumbs.bin").write_bytes(data[: len(data) // 2])


def _short_ann(p: pathlib.Path) -> None:
    ann = faiss.read_index(str(p / "ann.faiss"))
    x = ann.reconstruct_n(0, ann.ntotal)
    small = faiss.IndexFlatIP(ann.d)
    small.add(x[:-1])
    faiss.write_index(small, str(p / "ann.faiss"))


def _narrow_ann(p: pathlib.Path) -> None:  # as if written without the bank columns
    small = faiss.IndexFlatIP(D)
    small.add(np.load(p / "vectors.npy"))
    faiss.write_index(small, str(p / "ann.faiss"))


def _short_meta(p: pathlib.Path) -> None:
    t = pq.read_table(p / "meta.parquet")
    pq.write_table(t.slice(0, t.num_rows - 1), p / "meta.parquet")


def _stranger_caption(p: pathlib.Path) -> None:
    t = pq.read_table(p / "captions.parquet")
    ids = t.column("id").to_pylist()
    ids[0] = "not-an-item"
    pq.write_table(t.set_column(0, "id", pa.array(ids)), p / "captions.parquet")


def _count(p: pathlib.Path) -> None:
    info = json.loads((p / "index.json").read_text())
    info["count"] = N + 5
    (p / "index.json").write_text(json.dumps(info))


CASES = [  # (test id, the file the error must name, how to corrupt it)
    ("thumbs-rows", "thumbs.npy", _drop_last_row("thumbs.npy")),
    ("thumbs-blob", "thumbs.bin", _truncate_thumbs),
    ("text-bank", "bank_text.npy", _drop_last_row("bank_text.npy")),
    ("image-bank-dim", "bank_image.npy", _drop_last_column("bank_image.npy")),
    ("offsets", "bank_lse.npy", _drop_last_row("bank_lse.npy")),
    ("hubs", "bank_hubs.npy", _drop_last_row("bank_hubs.npy")),
    ("invgc", "vectors_invgc.npy", _drop_last_row("vectors_invgc.npy")),
    ("caption-vectors", "captions.npy", _drop_last_row("captions.npy")),
    ("caption-ids", "captions.parquet", _stranger_caption),
    ("vectors", "vectors.npy", _drop_last_row("vectors.npy")),
    ("ann-ntotal", "ann.faiss", _short_ann),
    ("ann-width", "ann.faiss", _narrow_ann),
    ("meta-rows", "meta.parquet", _short_meta),
    ("count", "meta.parquet", _count),
]


def test_the_saved_index_opens_and_is_complete(saved):
    idx = open_index(saved)
    assert len(idx) == N and idx.thumbnail("i3") == b"thumb-3" and len(idx.caption_vectors) == 2 * N
    assert idx.bank_names == ["text", "image"] and idx.invgc_vectors.shape == (N, D)


@pytest.mark.parametrize("name,corrupt", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mismatched_side_file_is_a_one_line_error(saved, tmp_path, name, corrupt):
    bad = tmp_path / "idx"
    shutil.copytree(saved, bad)
    corrupt(bad)
    with pytest.raises(UserError) as e:
        open_index(bad)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(bad / name) in msg, msg
    assert "rebuild" in msg and "xmodal index build" in msg, msg


class _Touch:
    """Unpickling this creates a file: proof that something was executed."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_numpy_side_files_are_never_unpickled(saved, tmp_path):
    marker = tmp_path / "executed"
    control = tmp_path / "control"
    np.load(_save_object_array(tmp_path / "control.npy", control), allow_pickle=True)
    assert control.exists()  # the payload is live when unpickled
    for name in ("vectors.npy", "vectors_invgc.npy", "bank_text.npy", "thumbs.npy"):
        bad = tmp_path / f"idx-{name}"
        shutil.copytree(saved, bad)
        _save_object_array(bad / name, marker)
        with pytest.raises(UserError, match="never unpickles") as e:
            open_index(bad, mmap=False)
        assert "\n" not in str(e.value) and name in str(e.value)
        assert not marker.exists(), name


def _save_object_array(path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    np.save(path, np.array([_Touch(marker)], dtype=object), allow_pickle=True)
    return path


def test_binary_code_file_is_checked_and_never_unpickled(tmp_path):
    rng = np.random.default_rng(1)
    path = SearchIndex.from_vectors(unit(rng, 40, D), kind="binary", bits=64).save(tmp_path / "idx")
    assert open_index(path).kind == "binary"
    good = dict(np.load(path / "binary.npz"))
    np.savez(path / "binary.npz", **{**good, "bits": np.array(32), "projection": good["projection"][:, :32]})
    with pytest.raises(UserError, match="binary.npz") as e:
        open_index(path)
    assert "\n" not in str(e.value) and "rebuild" in str(e.value)
    marker = tmp_path / "executed"
    np.savez(path / "binary.npz", **{**good, "mean": np.array([_Touch(marker)], dtype=object)})
    with pytest.raises(UserError, match="rebuild") as e:
        open_index(path)
    assert "\n" not in str(e.value) and not marker.exists()
