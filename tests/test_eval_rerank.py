"""`xmodal eval --rerank itm` (ITM re-ranking of the ITC top-k, both directions) and `--task probe --score
itm` against brute force: pair-by-pair fusion passes, python sorts and hand-counted recalls."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import (
    assert_one_line_error,
    run_cli,
    train_fused_and_plain,
    write_tiny_manifest,
)
from tests.conftest import run_in_process as cli

K = 12  # between R@10 and the gallery size, so R@1, R@5 and R@10 can all change


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(manifest, probe manifest with attribute/object negatives, clip+itm run, clip-only run)."""
    with pytest.MonkeyPatch.context() as mp:  # the module's fixtures use the same isolated cache as tests
        mp.setenv("XMODAL_CACHE", str(tmp_path_factory.getbasetemp() / "xmodal-cache"))
        yield _make_runs(tmp_path_factory.mktemp("rerank"))


def _make_runs(root):
    manifest = write_tiny_manifest(root / "data", n=24)
    colors, shapes = ("red", "green", "blue", "yellow"), ("circle", "square")
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    for r in rows:
        color, shape = r["caption"][0].split()[1:]
        other_color = colors[(colors.index(color) + 1) % 4]
        r["negatives"] = [
            {"caption": f"a {other_color} {shape}", "type": "attribute"},
            {"caption": f"a {color} {shapes[1 - shapes.index(shape)]}", "type": "object"},
        ]
    probe = manifest.with_name("probe.jsonl")
    probe.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fused, plain = train_fused_and_plain(manifest, root)
    return manifest, probe, fused, plain


@pytest.fixture(scope="module")
def loaded(runs):
    from xmodal.data import load_dataset
    from xmodal.models import load_encoder

    enc = load_encoder(runs[2], device="cpu")
    return enc, load_dataset(str(runs[0]), enc.image_size, progress=False)


@pytest.fixture(scope="module")
def itm(loaded):
    return pair_itm(*loaded)


def pair_itm(enc, ds):
    """Memoised ITM log-odds of ONE (caption, image) pair per fusion pass; each image's and caption's
    tower states from its own encode_hidden-style pass (image_hidden / text_hidden on one item)."""
    from xmodal.models.fusion import image_hidden, itm_scores, text_hidden

    memo: dict[tuple[str, int], float] = {}
    img_h: dict[int, torch.Tensor] = {}
    txt_h: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def score(caption: str, i: int) -> float:
        if (caption, i) not in memo:
            if i not in img_h:
                img_h[i] = image_hidden(enc.model, enc.normalize_pixels(ds.images[i : i + 1].float() / 255))[
                    1
                ]
            if caption not in txt_h:
                _, h, _, attn = text_hidden(enc.model, enc.tokenize([caption]))
                txt_h[caption] = h, attn
            h, attn = txt_h[caption]
            memo[caption, i] = float(itm_scores(enc.model, h, attn, img_h[i])[0])
        return memo[caption, i]

    return score


def brute_metrics(itc: np.ndarray, pos: np.ndarray, itm, k: int | None) -> dict[str, float]:
    """R@1/5/10, MRR and median rank of ranked lists: the ITC order (stable: lower index first among
    equal scores), its first k re-sorted by itm(query, item) (ties: lower index first) when k is given."""
    firsts, hits = [], {1: [], 5: [], 10: []}
    for q in range(len(itc)):
        order = list(np.argsort(-itc[q], kind="stable"))
        if k is not None:
            top = sorted(order[:k], key=lambda g, q=q: (-itm(q, g), g))
            order = top + order[k:]
        rel = [bool(pos[q, g]) for g in order]
        firsts.append(rel.index(True) + 1)
        for kk in hits:
            hits[kk].append(any(rel[:kk]))
    out = {f"R@{kk}": sum(v) / len(v) for kk, v in hits.items()}
    return {**out, "MRR": float(np.mean([1 / r for r in firsts])), "median_rank": float(np.median(firsts))}


