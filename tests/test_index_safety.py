"""What loading and updating an index may do: the storage layer never imports torch, index.json can only
name a model that loads through the weights-only loaders (a crafted pickle is refused, not executed),
random weights are never silent, and add/delete hold the writer lock from the Python API too."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, write_tiny_manifest

from xmodal import fsutil
from xmodal.errors import UserError
from xmodal.index import SearchIndex, open_index

D = 32  # xm-micro's embedding width, so that only the safety checks stand between index.json and a load


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def cli(*args: str) -> tuple[int, str, str]:
    """`xmodal ARGS` in this process (saves a torch start-up per call): (exit code, stdout, stderr)."""
    from xmodal.cli import main

    out, err, saved = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["xmodal", *args]
    rc = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def vec_index(tmp_path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    idx = SearchIndex.from_vectors(unit(rng, 20, D), ids=[f"i{i}" for i in range(20)], kind="flat")
    idx.set_bank("text", unit(rng, 15, D))
    idx.info["model"] = {"name": "xm-micro", "source": "xm-micro", "pretrained": None, "random_init": True}
    return idx.save(tmp_path / "idx")


# -- the storage layer does not import torch -----------------------------------------------------------


def test_storage_layer_and_vector_search_never_import_torch(vec_index):
    code = f"""
