"""Backward-compatible upgrades: the projection (save/load, errors, fit), its InfoNCE loss and the compat
metric against brute-force references, and `xmodal compat fit` / `xmodal eval --task compat` end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MICRO_TRAIN, assert_one_line_error, run_in_process, write_tiny_manifest
from xmodal.compat.fit import fit_projection, info_nce
from xmodal.compat.projection import Projection, load_projection
from xmodal.errors import UserError
from xmodal.eval.compat import compat_cells


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def orthogonal(d: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0].astype(np.float32)


def paired(n: int, d: int, seed: int, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """n (text, image) unit vectors that share a latent, so cross-modal retrieval is neither trivial nor
    hopeless."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    return unit(z + noise * rng.normal(size=(n, d))), unit(z + noise * rng.normal(size=(n, d)))


def random_projection(kind: str, d_new: int, d_old: int, image: bool, seed: int = 0) -> Projection:
    rng = np.random.default_rng(seed)
    w = {}
    for mod in ("text", "image") if image else ("text",):
        w[f"{mod}.W"] = rng.normal(size=(d_new, d_old))
        w[f"{mod}.b"] = rng.normal(size=d_old)
        if kind == "mlp":
            w |= {f"{mod}.W1": rng.normal(size=(d_new, 5)), f"{mod}.b1": rng.normal(size=5)}
            w[f"{mod}.W2"] = rng.normal(size=(5, d_old))
    return Projection(kind, d_new, d_old, w, fitted_on={"text": 3, "pairs": 2 if image else 0})


# -- the loss ------------------------------------------------------------------------------------------


def brute_info_nce(q, g, t, ignore=None, symmetric=True) -> float:
    """Mean over queries of −log softmax(logits)[positive], masked pairs left out of the denominator."""
    n = len(q)

    def direction(a, b, mask) -> float:
        total = 0.0
        for i in range(n):
            logits = [float(np.dot(a[i], b[j])) / t for j in range(n)]
            keep = [j for j in range(n) if j == i or mask is None or not mask[i][j]]
            total += math.log(sum(math.exp(logits[j]) for j in keep)) - logits[i]
        return total / n

    rows = direction(q, g, ignore)
    if not symmetric:
        return rows
    return (rows + direction(g, q, None if ignore is None else np.asarray(ignore).T)) / 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_equals_brute_force(symmetric):
    rng = np.random.default_rng(1)
    q, g = unit(rng.normal(size=(7, 5))), unit(rng.normal(size=(7, 5)))
    ignore = rng.random((7, 7)) < 0.3
    ignore = ignore | ignore.T  # "the same caption" is symmetric
    for mask in (None, ignore):
        got = info_nce(
            torch.from_numpy(q).double(),
            torch.from_numpy(g).double(),
            0.07,
            None if mask is None else torch.from_numpy(mask),
            symmetric=symmetric,
        )
        want = brute_info_nce(q.astype(np.float64), g.astype(np.float64), 0.07, mask, symmetric)
        assert float(got) == pytest.approx(want, rel=1e-9)


def test_info_nce_ignores_an_asymmetric_mask_per_direction():
    rng = np.random.default_rng(2)
    q, g = unit(rng.normal(size=(4, 3))).astype(np.float64), unit(rng.normal(size=(4, 3))).astype(np.float64)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 2] = True  # only query 0 treats gallery item 2 as a match
    got = info_nce(torch.from_numpy(q), torch.from_numpy(g), 0.1, torch.from_numpy(mask))
    assert float(got) == pytest.approx(brute_info_nce(q, g, 0.1, mask), rel=1e-9)
    assert float(got) != pytest.approx(brute_info_nce(q, g, 0.1, None), rel=1e-6)


