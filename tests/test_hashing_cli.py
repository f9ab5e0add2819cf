"""`xmodal hash train` through the ordinary trainer (frozen towers, resume), and `--init-from`."""

import json

import pytest
import torch

from tests.conftest import run_in_process, write_tiny_manifest
from xmodal.models import load_encoder
from xmodal.train.config import TrainConfig
from xmodal.train.trainer import Trainer

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "8", "--lr", "3e-3", "--warmup", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hash")
    data = write_tiny_manifest(root / "tiny")
    run = root / "base"
    # long enough that the images' embeddings are no longer nearly one point (codes need differences)
    run_in_process("train", "--data", data, "--out", run, "--model", "xm-micro", "--steps", "60", *FAST)
    return data, run


def weights(run):
    return torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["model"]


def test_hash_train_keeps_the_towers_and_gives_balanced_pm1_codes(base, tmp_path):
    data, run = base
    out = tmp_path / "h"
    # γ = 0.1: with in-batch pairs only (batch 8 here), DCMH's γ = 1 lets the quantisation term saturate the
    # tanh before the pairwise term has separated the bits (docs: scale γ with the batch)
    hashing = ["--objective", "dcmh(gamma=0.1)", "--bits", "16", "--data", data, "--out", out, *FAST]
    run_in_process("hash", "train", run, *hashing, "--steps", "100", "--log-every", "1")
    before, after = weights(run), weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: not a bit changed
    assert any(k.startswith("hash_heads.") for k in after)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"losses"' in x]
    assert set(rows[-1]["losses"]) == {"dcmh", "dcmh_quant", "dcmh_balance"}
    enc = load_encoder(out)
    from xmodal.data import load_dataset

    ds = load_dataset(str(data), enc.image_size, progress=False)
    with torch.no_grad():
        codes = enc.model.hash_heads.codes(enc.encode_images(ds.images), "image")
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert codes.mean(0).abs().mean() < 0.35  # balanced within tolerance: mean |bit mean| (0 = perfect)
    # resume continues the same run
    run_in_process("hash", "train", run, *hashing, "--steps", "102", "--log-every", "1", "--resume")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-2:] == [101, 102]


def test_recurrent_heads_train_bebr_and_unfreeze_moves_the_towers(base, tmp_path):
    data, run = base
    common = ["--data", data, "--steps", "3", *FAST]
    out = tmp_path / "r"
    run_in_process(
        "hash", "train", run, "--bits", "8", "--head", "recurrent", "--code-steps", "2", "--out", out, *common
    )
    assert json.loads((out / "hash_model.json").read_text())["hash_heads"]["steps"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"losses"' in x]
    assert "bebr" in rows[-1]["losses"]
    # bebr regresses detached embeddings (it never moves the towers); dcmh's gradient reaches them
    free = tmp_path / "u"
    run_in_process("hash", "train", run, "--bits", "8", "--unfreeze", "--out", free, *common)
    before, after = weights(run), weights(free)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


def test_init_from_loads_the_runs_weights_and_refuses_another_model(base, tmp_path):
    data, run = base
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "i"),
        model="xm-micro",
        init_from=str(run),
        steps=1,
        batch_size=8,
        precision="fp32",
        progress=False,
    )
    tr = Trainer(cfg)
    own = tr.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in weights(run).items())
    p = run_in_process(
        "train",
        "--data",
        data,
        "--out",
        tmp_path / "j",
        "--model",
        "xm-tiny",
        "--init-from",
        run,
        "--steps",
        "1",
        *FAST,
        check=False,
    )
    assert p.returncode == 2 and "--init-from" in p.stderr and "do not fit" in p.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--bits", "12"], "--bits"),
        (["--head", "tree"], "--kind"),
        (["--head", "linear", "--code-steps", "2"], "--steps"),
    ],
)
def test_bad_hash_options_are_one_line_errors(base, tmp_path, args, needle):
    data, run = base
    p = run_in_process(
        "hash",
        "train",
        run,
        *args,
        "--data",
        data,
        "--out",
        tmp_path / "x",
        "--steps",
        "1",
        *FAST,
        check=False,
    )
    assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_learned_binary_index_searches_by_the_heads_codes(base, tmp_path):
    """`index build HASHRUN --kind learned-binary`: gallery codes from the image head, text queries coded by
    the text head, Hamming distances as a brute force over the heads' codes; survives save/open and add."""
    import numpy as np

    from xmodal.index import open_index
    from xmodal.index.binary import hamming

    data, run = base
    hrun = tmp_path / "h"
    run_in_process(
        "hash",
        "train",
        run,
        "--objective",
        "dcmh(gamma=0.1)",
        "--bits",
        "16",
        "--data",
        data,
        "--out",
        hrun,
        "--steps",
        "30",
        *FAST,
    )
    out = tmp_path / "idx"
    run_in_process(
        "index",
        "build",
        hrun,
        "--data",
        data,
        "--out",
        out,
        "--kind",
        "learned-binary",
        "--rerank",
        "0",
        "--no-progress",
    )
    idx = open_index(out)
    assert idx.kind == "learned-binary" and idx.info["params"]["bits"] == 16
    heads = idx.encoder.model.hash_heads
    q = idx.embed_text(["a red circle"])
    with torch.no_grad():
        gal = heads.pack(heads.codes(torch.from_numpy(np.asarray(idx.gallery)), "image"))
        qc = heads.pack(heads.codes(torch.from_numpy(q), "text"))
    want = np.sort(hamming(qc, gal)[0])[:5]
    scores, rows = idx.search_rows(q, k=5, modality="text")
    got = np.rint((1 - scores[0]) * 16 / 2).astype(int)  # score = 1 − 2·d/bits
    assert got.tolist() == want.tolist()
    assert (hamming(qc, gal)[0][rows[0]] == want).all()
    # with re-ranking (the default), the float vectors order the Hamming candidates exactly
    run_in_process(
        "index",
        "build",
        hrun,
        "--data",
        data,
        "--out",
        tmp_path / "idx2",
        "--kind",
        "learned-binary",
        "--no-progress",
    )
    idx2 = open_index(tmp_path / "idx2")
    s2, r2 = idx2.search_rows(q, k=3, modality="text")
    exact = np.sort(np.asarray(idx2.gallery) @ q[0])[::-1][:3]
    assert np.allclose(s2[0], exact, atol=1e-5)