def brute_retrieval(enc, ds, itm, positives, k):
    """(plain, re-ranked, distinct pairs scored): both directions, positives = "pair" or "label"."""
    from xmodal.eval import EmbeddingCache

    c = EmbeddingCache(enc, ds)
    s = c.scores_t2i.numpy()
    caps, owner = c.captions, c.caption_image.numpy()
    if positives == "label":
        lab = list(ds.labels)
        pos = np.array([[lab[owner[t]] == lab[i] for i in range(c.n_images)] for t in range(c.n_texts)])
    else:
        pos = owner[:, None] == np.arange(c.n_images)[None, :]
    used: set[tuple[str, int]] = set()

    def pair(t: int, i: int) -> float:
        used.add((caps[t], i))
        return itm(caps[t], i)

    plain = {"t2i": brute_metrics(s, pos, None, None), "i2t": brute_metrics(s.T, pos.T, None, None)}
    rer = {
        "t2i": brute_metrics(s, pos, pair, k),
        "i2t": brute_metrics(s.T, pos.T, lambda i, t: pair(t, i), k),
    }
    return plain, rer, len(used)


def assert_same(got: dict, want: dict) -> None:
    for d in ("t2i", "i2t"):
        for m, v in want[d].items():
            assert got[d][m] == pytest.approx(v, abs=1e-9), (d, m, got[d], want[d])


def test_cli_rerank_equals_brute_force_rescoring_of_the_top_k(runs, loaded, itm, tmp_path):
    manifest, _, fused, _ = runs
    out = tmp_path / "r.json"
    proc = run_cli(
        "eval", str(fused), "--data", str(manifest), "--task", "retrieval", "--rerank", "itm",
        "--rerank-k", str(K), "--ties", "index", "--json", str(out), "--report", str(tmp_path / "rep"), "-q",
    )  # fmt: skip
    res = json.loads(out.read_text())["retrieval"]
    plain, rer, n_pairs = brute_retrieval(*loaded, itm, None, K)
    assert_same(res, plain)  # the plain ITC numbers stay where the contract puts them
    r = res["rerank"]
    assert r["score"] == "itm" and r["k"] == K and r["fusion_pairs"] == n_pairs
    assert_same(r, rer)
    assert r["RSUM"] == pytest.approx(sum(rer[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)))
    assert r["seconds"] >= 0 and r["ms_per_query"] >= 0
    assert rer != plain  # the ITM head does move something here, so the comparison means something
    assert "rerank.t2i.R@1" in proc.stdout  # the printed table
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "retrieval.rerank.t2i.R@1" in page and f"re-ranked by itm (top {K})" in page


def test_rerank_respects_label_positives_and_batches_like_single_pairs(loaded, itm):
    from xmodal.eval import evaluate
    from xmodal.eval.rerank import PairCache

    enc, ds = loaded
    res = evaluate(enc, ds, "retrieval", positives="label", ties="index", rerank="itm", rerank_k=K)
    _, rer, _ = brute_retrieval(enc, ds, itm, "label", K)
    assert_same(res["retrieval"]["rerank"], rer)
    # the batched fusion passes (padded states, indexed once) agree with one pair per pass
    caps = [ds.captions[i][0] for i in range(6)] + ["a blue square"] * 3
    imgs = [0, 1, 2, 3, 4, 5, 0, 7, 0]
    pc = PairCache(enc, ds.images, caps, batch_size=4)
    got = pc.score(pc.text_rows(caps), torch.tensor(imgs))
    assert pc.n_pairs == 8  # ("a blue square", 0) twice: one pass
    assert got.tolist() == pytest.approx([itm(t, i) for t, i in zip(caps, imgs, strict=True)], abs=1e-4)