# -- the projection object -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("image", [True, False])
def test_save_load_round_trip_gives_equal_outputs(tmp_path, kind, image):
    p = random_projection(kind, 6, 4, image)
    p.old_model, p.new_model = {"source": "/old"}, {"source": "/new"}
    p.embedded = {"old": {"texts": 3, "images": 2}, "new": {"texts": 3, "images": 2}}
    p.save(tmp_path / "proj")
    q = load_projection(tmp_path / "proj")
    x = np.random.default_rng(3).normal(size=(9, 6)).astype(np.float32)
    for mod in ("text", "image"):
        y = q.apply(x, mod)
        assert y.dtype == np.float32 and y.shape == (9, 4)
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(y, p.apply(x, mod))
    assert q.fingerprint == p.fingerprint and len(q.fingerprint) == 24
    meta = json.loads((tmp_path / "proj" / "projection.json").read_text())
    assert meta["fingerprint"] == p.fingerprint and meta["kind"] == kind
    assert meta["fitted_on"] == {"text": 3, "pairs": 2 if image else 0}
    assert (meta["d_new"], meta["d_old"]) == (6, 4)
    assert q.old_model == {"source": "/old"} and q.embedded == p.embedded
    assert sorted(x.name for x in (tmp_path / "proj").iterdir()) == [
        "projection.json",
        "projection.safetensors",
    ]


