"""`xmodal data reduce`: the TL;DR-style selection against hand-checked cases, the command end to end on
the tiny manifest with a tiny trained run (paths resolve, `xmodal train` reads the output), and one-line
errors."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MICRO_TRAIN, assert_one_line_error, run_cli, run_in_process, write_tiny_manifest
from xmodal.data.reduce import (
    cluster_quotas,
    default_clusters,
    parse_keep,
    resolve_keep,
    rewrite_path,
    select,
    select_in_clusters,
)
from xmodal.errors import UserError

D = 8
SIZES = (20, 12, 8)  # blob sizes: different, so proportional quotas differ


def _blobs():
    """Three blobs around the orthogonal unit vectors e0, e1, e2 of R^8. Blob j holds pairs c ± r·u (u ⟂ all
    centres), r = 0.05·(p+1) for pair p, normalised: each blob's mean is exactly along its centre, and a
    member's cosine to it is 1/√(1+r²), so pair p is the p-th nearest pair. Members of a pair tie."""
    x, blob, radius = [], [], []
    for j, n in enumerate(SIZES):
        for p in range(n // 2):
            r = 0.05 * (p + 1)
            u = np.eye(D)[3 + p % (D - 3)]
            for s in (1, -1):
                v = np.eye(D)[j] + s * r * u
                x.append(v / np.linalg.norm(v))
                blob.append(j)
                radius.append(r)
    return np.array(x, np.float32), np.array(blob), np.array(radius)


def test_quotas_are_proportional_and_sum_exactly():
    assert cluster_quotas(np.array(SIZES), 20).tolist() == [10, 6, 4]
    # 7 of 40: exact 3.5, 2.1, 1.4 → floors 3, 2, 1 and the one left over goes to the largest remainder
    assert cluster_quotas(np.array(SIZES), 7).tolist() == [4, 2, 1]
    # equal remainders: the larger cluster first, then the lower id
    assert cluster_quotas(np.array([3, 1, 3]), 2).tolist() == [1, 0, 1]
    assert cluster_quotas(np.array([5, 0, 3]), 8).tolist() == [5, 0, 3]
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 30, size=rng.integers(1, 12))
        n_keep = int(rng.integers(0, sizes.sum() + 1))
        q = cluster_quotas(sizes, n_keep)
        exact = sizes * n_keep / max(sizes.sum(), 1)
        assert q.sum() == n_keep and (q <= sizes).all() and (np.abs(q - exact) < 1).all()


def test_selection_keeps_each_clusters_share_nearest_to_its_centroid():
    x, blob, radius = _blobs()
    centroids = np.eye(D)[:3]
    kept = select_in_clusters(x, blob, centroids, 20)
    # quotas 10, 6, 4: the 5, 3 and 2 smallest-radius pairs of the three blobs
    assert np.bincount(blob[kept]).tolist() == [10, 6, 4]
    for j, pairs in enumerate((5, 3, 2)):
        got = sorted(radius[kept][blob[kept] == j].round(3).tolist())
        assert got == sorted([round(0.05 * (p + 1), 3) for p in range(pairs)] * 2), j
    # a count: 7 → quotas 4, 2, 1; the odd one in blob 2 is the first member of its nearest pair (a tie)
    kept = select_in_clusters(x, blob, centroids, 7)
    first = {j: int(np.flatnonzero(blob == j)[0]) for j in range(3)}
    assert kept.tolist() == [
        first[0],
        first[0] + 1,
        first[0] + 2,
        first[0] + 3,
        first[1],
        first[1] + 1,
        first[2],
    ]


def test_kmeans_selection_finds_the_blobs_and_is_seeded():
    x, blob, radius = _blobs()
    perm = np.random.default_rng(3).permutation(len(x))  # no help from the order
    x, blob, radius = x[perm], blob[perm], radius[perm]
    sel = select(x, 20, 3, seed=0)
    # the clusters are the blobs (up to naming)
    assert all(len(set(sel.assign[blob == j])) == 1 for j in range(3))
    assert len(set(sel.assign)) == 3
    assert np.bincount(blob[sel.kept]).tolist() == [10, 6, 4]
    for j, pairs in enumerate((5, 3, 2)):
        assert radius[sel.kept][blob[sel.kept] == j].max() == pytest.approx(0.05 * pairs), j
    again = select(x, 20, 3, seed=0)
    assert again.kept.tolist() == sel.kept.tolist()
    assert default_clusters(40) == 6 and default_clusters(1) == 1 and default_clusters(5000) == 71


