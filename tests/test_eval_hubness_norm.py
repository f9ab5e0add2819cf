"""`xmodal eval --hubness-norm`: retrieval on QB-Norm-corrected scores, against a numpy brute force."""

import json

import numpy as np

from tests.conftest import run_cli, write_tiny_manifest
from xmodal.data import load_dataset
from xmodal.eval import evaluate
from xmodal.models import load_encoder


def test_qbnorm_corrected_recall_equals_brute_force(tmp_path):
    test = write_tiny_manifest(tmp_path / "test", n=24, seed=1)
    bank = write_tiny_manifest(tmp_path / "bank", n=30, seed=2)
    enc = load_encoder("xm-micro")
    data = load_dataset(test, enc.image_size, progress=False)
    res = evaluate(
        enc, data, ("retrieval",), hubness_norm="qbnorm", hubness_bank=str(bank), hubness_beta=10.0
    )
    corr = res["retrieval"]["corrected"]
    assert corr["method"] == "qbnorm"

    # brute force: inverted softmax over the query bank, per gallery column
    caps = [c for cs in data.captions for c in cs]
    owner = [i for i, cs in enumerate(data.captions) for _ in cs]
    q = enc.encode_texts(caps).double().numpy()
    g = enc.encode_images(data.images).double().numpy()
    bdata = load_dataset(bank, enc.image_size, progress=False)
    bank_txt = enc.encode_texts(list(dict.fromkeys(c for cs in bdata.captions for c in cs))).double().numpy()
    sims = q @ g.T
    denom = np.exp(10.0 * (bank_txt @ g.T)).sum(0)
    corrected = np.exp(10.0 * sims) / denom[None, :]
    hits = [int(np.argmax(corrected[t]) == owner[t]) for t in range(len(caps))]
    assert abs(corr["t2i"]["R@1"] - np.mean(hits)) < 1e-9
    raw_hits = [int(np.argmax(sims[t]) == owner[t]) for t in range(len(caps))]
    assert abs(res["retrieval"]["t2i"]["R@1"] - np.mean(raw_hits)) < 1e-9


def test_cli_flags_and_errors(tmp_path):
    test = write_tiny_manifest(tmp_path / "test", n=12, seed=1)
    out = tmp_path / "r.json"
    run_cli(
        "eval",
        "xm-micro",
        "--data",
        str(test),
        "--task",
        "retrieval",
        "--hubness-norm",
        "dbnorm",
        "--hubness-bank",
        str(test),
        "--json",
        str(out),
        "--quiet",
    )
    r = json.loads(out.read_text())["retrieval"]
    assert r["corrected"]["method"] == "dbnorm" and "R@1" in r["corrected"]["i2t"]
    p = run_cli("eval", "xm-micro", "--data", str(test), "--hubness-norm", "qbnorm", check=False)
    assert p.returncode == 2 and "--hubness-bank" in p.stderr and "Traceback" not in p.stderr