import sys
import numpy as np
import xmodal.index
from xmodal.index import SearchIndex, open_index, KINDS, NORMS, hubness, binary
from xmodal.index import ann, folding, meta, model, mutation, persist, search, store, thumbs
from xmodal import fsutil
idx = open_index({str(vec_index)!r})
q = np.load({str(vec_index / "vectors.npy")!r})[:3]
_, ids = idx.search_vectors(q, k=2)
assert list(ids[:, 0]) == ["i0", "i1", "i2"], ids
idx.search_vectors(q, k=2, norm="qbnorm")
idx.delete(["i5"])
idx.save()
print("torch" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# -- the writer lock ----------------------------------------------------------------------------------


@contextlib.contextmanager
def held_by_another_process(path: pathlib.Path):
    code = (
        "import sys; from pathlib import Path; from xmodal.fsutil import locked\n"
        "with locked(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _embedded(ids, rng):
    from xmodal.index.embed import Embedded

    rows = [{"id": i, "caption": "", "captions": []} for i in ids]
    return Embedded(rows=rows, vectors=unit(rng, len(ids), D), thumbs=[None] * len(ids), caption_vectors=None)


def test_add_and_delete_refuse_while_another_process_writes(vec_index):
    rng = np.random.default_rng(1)
    idx = open_index(vec_index)
    with held_by_another_process(vec_index):
        for mutate in (
            lambda: idx.delete(["i1"]),
            lambda: idx.add_embedded(_embedded(["new0"], rng)),
            lambda: idx.add(REPO / "nope.jsonl"),
            lambda: idx.set_bank("text", None),
        ):
            with pytest.raises(UserError, match="another xmodal process is writing") as e:
                mutate()
            assert "\n" not in str(e.value) and str(vec_index) in str(e.value)
        assert len(idx) == 20 and idx.row_of("i1") == 1 and idx.bank_names == ["text"]
    # Lock released: the normal path works, and the lock is re-entrant within this process.
    assert idx.delete(["i1"]) == 1
    with fsutil.locked(vec_index):
        assert idx.add_embedded(_embedded(["new0", "new1"], rng)) == 2
        idx.save()
    again = open_index(vec_index)
    assert len(again) == 21 and again.row_of("i1") is None and again.row_of("new1") is not None


def test_a_save_never_overwrites_another_writers_save(vec_index):
    """Two writers open the same index; the second to save would silently drop the first's change."""
    rng = np.random.default_rng(3)
    first, second = open_index(vec_index), open_index(vec_index)
    first.delete(["i2"])
    first.save()
    second.add_embedded(_embedded(["late"], rng))
    with pytest.raises(UserError, match="another writer saved this index") as e:
        second.save()
    assert "\n" not in str(e.value)
    on_disk = open_index(vec_index)
    assert on_disk.row_of("i2") is None and on_disk.row_of("late") is None  # the first change is kept
    again = open_index(vec_index)  # reopened, the change goes through
    again.add_embedded(_embedded(["late"], rng))
    again.save()
    again.delete(["late"])
    again.save()  # and one object saves repeatedly
    assert open_index(vec_index).row_of("late") is None and len(open_index(vec_index)) == 19


def test_an_unsaved_index_needs_no_lock(tmp_path):
    idx = SearchIndex.from_vectors(unit(np.random.default_rng(2), 5, D))
    assert idx.delete(["0"]) == 1 and idx.path is None
    assert not list(tmp_path.iterdir())


# -- random weights are never silent --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    return write_tiny_manifest(tmp_path_factory.mktemp("safety") / "d", n=4)


def test_build_without_weights_warns_and_records_random_init(tiny, tmp_path):
    rc, _, err = cli(
        "index", "build", "xm-micro", "--data", str(tiny), "--out", str(tmp_path / "a"), "--no-progress"
    )
    assert rc == 0, err
    warnings = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "xm-micro" in warnings[0] and "random" in warnings[0]
    model = json.loads((tmp_path / "a" / "index.json").read_text())["model"]
    assert model["random_init"] is True and "seeded_random_init" not in model


def test_build_with_weights_is_quiet_and_records_no_random_init(tiny, tmp_path):
    import torch

    from xmodal.models import load_encoder

    weights = tmp_path / "w.pt"
    torch.save(load_encoder("xm-micro").model.state_dict(), weights)
    args = ("--data", str(tiny), "--out", str(tmp_path / "b"), "--no-progress", "--pretrained", str(weights))
    rc, _, err = cli("index", "build", "xm-micro", *args)
    assert rc == 0, err
    assert not [x for x in err.splitlines() if x.startswith("warning:")]
    model = json.loads((tmp_path / "b" / "index.json").read_text())["model"]
    assert model["random_init"] is False and model["pretrained"] == str(weights)


def test_older_index_json_key_is_read_as_random_init(vec_index):
    info = json.loads((vec_index / "index.json").read_text())
    info["model"] = {"name": "xm-micro", "source": "xm-micro", "pretrained": None, "seeded_random_init": True}
    (vec_index / "index.json").write_text(json.dumps(info))
    idx = open_index(vec_index)
    assert idx.info["model"]["random_init"] is True and "seeded_random_init" not in idx.info["model"]
    idx.save()
    assert json.loads((vec_index / "index.json").read_text())["model"]["random_init"] is True


# -- index.json cannot make search unpickle anything -----------------------------------------------------


class _Touch:
    """Unpickling this creates a file: proof that something was executed."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _crafted_sources(tmp_path: pathlib.Path, marker: pathlib.Path) -> dict[str, dict]:
    """Model records that point index.json at a pickle that touches `marker` when unpickled."""
    import open_clip
    import torch
    import yaml

    import xmodal.models  # noqa: F401 - registers xm-micro with open_clip

    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Touch(marker)))
    zipped = tmp_path / "evil.pt"
    torch.save(_Touch(marker), zipped)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"model": {"name": "xm-micro"}, "model_config": open_clip.get_model_config("xm-micro")}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save(_Touch(marker), run / "checkpoints" / "latest.pt")
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.json").write_text(json.dumps(open_clip.get_model_config("xm-micro")))
    torch.save(_Touch(marker), export / "open_clip_model.pt")
    return {
        "pretrained-torch-zip": {"source": "xm-micro", "pretrained": str(zipped)},
        "pretrained-raw-pickle": {"source": "xm-micro", "pretrained": str(raw)},
        "source-is-a-pickle": {"source": str(zipped), "pretrained": None},
        "run-checkpoint": {"source": str(run), "pretrained": None},
        "export-weights": {"source": str(export), "pretrained": None},
        "dir-plus-pretrained": {"source": str(export), "pretrained": str(raw)},
        "not-a-model-source": {"source": "../elsewhere/model", "pretrained": None},
        "json-plus-missing-weights": {"source": str(export / "model.json"), "pretrained": "tag"},
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle is protocol 4
def test_crafted_index_json_model_is_refused_not_unpickled(vec_index, tmp_path):
    marker = tmp_path / "executed"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Touch(control)))
    assert control.exists()  # the payload is live when unpickled
    info = json.loads((vec_index / "index.json").read_text())
    for case, model in _crafted_sources(tmp_path, marker).items():
        (vec_index / "index.json").write_text(json.dumps({**info, "model": {"name": "x", **model}}))
        idx = open_index(vec_index)
        with pytest.raises(UserError) as e:
            idx.search_text("a red circle")
        msg = str(e.value)
        assert "\n" not in msg and str(vec_index / "index.json") in msg, (case, msg)
        assert not marker.exists(), case
    rc, _, err = cli("search", str(vec_index), "a red circle")  # the CLI: one line, no traceback
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err
    assert not marker.exists()