def test_nearest_property_on_random_data():
    """Whatever the clustering: inside every cluster, each kept item is at least as close to the centroid
    as every dropped one, and the per-cluster counts are the largest-remainder quotas."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    sel = select(x, 77, 9, seed=5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sizes = np.bincount(sel.assign, minlength=9)
    assert np.bincount(sel.assign[sel.kept], minlength=9).tolist() == sel.quotas.tolist()
    assert sel.quotas.tolist() == cluster_quotas(sizes, 77).tolist() and len(sel.kept) == 77
    kept = np.zeros(len(x), bool)
    kept[sel.kept] = True
    for j in range(9):
        m = sel.assign == j
        c = xn[m].mean(0)
        c /= np.linalg.norm(c)
        sim = xn @ c
        if kept[m].any() and (~kept[m]).any():
            assert sim[m & kept].min() >= sim[m & ~kept].max() - 1e-5, j


def test_uniform_pick_spans_the_cluster():
    x, blob, radius = _blobs()
    kept = select_in_clusters(x, blob, np.eye(D)[:3], 5, pick="uniform")  # quotas 3, 1, 1
    # blob 0 (20 members ranked by radius, ties by index): ranks 3, 10, 16 → pairs 1, 5, 8
    assert sorted(radius[kept][blob[kept] == 0].round(3).tolist()) == [0.1, 0.3, 0.45]
    assert radius[kept][blob[kept] == 1].round(3).tolist() == [0.2]  # rank 6 of 12 → pair 3
    assert radius[kept][blob[kept] == 2].round(3).tolist() == [0.15]  # rank 4 of 8 → pair 2


def test_drop_misaligned_comes_first():
    x, blob, radius = _blobs()
    align = np.linspace(0, 1, len(x))[::-1].copy()  # the last items are the least aligned
    sel = select(x, 10, 3, seed=0, alignment=align, drop_misaligned=0.5)
    assert sel.dropped.tolist() == list(range(20, 40))
    assert set(sel.kept.tolist()) <= set(range(20)) and len(sel.kept) == 10
    assert (sel.assign[20:] == -1).all()
    with pytest.raises(UserError, match="--keep"):
        select(x, 21, 3, alignment=align, drop_misaligned=0.5)


def test_parse_and_resolve_keep():
    assert parse_keep("0.5") == 0.5 and parse_keep("50%") == 0.5 and parse_keep("1.0") == 1.0
    assert parse_keep("2500") == 2500 and isinstance(parse_keep("1"), int)
    assert resolve_keep(0.5, 41) == 21 and resolve_keep(0.001, 41) == 1 and resolve_keep(1.0, 41) == 41
    assert resolve_keep(7, 41) == 7
    for bad in ("0", "1.5", "-0.2", "0.0", "abc", "150%", "nan"):
        with pytest.raises(UserError, match="--keep"):
            parse_keep(bad)
    with pytest.raises(UserError, match="--keep 42"):
        resolve_keep(42, 41)


def test_rewrite_path(tmp_path):
    src, out = tmp_path / "data", tmp_path / "elsewhere" / "deeper"
    (src / "img").mkdir(parents=True)
    out.mkdir(parents=True)
    (src / "img" / "a.png").write_bytes(b"x")
    new = rewrite_path("img/a.png", src, out)
    assert new == "../../data/img/a.png" and (out / new).is_file()
    assert rewrite_path("img/a.png", src, src) == "img/a.png"
    assert rewrite_path("/abs/a.png", src, out) == "/abs/a.png"
    assert rewrite_path("~/a.png", src, out) == "~/a.png"
    # the new manifest's folder is a symlink elsewhere: ".." must walk from where it really is
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    assert (link / rewrite_path("img/a.png", src, link)).is_file()


# -- the command ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tiny manifest, a 2-step xm-micro run on it, env with an isolated cache)."""
    root = tmp_path_factory.mktemp("reduce")
    env = {"XMODAL_CACHE": str(root / "cache")}
    m = write_tiny_manifest(root / "tiny")
    run = root / "run"
    run_cli(
        "train",
        "--data",
        str(m),
        *MICRO_TRAIN,
        "--steps",
        "2",
        "--out",
        str(run),
        env=env,
    )
    return m, run, env