def test_eval_task_hashing_scores_learned_codes_beside_itq_and_lsh(base, tmp_path):
    import numpy as np

    from xmodal.data import load_dataset
    from xmodal.eval.hashing import hashing_metrics

    data, run = base
    hrun = tmp_path / "h"
    run_in_process(
        "hash", "train", run, "--bits", "16", "--data", data, "--out", hrun, "--steps", "10", *FAST
    )
    out = tmp_path / "ev.json"
    run_in_process(
        "eval",
        hrun,
        "--data",
        data,
        "--task",
        "hashing",
        "--hash-bits",
        "16,32",
        "--hash-k",
        "20",
        "--json",
        out,
        "--report",
        tmp_path / "rep",
    )
    res = json.loads(out.read_text())["hashing"]
    # the report: one precision–recall PNG per direction, also inlined in the hashing section
    from PIL import Image

    page = (tmp_path / "rep" / "index.html").read_text()
    section = page.split("<h2>hashing</h2>", 1)[1].split("<h2>", 1)[0]
    for d in ("t2i", "i2t"):
        png = tmp_path / "rep" / f"hashing_pr_{d}.png"
        with Image.open(png) as im:
            assert im.format == "PNG"
            im.verify()
        assert f'alt="hashing_pr_{d}.png"' in section and 'src="data:image/png;base64,' in section
    assert set(res["methods"]) == {"learned", "itq-16", "itq-32", "lsh-16", "lsh-32"}
    assert res["methods"]["learned"]["bytes_per_item"] == 2 and res["float_bytes_per_item"] == 32 * 4
    # the learned row is the metric of the heads' own codes, text queries against the image gallery
    enc = load_encoder(hrun)
    ds = load_dataset(str(data), enc.image_size, progress=False)
    heads = enc.model.hash_heads
    caps = [c for cs in ds.captions for c in cs]
    owner = [i for i, cs in enumerate(ds.captions) for _ in cs]
    with torch.no_grad():
        ic = heads.codes(enc.encode_images(ds.images), "image").numpy()
        tc = heads.codes(enc.encode_texts(caps), "text").numpy()
    want = hashing_metrics(tc, ic, [ds.labels[i] for i in owner], ds.labels, (20,))["mAP@20"]
    assert abs(res["methods"]["learned"]["t2i"]["mAP@20"] - want) < 1e-9
    assert all(0 <= m["t2i"]["mAP@20"] <= 1 for m in res["methods"].values())
    assert np.isfinite(res["methods"]["itq-32"]["i2t"]["P@H<=2"])
