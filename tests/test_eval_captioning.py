"""`--task captioning`: the COCO caption metrics against pycocoevalcap run directly, the pure-Python PTB
tokenizer against Java's, BLEU-1 by hand, the nearest-train-caption baseline, and the eval CLI on the
tiny CoCa run (JSON section, HTML gallery, errors). METEOR's Java process takes ~10 s to start, so only
the first test starts it (a process-wide singleton); the CLI tests hide Java and take the no-Java path."""

import html
import json
import math
import re
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_one_line_error, run_in_process, write_tiny_manifest
from xmodal.errors import UserError
from xmodal.eval import captioning
from xmodal.eval.captioning import caption_metrics, nearest_caption_baseline, ptb_tokenize_line

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not on PATH: pycocoevalcap's PTBTokenizer/METEOR")

# hand-written predictions and references: case, punctuation, clitics, several references per image
PREDICTIONS = {
    1: "A man riding a wave on top of a surfboard.",
    2: "A cat sitting on a red couch!",
    7: "two dogs playing in the snow",
    "x": "The kitchen has a stove, a sink and a fridge.",
}
REFERENCES = {
    1: [
        "A surfer rides a large wave.",
        "A man on a surfboard riding a wave",
        "Someone's surfing (in the sea).",
    ],
    2: ["A cat lies on a couch.", "The orange cat isn't moving; it's asleep on the sofa."],
    7: ["Two dogs play in the snow.", "A pair of dogs running through snow", "dogs in snow"],
    "x": ["A kitchen with a stove, a sink, and a refrigerator.", "A small kitchen -- white cabinets."],
}

# captions with punctuation; the expected strings are what pycocoevalcap's PTBTokenizer (Java) returns
KNOWN = {
    "A man's dog (brown) is running... on grass!": "a man 's dog -lrb- brown -rrb- is running on grass",
    "Two \"cats\" sit on a grey sofa; it's 3.5 ft. long, isn't it?": (
        "two cats sit on a grey sofa it 's 3.5 ft. long is n't it"
    ),
    "He can't, won't & shouldn't: I'm sure they're here.": (
        "he ca n't wo n't & should n't i 'm sure they 're here"
    ),
    "A 1,000-year-old building -- 50% off $5 [sale] and/or 2*3.": (
        "a 1,000-year-old building 50 % off $ 5 -lsb- sale -rsb- and/or 2 * 3"
    ),
    "The cats' toys are gonna be in the U.S. at 5 p.m. cannot wait": (
        "the cats toys are gon na be in the u.s. at 5 p.m. can not wait"
    ),
    "Mr. Smith’s “curly” hair — at 12:30pm…": "mr. smith 's curly hair at 12:30 pm",
    "Is this a bird?! OK!!! no.. yes . . .": "is this a bird ?! ok !!! no yes",
    "A bathroom with a toilet,sink and shower :)": "a bathroom with a toilet sink and shower :-rrb-",
}
MORE = [
    "A bus that is driving down the street .",
    "A woman's hand holding a cell-phone.",
    "a plate with a sandwich (cut in half) and chips",
    'The dog is "happy" to see its owner\'s kids.',
    "A sign reads: 'No Parking'.",
    "a 6'2\" man in a B&W photo, 10x10 room w/ 2x4's",
    "O'Neill's bar; ma'am, it's 3 o'clock y'all",
    "A BLACK CAT ON A RED CHAIR.",
    "e.g. the '90s, rock'n'roll, 'em, 'tis -- etc.",
    "a {weird} caption---with dashes – and — more",
]


def hide_java(monkeypatch):
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real(cmd, *a, **k))