def test_apply_is_the_documented_formula():
    p = random_projection("mlp", 6, 4, image=True)
    x = np.random.default_rng(4).normal(size=(5, 6)).astype(np.float32)
    w = p.weights
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = xn @ w["image.W"] + w["image.b"] + np.maximum(xn @ w["image.W1"] + w["image.b1"], 0) @ w["image.W2"]
    np.testing.assert_allclose(p.apply(x, "image"), y / np.linalg.norm(y, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(p.apply(x, "image"), p.apply(x, "text"))


def test_text_only_projection_shares_its_map_with_images():
    p = random_projection("linear", 6, 4, image=False)
    x = np.random.default_rng(5).normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_array_equal(p.apply(x, "image"), p.apply(x, "text"))
    assert "shared with the text map" in p.info["image_map"]
    assert "own" in random_projection("linear", 6, 4, image=True).info["image_map"]
    with pytest.raises(ValueError, match="modality"):
        p.apply(x, "audio")
    with pytest.raises(ValueError, match=r"\[n, 6\]"):
        p.apply(x[:, :5], "text")


def test_resave_replaces_and_foreign_folder_is_refused(tmp_path):
    out = tmp_path / "proj"
    random_projection("linear", 6, 4, True, seed=0).save(out)
    second = random_projection("linear", 6, 4, False, seed=1)
    second.save(out)
    assert load_projection(out).fingerprint == second.fingerprint
    assert not load_projection(out).has_image_map
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds other files"):
        second.save(other)
    assert (other / "notes.txt").read_text() == "keep me"


def corrupt_cases(folder: Path):
    """(name, damage) pairs; each leaves `folder` (a saved projection) unloadable."""
    j, w = folder / "projection.json", folder / "projection.safetensors"

    def tamper(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF  # a weight byte: the file still parses, the hash no longer matches
        path.write_bytes(bytes(data))

    return [
        ("projection.json", lambda: j.unlink()),
        ("projection.json", lambda: j.write_text("{not json")),
        ("projection.json", lambda: j.write_text(json.dumps({"kind": "linear"}))),
        ("projection.json", lambda: j.write_text(json.dumps({**json.loads(j.read_text()), "kind": "cubic"}))),
        ("projection.safetensors", lambda: w.unlink()),
        ("projection.safetensors", lambda: w.write_bytes(w.read_bytes()[:20])),
        ("projection.safetensors", lambda: w.write_bytes(b"garbage" * 10)),
        ("projection.safetensors", lambda: tamper(w)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_missing_or_corrupt_files_are_one_line_errors(tmp_path, case):
    out = tmp_path / "proj"
    random_projection("linear", 6, 4, True).save(out)
    name, damage = corrupt_cases(out)[case]
    damage()
    with pytest.raises(UserError) as e:
        load_projection(out)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "xmodal compat fit" in msg, msg


def test_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no such projection folder.*xmodal compat fit"):
        load_projection(tmp_path / "nope")


# -- fitting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "init"), [("linear", "ridge"), ("linear", "random"), ("mlp", "ridge")])
def test_fit_recovers_a_rotation_of_the_space(kind, init):
    # the old model's space is the new one rotated: old = new @ R. Without the map new queries are useless on
    # the old gallery; with it they retrieve as well as in the new model's own space.
    d, R = 16, orthogonal(16, 7)
    new_t, new_i = paired(300, d, seed=0)
    old_t, old_i = unit(new_t @ R), unit(new_i @ R)
    proj = fit_projection(
        new_t, old_t, steps=200, lr=1e-2, seed=0, kind=kind, init=init, batch_size=128, temperature=0.2
    )
    assert proj.fitted_on == {"text": 300, "pairs": 0}
    pos = np.eye(300, dtype=bool)
    m = compat_cells(old_t, old_i, new_t, new_i, pos, project=proj.apply)
    c = m["cells"]
    for direction in ("t2i", "i2t"):
        assert c["new_new"][direction]["R@1"] > 0.3  # the data is hard enough to measure
        assert c["new_old"][direction]["R@10"] < 0.15  # rotated: incompatible without the map
        for k in ("R@1", "R@5", "R@10"):
            assert c["proj_old"][direction][k] == pytest.approx(c["new_new"][direction][k], abs=0.05)
    assert m["compatible"] == {"t2i": False, "i2t": False}
    # the text map itself is (a positive multiple of) R: projected rows point where the old ones do
    assert float(np.mean(np.sum(proj.apply(new_i, "image") * old_i, 1))) > 0.85


def test_fit_reduces_the_loss_and_is_deterministic():
    d = 12
    new_t, _ = paired(200, d, seed=1)
    rng = np.random.default_rng(2)
    old_t = unit(np.tanh(new_t @ rng.normal(size=(d, 10))))  # a non-linear, lower-dimensional old space
    kw = dict(steps=80, lr=5e-3, init="random", batch_size=64, kind="mlp", hidden=16)
    a = fit_projection(new_t, old_t, seed=3, **kw)
    b = fit_projection(new_t, old_t, seed=3, **kw)
    c = fit_projection(new_t, old_t, seed=4, **kw)
    assert a.losses["text"]["last"] < 0.5 * a.losses["text"]["first"]
    assert a.fingerprint == b.fingerprint and a.fingerprint != c.fingerprint
    assert (a.d_new, a.d_old) == (12, 10) and a.kind == "mlp"


def test_pair_stage_fits_the_image_side():
    # the old model aligns texts and images; the new one turns each modality its own way (new text = old
    # text @ At, new image = old image @ Ai): a text-only map cannot serve image queries, the pair stage
    # gives the images their own map.
    d, n, npairs = 16, 300, 120
    old_t, old_i = paired(n, d, seed=5, noise=0.3)
    new_t, new_i = unit(old_t @ orthogonal(d, 8)), unit(old_i @ orthogonal(d, 9))
    kw = dict(steps=150, pair_steps=150, lr=1e-2, seed=0, batch_size=128, temperature=0.2, kind="linear")
    text_only = fit_projection(new_t, old_t, **kw)
    with_pairs = fit_projection(new_t, old_t, new_i[:npairs], old_i[:npairs], image_side="own", **kw)
    assert with_pairs.fitted_on == {"text": n, "pairs": npairs} and with_pairs.has_image_map
    assert with_pairs.losses["pairs"]["steps"] == 150
    held = slice(npairs, n)  # judged on images the fit did not see

    def image_alignment(p: Projection) -> float:
        return float(np.mean(np.sum(p.apply(new_i[held], "image") * old_i[held], 1)))

    assert image_alignment(text_only) < 0.2 and image_alignment(with_pairs) > 0.95
    pos = np.eye(n - npairs, dtype=bool)
    cells = [
        compat_cells(old_t[held], old_i[held], new_t[held], new_i[held], pos, project=p.apply)["cells"]
        for p in (text_only, with_pairs)
    ]
    old_old = cells[0]["old_old"]["i2t"]["R@1"]
    assert cells[0]["proj_old"]["i2t"]["R@1"] < 0.1 < old_old - 0.1 < cells[1]["proj_old"]["i2t"]["R@1"]
    # text queries were served by the text map all along
    assert cells[0]["proj_old"]["t2i"]["R@1"] == pytest.approx(cells[0]["old_old"]["t2i"]["R@1"], abs=0.05)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_pair_stage_shift_and_shared_image_sides(kind):
    # "shift" (the default): the image map is the text map plus an offset on its output; "shared": one map
    old_t, old_i = paired(200, 8, seed=6)
    new_t, new_i = unit(old_t + 0.3), unit(old_i - 0.3)  # the new model's modalities sit apart differently
    kw = dict(steps=30, pair_steps=60, lr=1e-2, seed=0, batch_size=64, kind=kind, hidden=8)
    shift = fit_projection(new_t, old_t, new_i[:50], old_i[:50], **kw)
    assert shift.has_image_map and shift.settings["image_side"] == "shift"
    for name, text in shift.weights.items():
        if name.startswith("text.") and name != "text.b":
            np.testing.assert_array_equal(shift.weights["image." + name[5:]], text)
    offset = shift.weights["image.b"] - shift.weights["text.b"]
    assert np.abs(offset).max() > 1e-3
    shared = fit_projection(new_t, old_t, new_i[:50], old_i[:50], image_side="shared", **kw)
    assert not shared.has_image_map and shared.fitted_on["pairs"] == 50
    assert "one map fitted on text and 50 pairs" in shared.info["image_map"]
    assert shared.fingerprint != fit_projection(new_t, old_t, **kw).fingerprint  # the pairs moved it


def test_fit_rejects_mismatched_inputs():
    a = unit(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(ValueError, match="same caption"):
        fit_projection(a, a[:9], steps=1)
    with pytest.raises(ValueError, match="together"):
        fit_projection(a, a, a, steps=1)
    with pytest.raises(ValueError, match="pair_text_index"):
        fit_projection(a, a, a[:3], a[:3], steps=1, pair_text_index=[0, 1, 10])


# -- the metric ------------------------------------------------------------------------------------------


def brute_recall(q: np.ndarray, g: np.ndarray, pos: np.ndarray, k: int) -> float:
    """Share of queries with a positive among their k best gallery items (python loops, float32 scores)."""
    scores = (torch.from_numpy(q) @ torch.from_numpy(g).T).numpy()
    hits = 0
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: -float(scores[i][j]))
        hits += any(pos[i][j] for j in order[:k])
    return hits / len(q)


def test_compat_cells_equal_brute_force():
    rng = np.random.default_rng(11)
    n_img, d = 20, 8
    owner = np.repeat(np.arange(n_img), 2)  # two captions per image
    z = rng.normal(size=(n_img, d))
    old_i, new_i = unit(z + rng.normal(size=z.shape)), unit(z + rng.normal(size=z.shape))
    old_t = unit(z[owner] + rng.normal(size=(2 * n_img, d)))
    new_t = unit(z[owner] + 0.5 * rng.normal(size=(2 * n_img, d)))
    pos = owner[:, None] == np.arange(n_img)[None, :]
    proj = random_projection("linear", d, d, image=True, seed=3)
    m = compat_cells(old_t, old_i, new_t, new_i, pos, project=proj.apply)
    views = {
        "old_old": (old_t, old_i, old_i, old_t),
        "new_new": (new_t, new_i, new_i, new_t),
        "new_old": (new_t, old_i, new_i, old_t),
        "proj_old": (proj.apply(new_t, "text"), old_i, proj.apply(new_i, "image"), old_t),
    }
    for cell, (qt, gi, qi, gt) in views.items():
        for k in (1, 5, 10):
            assert m["cells"][cell]["t2i"][f"R@{k}"] == pytest.approx(brute_recall(qt, gi, pos, k))
            assert m["cells"][cell]["i2t"][f"R@{k}"] == pytest.approx(brute_recall(qi, gt, pos.T, k))
    for key, cell in (("compatible", "new_old"), ("compatible_projected", "proj_old")):
        for d_ in ("t2i", "i2t"):
            p = pos if d_ == "t2i" else pos.T
            a, b = views[cell][:2] if d_ == "t2i" else views[cell][2:]
            oa, ob = views["old_old"][:2] if d_ == "t2i" else views["old_old"][2:]
            assert m[key][d_] == (brute_recall(a, b, p, 1) > brute_recall(oa, ob, p, 1))


def test_compat_cells_with_different_dimensions_need_a_projection():
    old_t, old_i = paired(10, 6, seed=0)
    new_t, new_i = paired(10, 8, seed=1)
    m = compat_cells(old_t, old_i, new_t, new_i, np.eye(10, dtype=bool))
    assert "skipped" in m["cells"]["new_old"] and m["compatible"] == {"t2i": False, "i2t": False}
    assert "proj_old" not in m["cells"] and "compatible_projected" not in m


# -- end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two xm-micro runs on the same 24 tiny shapes, different seeds (an 'old' and a 'new' model)."""
    root = tmp_path_factory.mktemp("compat")
    manifest = write_tiny_manifest(root / "data", n=24)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XMODAL_CACHE", str(root / "cache"))
        for name, seed in (("old", "0"), ("new", "1")):
            run_in_process("train", "--data", manifest, "--out", root / name, *MICRO_TRAIN, "--steps", "2",
                           "--seed", seed)  # fmt: skip
    return {"manifest": manifest, "old": root / "old", "new": root / "new", "root": root}


def test_compat_fit_cli_end_to_end(runs, tmp_path):
    out, summary = tmp_path / "proj", tmp_path / "fit.json"
    fit = ["compat", "fit", "--old", runs["old"], "--new", runs["new"], "--data", runs["manifest"]]
    r = run_in_process(*fit, "--out", out, "--pairs", "8", "--steps", "20", "--batch-size", "16",
                       "--json", summary, "-q")  # fmt: skip
    captions = {c for line in runs["manifest"].read_text().splitlines() for c in json.loads(line)["caption"]}
    p = load_projection(out)
    assert p.fitted_on == {"text": len(captions), "pairs": 8} and p.has_image_map
    assert p.embedded == {
        "old": {"texts": len(captions), "images": 8},
        "new": {"texts": len(captions), "images": 8},
    }
    assert f"fitted on {len(captions)} texts and 8 image-text pairs" in r.stdout
    assert f"old model {len(captions)} texts + 8 images" in r.stdout and p.fingerprint in r.stdout
    meta = json.loads((out / "projection.json").read_text())
    for side in ("old", "new"):
        rec = meta[f"{side}_model"]
        assert rec["source"] == str(runs[side].absolute()) and rec["random_init"] is False
        assert rec["dim"] == p.d_old and len(rec["weights"]) == 24
    assert meta["old_model"]["weights"] != meta["new_model"]["weights"]
    assert json.loads(summary.read_text())["fingerprint"] == p.fingerprint
    # text only: no image embedded by either model, the image side shares the text map
    r = run_in_process(*fit, "--out", tmp_path / "t", "--texts-only", "--steps", "5", "-q")  # fmt: skip
    t = load_projection(tmp_path / "t")
    assert t.fitted_on["pairs"] == 0 and not t.has_image_map
    assert t.embedded["old"]["images"] == t.embedded["new"]["images"] == 0
    assert "0 image-text pairs" in r.stdout and "shared with the text map" in r.stdout


def test_compat_fit_cli_errors(runs, tmp_path):
    base = ["compat", "fit", "--old", runs["old"], "--new", runs["new"], "--data", runs["manifest"]]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    assert_one_line_error(run_in_process(*base, "--out", busy, check=False), "holds other files")
    assert_one_line_error(
        run_in_process(*base, "--out", tmp_path / "p", "--kind", "cubic", check=False), "--kind"
    )
    p = run_in_process("compat", "fit", "--old", tmp_path / "nope", "--new", runs["new"], "--data",
                       runs["manifest"], "--out", tmp_path / "p", check=False)  # fmt: skip
    assert_one_line_error(p, "nope")


def brute_cells(old_enc, new_enc, data, proj) -> dict:
    """The four cells' R@K with the pessimistic tie rule by python loops over the encoders' own
    embeddings of the eval data (captions flattened as the eval cache does)."""
    caps = [c for cs in data.captions for c in cs]
    owner = [i for i, cs in enumerate(data.captions) for _ in cs]
    pos = np.array([[owner[t] == i for i in range(len(data))] for t in range(len(caps))])
    emb = {}
    for name, enc in (("old", old_enc), ("new", new_enc)):
        emb[name] = (enc.encode_texts(caps).numpy(), enc.encode_images(data.images).numpy())
    (ot, oi), (nt, ni) = emb["old"], emb["new"]
    views = {
        "old_old": (ot, oi, oi, ot),
        "new_new": (nt, ni, ni, nt),
        "new_old": (nt, oi, ni, ot),
        "proj_old": (proj.apply(nt, "text"), oi, proj.apply(ni, "image"), ot),
    }

    def recall(q, g, p, k):
        s = (torch.from_numpy(q) @ torch.from_numpy(g).T).numpy()
        hits = 0
        for i in range(len(q)):
            best = max(float(s[i][j]) for j in range(len(g)) if p[i][j])
            ahead = sum(1 for j in range(len(g)) if not p[i][j] and float(s[i][j]) >= best)  # pessimistic
            hits += ahead < k
        return hits / len(q)

    return {
        cell: {
            "t2i": {f"R@{k}": recall(v[0], v[1], pos, k) for k in (1, 5, 10)},
            "i2t": {f"R@{k}": recall(v[2], v[3], pos.T, k) for k in (1, 5, 10)},
        }
        for cell, v in views.items()
    }


def test_eval_task_compat_json_equals_brute_force(runs, tmp_path):
    from xmodal.data import load_dataset
    from xmodal.models import load_encoder

    proj_dir, out = tmp_path / "proj", tmp_path / "compat.json"
    run_in_process("compat", "fit", "--old", runs["old"], "--new", runs["new"], "--data", runs["manifest"],
                   "--out", proj_dir, "--pairs", "8", "--steps", "20", "-q")  # fmt: skip
    run_in_process("eval", "--task", "compat", "--old", runs["old"], "--new", runs["new"], "--data",
                   runs["manifest"], "--projection", proj_dir, "--ties", "pessimistic", "--json", out, "-q",
                   "--device", "cpu")  # fmt: skip
    res = json.loads(out.read_text())
    assert set(res) == {"compat", "meta"} and res["meta"]["tasks"] == ["compat"]
    c = res["compat"]
    assert set(c["cells"]) == {"old_old", "new_new", "new_old", "proj_old"}
    assert set(c["compatible"]) == set(c["compatible_projected"]) == {"t2i", "i2t"}
    assert c["projection"]["fingerprint"] == load_projection(proj_dir).fingerprint
    assert c["embedded"]["old"]["images"] == c["embedded"]["new"]["images"] == 24
    old_enc, new_enc = load_encoder(runs["old"], device="cpu"), load_encoder(runs["new"], device="cpu")
    data = load_dataset(str(runs["manifest"]), new_enc.image_size, progress=False)
    want = brute_cells(old_enc, new_enc, data, load_projection(proj_dir))
    for cell, dirs in want.items():
        for d, ks in dirs.items():
            for k, v in ks.items():
                assert c["cells"][cell][d][k] == pytest.approx(v), (cell, d, k)
    for d in ("t2i", "i2t"):
        assert c["compatible"][d] == (want["new_old"][d]["R@1"] > want["old_old"][d]["R@1"])
        assert c["compatible_projected"][d] == (want["proj_old"][d]["R@1"] > want["old_old"][d]["R@1"])
    # MODEL works as the new model too, and other tasks run beside compat on it
    out2 = tmp_path / "both.json"
    run_in_process("eval", runs["new"], "--task", "retrieval,compat", "--old", runs["old"], "--data",
                   runs["manifest"], "--ties", "pessimistic", "--json", out2, "-q")  # fmt: skip
    both = json.loads(out2.read_text())
    assert both["retrieval"]["t2i"]["R@1"] == pytest.approx(want["new_new"]["t2i"]["R@1"])
    assert (
        both["compat"]["cells"]["new_old"] == c["cells"]["new_old"]
        and "proj_old" not in both["compat"]["cells"]
    )


def test_eval_compat_flag_errors(runs, tmp_path):
    data = ["--data", runs["manifest"]]
    cases = [
        (["eval", runs["new"], "--task", "compat", *data], "--old"),
        (["eval", "--task", "compat", "--old", runs["old"], *data], "--new"),
        (["eval", runs["new"], "--old", runs["old"], *data], "--task compat"),
        (
            ["eval", runs["old"], "--new", runs["new"], "--task", "compat", "--old", runs["old"], *data],
            "once",
        ),
        (
            [
                "eval",
                "--task",
                "compat",
                "--old",
                runs["old"],
                "--new",
                runs["new"],
                "--projection",
                tmp_path / "nope",
                *data,
            ],
            "--projection",
        ),  # fmt: skip
    ]
    for args, needle in cases:
        assert_one_line_error(run_in_process(*args, check=False), needle)
    # a projection for other dimensions, and a damaged one
    bad = tmp_path / "bad"
    random_projection("linear", 7, 5, False).save(bad)
    args = [
        "eval",
        "--task",
        "compat",
        "--old",
        runs["old"],
        "--new",
        runs["new"],
        *data,
        "--projection",
        bad,
    ]
    assert_one_line_error(run_in_process(*args, check=False), "maps 7-d to 5-d")
    (bad / "projection.safetensors").write_bytes(b"junk")
    assert_one_line_error(run_in_process(*args, check=False), "projection.safetensors")