def test_rerank_k_beyond_the_gallery_reranks_everything(loaded, itm):
    from xmodal.eval import evaluate

    enc, ds = loaded
    full = evaluate(enc, ds, "retrieval", ties="index", rerank="itm", rerank_k=1000)["retrieval"]["rerank"]
    _, rer, _ = brute_retrieval(enc, ds, itm, None, 1000)
    assert_same(full, rer)
    one = evaluate(enc, ds, "retrieval", ties="index", rerank="itm", rerank_k=1)["retrieval"]
    for d in ("t2i", "i2t"):  # k = 1 re-ranks nothing
        assert one["rerank"][d] == one[d]


def test_probe_score_itm_equals_hand_loop(runs, tmp_path):
    from xmodal.data import load_dataset
    from xmodal.models import load_encoder

    _, probe, fused, _ = runs
    out = tmp_path / "p.json"
    cli("eval", fused, "--data", probe, "--task", "probe", "--score", "itm", "--json", out, "-q")
    res = json.loads(out.read_text())["probe"]
    enc = load_encoder(fused, device="cpu")
    ds = load_dataset(str(probe), enc.image_size, progress=False)
    itm = pair_itm(enc, ds)
    wins: dict[str, list[bool]] = {"attribute": [], "object": []}
    for i, ex in enumerate(ds.extras):
        true = itm(ds.captions[i][0], i)
        for n in ex["negatives"]:
            wins[n["type"]].append(true > itm(n["caption"], i))  # one negative per type: pair = image
    assert res["score"] == "itm" and set(res["by_type"]) == set(wins)
    for typ, w in wins.items():
        assert res["by_type"][typ]["accuracy"] == pytest.approx(sum(w) / len(w))
        assert res["by_type"][typ]["pair_accuracy"] == pytest.approx(sum(w) / len(w))
    both = [a and o for a, o in zip(wins["attribute"], wins["object"], strict=True)]
    assert res["accuracy"] == pytest.approx(sum(both) / len(both))
    cos = cli("eval", fused, "--data", probe, "--task", "probe", "--json", out, "-q")
    assert cos.returncode == 0 and json.loads(out.read_text())["probe"]["score"] == "cosine"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--rerank", "bm25"], "--rerank bm25"),
        (["--rerank", "itm", "--rerank-k", "0"], "--rerank-k 0"),
        (["--task", "zeroshot", "--rerank", "itm"], "--rerank itm"),
        (["--task", "probe", "--score", "clip"], "--score clip"),
        (["--task", "retrieval", "--score", "itm"], "--score itm"),
    ],
)
def test_bad_rerank_and_score_flags_are_one_line_errors(runs, flags, needle):
    manifest, _, fused, _ = runs
    assert_one_line_error(cli("eval", fused, "--data", manifest, *flags, check=False), needle)


def test_rerank_without_fusion_head_names_flag_and_fix(runs):
    manifest, probe, _, plain = runs
    p = cli("eval", plain, "--data", manifest, "--rerank", "itm", check=False)
    assert_one_line_error(p, "--rerank itm")
    assert "--objective clip+itm" in p.stderr and "fusion" in p.stderr
    p = cli("eval", plain, "--data", probe, "--task", "probe", "--score", "itm", check=False)
    assert_one_line_error(p, "--score itm")
    assert "--objective clip+itm" in p.stderr


def test_rerank_ranks_candidates_first_and_keeps_ties_exact():
    from xmodal.eval.rerank import reranked_scores

    itc = torch.tensor([[0.9, 0.5, 0.5, 0.1, 0.7]])
    cand = torch.tensor([[0, 4]])
    r = reranked_scores(itc, cand, torch.tensor([[-3.0, 2.0]]))
    order = torch.sort(r, descending=True, stable=True)[1][0].tolist()
    assert order == [4, 0, 1, 2, 3] and r[0, 1] == r[0, 2]  # equal ITC scores stay equal
    r = reranked_scores(itc, cand, torch.tensor([[1.5, 1.5]]))
    assert r[0, 0] == r[0, 4] > r[0, 1]  # equal ITM scores too: the tie rule decides, as for ITC