def direct_pycocoevalcap(predictions, references, meteor=True):
    """COCOEvalCap.evaluate's steps, called on pycocoevalcap itself."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": predictions[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n}": b for n, b in enumerate(bleu, 1)}
    if meteor:  # Meteor() is the same pycocoevalcap class; its ~10 s Java start is shared with ours
        out["METEOR"] = captioning.meteor_scorer().compute_score(gts, res)[0]
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@needs_java
def test_caption_metrics_equal_pycocoevalcap_direct():
    ours = caption_metrics(PREDICTIONS, REFERENCES)
    ref = direct_pycocoevalcap(PREDICTIONS, REFERENCES)
    assert set(ref) == set(captioning.METRICS)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    assert ours["n_images"] == 4 and ours["n_references"] == 10
    assert ours["tokenizer"] == captioning.TOKENIZER_JAVA and ours["notes"] == []
    assert 0 < ours["METEOR"] < 1 and 0 < ours["BLEU-1"] <= 1 and ours["CIDEr"] > 0
    # all references count: scoring against the first reference only gives other numbers
    first = caption_metrics(PREDICTIONS, {k: v[:1] for k, v in REFERENCES.items()})
    assert first["CIDEr"] != ours["CIDEr"] and first["BLEU-1"] != ours["BLEU-1"]


@needs_java
def test_python_tokenizer_equals_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    lines = list(KNOWN) + MORE
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(lines)})
    assert [ptb_tokenize_line(c) for c in lines] == [java[i][0] for i in range(len(lines))]
    assert [java[i][0] for i in range(len(KNOWN))] == list(KNOWN.values())  # the table below is Java's


@pytest.mark.parametrize("caption, tokens", list(KNOWN.items()))
def test_python_tokenizer_known_outputs(caption, tokens):
    assert ptb_tokenize_line(caption) == tokens


def test_no_java_meteor_null_with_note_same_other_metrics(monkeypatch):
    expected = direct_pycocoevalcap(PREDICTIONS, REFERENCES, meteor=False) if HAS_JAVA else None
    hide_java(monkeypatch)
    r = caption_metrics(PREDICTIONS, REFERENCES)
    assert r["METEOR"] is None and r["tokenizer"] == captioning.TOKENIZER_PYTHON
    assert any("java not found" in n and "METEOR" in n for n in r["notes"])
    assert any("java not found" in n and "tokenis" in n for n in r["notes"])
    if expected is not None:  # the pure-Python tokens are Java's here, so every other number is too
        for k, v in expected.items():
            assert r[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_bleu1_by_hand(monkeypatch):
    """Corpus BLEU-1 = clipped unigram matches / predicted unigrams × brevity penalty, where the reference
    length is, per image, the reference length closest to the prediction's, summed over images."""
    hide_java(monkeypatch)  # plain lower-case words: both tokenizers give these tokens
    preds = {"a": "a dog on the grass", "b": "the the the dog"}
    refs = {"a": ["a dog is on the grass", "the dog sits"], "b": ["the dog", "a dog and a cat"]}
    # a: 5 of 5 unigrams match; closest reference length 6 (|6-5| < |3-5|)
    # b: "the" clipped to 1 (at most once in any reference) + "dog" = 2 of 4; closest length 5 (|5-4| < |2-4|)
    correct, guessed, ref_len = 5 + 2, 5 + 4, 6 + 5
    by_hand = correct / guessed * math.exp(1 - ref_len / guessed)
    assert by_hand == pytest.approx(0.6228, abs=1e-4)
    assert caption_metrics(preds, refs)["BLEU-1"] == pytest.approx(by_hand, rel=1e-6)
    perfect = caption_metrics({"a": "a dog on the grass"}, {"a": ["A dog on the grass."]})
    assert perfect["BLEU-1"] == pytest.approx(1.0, rel=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)


def test_caption_metrics_errors():
    with pytest.raises(UserError, match="no predictions"):
        caption_metrics({}, {})
    with pytest.raises(UserError, match="image 3 has no reference"):
        caption_metrics({3: "a dog"}, {3: ["  "]})


class FakeEncoder:
    """Images are their own embeddings; texts map through a dict. Counts what it was asked to encode."""

    name = "fake"
    device = torch.device("cpu")

    def __init__(self, vecs):
        self.vecs, self.texts_seen = vecs, []

    def encode_images(self, images, batch_size=256):
        return F.normalize(images.float(), dim=-1)

    def encode_texts(self, texts, batch_size=256):
        self.texts_seen += list(texts)
        return F.normalize(torch.tensor([self.vecs[t] for t in texts], dtype=torch.float32), dim=-1)


def test_nearest_caption_baseline_hand_checked():
    enc = FakeEncoder({"east": [1, 0], "north": [0, 1], "north-east": [1, 1], "west": [-1, 0]})
    images = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.1], [-1.0, -0.2]])
    train = ["east", "north", "east", "north-east", "west", "north"]
    assert nearest_caption_baseline(enc, train, images) == ["east", "north", "north-east", "west"]
    assert enc.texts_seen == ["east", "north", "north-east", "west"]  # each distinct caption once