def test_reduce_end_to_end(trained, tmp_path):
    m, run, env = trained
    out = tmp_path / "other" / "small.jsonl"  # another folder: every relative path is re-based
    p = run_cli(
        "data",
        "reduce",
        str(m),
        "--keep",
        "0.5",
        "--model",
        str(run),
        "--out",
        str(out),
        "--seed",
        "1",
        "--batch-size",
        "7",
        env=env,
    )
    assert "kept 20 of 40 images (50.0%) from 6 clusters" in p.stdout and str(out) in p.stdout
    assert len(p.stdout.strip().splitlines()) == 1, p.stdout
    assert "embedding 40 images" in p.stderr
    original = {}
    for line in m.read_text().splitlines():
        row = json.loads(line)
        original[row["image"]] = row
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 20 and len({r["image"] for r in rows}) == 20
    for r in rows:
        path = out.parent / r["image"]
        assert path.is_file(), r["image"]
        src = original[path.name]
        assert os.path.samefile(path, m.parent / src["image"])
        assert {k: v for k, v in r.items() if k != "image"} == {k: v for k, v in src.items() if k != "image"}
    order = [list(original).index(Path(r["image"]).name) for r in rows]
    assert order == sorted(order)  # manifest order kept
    assert not list(out.parent.glob(".*tmp*"))  # written atomically: no temp file left

    # the reduced manifest trains
    run_cli(
        "train",
        "--data",
        str(out),
        *MICRO_TRAIN,
        "--steps",
        "1",
        "--out",
        str(tmp_path / "run2"),
        env=env,
    )
    assert (tmp_path / "run2" / "checkpoints" / "latest.pt").is_file()


def test_reduce_keeps_duplicate_rows_and_absolute_paths(trained, tmp_path, monkeypatch):
    """In-process: rows naming one image stay together; absolute paths are written as they were; a count
    for --keep; same seed → same bytes."""
    from xmodal.data.reduce import reduce_manifest

    m, run, env = trained
    monkeypatch.setenv("XMODAL_CACHE", env["XMODAL_CACHE"])
    lines = m.read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    rows[0]["image"] = str((m.parent / rows[0]["image"]).resolve())  # an absolute path
    extra = {**rows[1], "caption": "one more caption", "note": {"nested": [1, 2]}}  # a COCO-style second row
    src = tmp_path / "src" / "data.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps(r) + "\n" for r in [*rows, extra]))
    for r in rows[1:]:
        shutil.copy(m.parent / r["image"], src.parent / r["image"])
    out = tmp_path / "out.jsonl"
    res = reduce_manifest(src, run, out, 40, progress=False)
    assert res.n_kept == 40 and res.n_rows == 41 and res.n_items == 40
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got[0]["image"] == rows[0]["image"]
    assert got[-1] == {**extra, "image": f"src/{extra['image']}"}
    assert all((out.parent / r["image"]).is_file() for r in got)
    small = tmp_path / "small.jsonl"
    reduce_manifest(src, run, small, 9, seed=3, progress=False)
    first = small.read_bytes()
    reduce_manifest(src, run, small, 9, seed=3, progress=False)
    assert small.read_bytes() == first
    names = [Path(json.loads(x)["image"]).name for x in first.decode().splitlines()]
    assert len(set(names)) == 9 and (names.count(Path(rows[1]["image"]).name) in (0, 2))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{missing}", "--keep", "0.5"], "MANIFEST"),
        (["{m}", "--keep", "1.5"], "--keep 1.5"),
        (["{m}", "--keep", "41"], "--keep 41"),
        (["{m}", "--keep", "0.5", "--clusters", "41"], "--clusters 41"),
        (["{m}", "--keep", "0.5", "--out-suffix", ".txt"], "--out"),
        (["{m}", "--keep", "0.5", "--untrained"], "--model"),
        (["{m}", "--keep", "0.5", "--pick", "far"], "--pick far"),
    ],
)
def test_bad_input_is_one_line_error(trained, tmp_path, monkeypatch, args, needle):
    m, run, env = trained
    monkeypatch.setenv("XMODAL_CACHE", env["XMODAL_CACHE"])  # in this process: no interpreter start-up
    model = run
    out = tmp_path / "small.jsonl"
    untrained = "--untrained" in args
    if untrained:  # a run directory without checkpoints
        model = tmp_path / "untrained"
        model.mkdir()
        shutil.copy(run / "config.yaml", model / "config.yaml")
        args = [a for a in args if a != "--untrained"]
    if "--out-suffix" in args:
        i = args.index("--out-suffix")
        out = tmp_path / f"small{args[i + 1]}"
        args = args[:i] + args[i + 2 :]
    args = [a.replace("{m}", str(m)).replace("{missing}", str(tmp_path / "nope.jsonl")) for a in args]
    p = run_in_process("data", "reduce", *args, "--model", str(model), "--out", str(out), check=False)
    assert_one_line_error(p, needle)
    assert not out.exists()
    if untrained:
        assert "train it first" in p.stderr