def test_evaluate_captioning_needs_a_decoder():
    from xmodal.eval import TASKS, evaluate
    from xmodal.eval.suite import captioning_requests

    enc = FakeEncoder({"a": [1, 0], "b": [0, 1]})
    data = types.SimpleNamespace(
        images=torch.eye(2), captions=[["a"], ["b"]], labels=[None, None], extras=[{}, {}], source="fake"
    )
    with pytest.raises(UserError, match="--task captioning: the model has no caption decoder"):
        evaluate(enc, data, "retrieval,captioning")  # named: an error, never a silent skip
    # "all" means every task the model can do (test_eval_cli runs the whole of it on xm-micro)
    assert captioning_requests(enc, list(TASKS), True, None) == [t for t in TASKS if t != "captioning"]
    with pytest.raises(UserError, match="--task captioning: the model has no caption decoder"):
        captioning_requests(enc, list(TASKS), True, __file__)  # unless --caption-baseline asks for it
    with pytest.raises(UserError, match="--caption-baseline needs the captioning task"):
        evaluate(enc, data, "retrieval", caption_baseline=__file__)


def test_cli_eval_captioning_json_and_gallery(coca_run, tmp_path, monkeypatch):
    hide_java(monkeypatch)  # the no-Java path end to end (and no 10 s METEOR start)
    test = write_tiny_manifest(tmp_path / "test", n=6, seed=5)
    train = write_tiny_manifest(tmp_path / "train", n=5, seed=9)
    out, rep = tmp_path / "out.json", tmp_path / "rep"
    run_in_process("eval", coca_run, "--data", test, "--task", "captioning", "--json", out, "--report", rep,
                   "--max-len", "12", "--caption-baseline", train, "--device", "cpu", "-q")  # fmt: skip
    res = json.loads(out.read_text())
    cap = res["captioning"]
    assert set(captioning.METRICS) <= set(cap) and cap["METEOR"] is None
    assert all(isinstance(cap[m], float) for m in captioning.METRICS if m != "METEOR")
    assert cap["n_images"] == 6 and cap["n_references"] == 12
    assert cap["decoding"] == {
        "method": "greedy",
        "beam": 1,
        "max_len": 12,
        "min_len": 5,
        "length_penalty": 1.0,
    }
    assert any("java not found" in n for n in cap["notes"])
    base = cap["baseline_nearest_train_caption"]
    assert set(captioning.METRICS) <= set(base) and base["n_images"] == 6
    assert res["meta"]["tasks"] == ["captioning"]
    page = (rep / "index.html").read_text()
    assert "Captioning gallery (first 6 images)" in page
    cards = re.findall(r"<div class=ccard>(.*?)</ul></div>", page)
    assert len(cards) == 6 and all("data:image/png;base64," in c for c in cards)
    test_caps = [json.loads(line)["caption"] for line in test.read_text().splitlines()]
    train_caps = {c for line in train.read_text().splitlines() for c in json.loads(line)["caption"]}
    for card, refs in zip(cards, test_caps, strict=True):
        assert all(f"<li>{html.escape(r)}</li>" in card for r in refs)  # every reference, in order
        near = re.search(r"nearest train caption: (.*?)</div>", card).group(1)
        assert html.unescape(near) in train_caps
        assert re.search(r"<div class=gen>(.*?)</div>", card)  # the generated caption
    assert "nearest train caption" in page and "CIDEr" in page


def test_cli_captioning_on_a_clip_model_is_one_line_error(tmp_path):
    from xmodal.models import load_encoder

    weights = tmp_path / "micro.pt"
    torch.save(load_encoder("xm-micro", device="cpu").model.state_dict(), weights)
    m = write_tiny_manifest(tmp_path / "d", n=3)
    p = run_in_process("eval", "xm-micro", "--pretrained", weights, "--data", m,
                       "--task", "retrieval,captioning", check=False)  # fmt: skip
    assert_one_line_error(p, "--task captioning: the model has no caption decoder")
    p = run_in_process("eval", "xm-micro", "--pretrained", weights, "--data", m, "--task", "retrieval",
                       "--caption-baseline", m, check=False)  # fmt: skip
    assert_one_line_error(p, "--caption-baseline needs the captioning task")
