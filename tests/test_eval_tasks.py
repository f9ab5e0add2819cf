"""Tasks on controlled embeddings (a fake encoder that maps images/strings to given vectors), the shared
embedding cache, option/flag errors, and the robustness perturbations / PGD on a real xm-micro model."""

import random
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import UserError
from xmodal.eval import EmbeddingCache, evaluate
from xmodal.eval.robustness import blur, gaussian_noise, insert_attributes, jpeg, pgd_attack, typo


class FakeEncoder:
    """images are given directly as N×D float 'embeddings'; texts map through a dict (unknown → hashed)."""

    name = "fake"
    device = torch.device("cpu")

    def __init__(self, text_vecs: dict[str, list[float]], dim: int = 2):
        self.text_vecs = text_vecs
        self.dim = dim
        self.image_calls = 0
        self.texts_seen: list[str] = []

    def encode_images(self, images, batch_size=256):
        self.image_calls += 1
        return F.normalize(images.float(), dim=-1)

    def encode_texts(self, texts, batch_size=256):
        self.texts_seen.extend(texts)
        out = []
        for s in texts:
            if s in self.text_vecs:
                out.append(torch.tensor(self.text_vecs[s], dtype=torch.float32))
            else:
                g = torch.Generator().manual_seed(zlib.crc32(s.encode()))
                out.append(torch.randn(self.dim, generator=g))
        return F.normalize(torch.stack(out), dim=-1)


def fake_data(images, captions, labels=None, extras=None):
    n = len(images)
    return types.SimpleNamespace(
        images=torch.tensor(images, dtype=torch.float32),
        captions=captions,
        labels=labels if labels is not None else [None] * n,
        extras=extras or [{} for _ in range(n)],
        source="fake",
    )


def test_zeroshot_hand_computed():
    enc = FakeEncoder({"cat": [1, 0], "dog": [0, 1]})
    data = fake_data([[1, 0], [0.6, 0.8], [0, 1]], [["x"], ["y"], ["z"]], labels=["cat", "cat", "dog"])
    r = evaluate(enc, data, "zeroshot", templates=["{}"])["zeroshot"]
    assert r["top1"] == pytest.approx(2 / 3)
    assert r["mean_per_class_recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert r["top5"] is None and r["n_classes"] == 2  # top-5 undefined under 5 classes (as CLIP_benchmark)


def test_zeroshot_class_embedding_is_mean_of_normalised_templates():
    # "{}" → e1 = [1, 0]; "a {}" → e2 = [0, 1] for class "a"; class "b" = [-1, 0] both.
    # class a = normalise([0.5, 0.5]); an image at [0.6, 0.8] is closer to class a than b; with only the
    # first template it would still be a, so use an image where the ensemble decides: [-0.1, 1].
    enc = FakeEncoder({"a": [1, 0], "x a": [0, 1], "b": [-1, 0], "x b": [-1, 0]})
    data = fake_data([[-0.1, 1.0], [-1, 0]], [["p"], ["q"]], labels=["a", "b"])
    assert evaluate(enc, data, "zeroshot", templates=["{}", "x {}"])["zeroshot"]["top1"] == 1.0
    assert evaluate(enc, data, "zeroshot", templates=["{}"])["zeroshot"]["top1"] == 0.5


def test_probe_hand_computed():
    enc = FakeEncoder(
        {
            "true0": [0.8, 0.6],
            "attr0": [0.6, 0.8],
            "obj0": [1, 0],
            "rel0": [0.8, 0.6],
            "true1": [0, 1],
            "attr1": [1, 0],
        }
    )
    extras = [
        {
            "negatives": [
                {"caption": "attr0", "type": "attribute"},
                {"caption": "obj0", "type": "object"},
                {"caption": "rel0", "type": "relation"},
            ]
        },
        {"negatives": [{"caption": "attr1", "type": "attribute"}]},
        {},
    ]
    data = fake_data([[1, 0], [0, 1], [1, 1]], [["true0", "other"], ["true1"], ["zzz"]], extras=extras)
    r = evaluate(enc, data, "probe")["probe"]
    assert r["by_type"]["attribute"]["accuracy"] == 1.0
    assert r["by_type"]["object"]["accuracy"] == 0.0  # the negative scores higher
    assert r["by_type"]["relation"]["accuracy"] == 0.0  # a tie counts as a failure
    assert r["accuracy"] == 0.5  # image 0 fails a type, image 1 passes all
    assert r["pair_accuracy"] == 0.5 and r["n_pairs"] == 4 and r["n_images"] == 2
    assert list(r["by_type"]) == ["attribute", "relation", "object"]


def test_gap_task_matches_metrics_and_separability():
    enc = FakeEncoder({f"t{i}": [1.0, 0.02 * i - 0.5, 0.0] for i in range(30)}, dim=3)
    imgs = [[-1.0, 0.02 * i - 0.5, 0.1] for i in range(30)]
    data = fake_data(imgs, [[f"t{i}"] for i in range(30)])
    r = evaluate(enc, data, "gap")["gap"]
    x = F.normalize(torch.tensor(imgs), dim=-1).double()
    y = F.normalize(torch.tensor([enc.text_vecs[f"t{i}"] for i in range(30)]), dim=-1).double()
    assert r["gap"] == pytest.approx(float((x.mean(0) - y.mean(0)).norm()), rel=1e-6)
    assert r["alignment"] == pytest.approx(float(((x - y) ** 2).sum(1).mean()), rel=1e-6)
    assert r["linear_separability"] == 1.0  # the modalities sit on opposite sides of x = 0


def test_embeddings_computed_once_and_shared():
    enc = FakeEncoder({})
    caps = [["a", "b"], ["a"], ["c", "b", "d"]]
    data = fake_data(
        [[1, 0], [0, 1], [1, 1]],
        caps,
        labels=["x", "y", "x"],
        extras=[{"negatives": [{"caption": "n", "type": "object"}]}, {}, {}],
    )
    cache = EmbeddingCache(enc, data)
    evaluate(
        enc, data, ["retrieval", "zeroshot", "probe", "hubness", "gap"], templates=["{}", "a {}"], cache=cache
    )
    assert enc.image_calls == 1 and cache.n_image_passes == 1
    assert len(enc.texts_seen) == len(set(enc.texts_seen))  # every distinct string encoded once
    assert {"a", "b", "c", "d", "n", "x", "y", "a x", "a y"} == set(enc.texts_seen)


def test_unknown_task_and_unavailable_tasks():
    enc = FakeEncoder({"a": [1, 0], "b": [0, 1]})
    data = fake_data([[1, 0], [0, 1]], [["a"], ["b"]])
    with pytest.raises(UserError, match="--task foo: unknown task"):
        evaluate(enc, data, "retrieval,foo")
    with pytest.raises(UserError, match="--task zeroshot: .*no labels"):
        evaluate(enc, data, "zeroshot")
    with pytest.raises(UserError, match="--task probe: .*negatives"):
        evaluate(enc, data, ["probe"])
    r = evaluate(enc, data, "all", pgd_images=0)  # under "all" they are skipped with a note
    assert "skipped" in r["zeroshot"] and "skipped" in r["probe"]
    assert r["retrieval"]["t2i"]["R@1"] == 1.0
    r = evaluate(enc, data)  # the default tasks (the trainer's call) skip zero-shot too
    assert "skipped" in r["zeroshot"]
    with pytest.raises(UserError, match="--positives"):
        evaluate(enc, data, "retrieval", positives="bogus")
    with pytest.raises(UserError, match="--templates"):
        evaluate(enc, data, "retrieval", templates=["no placeholder"])
    with pytest.raises(TypeError):
        evaluate(enc, data, "retrieval", not_an_option=1)


def test_retrieval_json_shape_and_rsum():
    enc = FakeEncoder({"a": [1, 0], "b": [0, 1], "c": [0.9, 0.1]})
    data = fake_data([[1, 0], [0, 1]], [["a", "c"], ["b"]])
    r = evaluate(enc, data, "retrieval")["retrieval"]
    for d in ("t2i", "i2t"):
        assert {"R@1", "R@5", "R@10", "median_rank", "MRR", "mAP@10"} <= set(r[d])
    assert r["RSUM"] == pytest.approx(sum(r[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)))
    assert r["t2i"]["R@1"] == 1.0 and r["i2t"]["R@1"] == 1.0


# -- robustness ---------------------------------------------------------------------------------------
def test_text_perturbations_seeded_and_changing():
    a = [typo("a red circle on white", random.Random(0)) for _ in range(3)]
    assert a[0] == a[1] == a[2] and a[0] != "a red circle on white"
    assert typo("a red circle", random.Random(1), rate=0.0) != "a red circle"  # at least one edit
    s = insert_attributes("a red circle", random.Random(0), 2)
    assert len(s.split()) == 5 and s.split()[0] == "a"


def test_image_perturbations_shapes_and_effect():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    for y in (gaussian_noise(x, 0.1, 0), blur(x, 1.0), jpeg(x, 20)):
        assert y.shape == x.shape and y.dtype == torch.uint8
        assert (y.float() - x.float()).abs().mean() > 1
    assert torch.equal(gaussian_noise(x, 0.1, 5), gaussian_noise(x, 0.1, 5))
    assert torch.equal(blur(x, 0.0), x)


def test_pgd_respects_budget_and_raises_loss():
    from xmodal.models import load_encoder

    torch.manual_seed(0)
    enc = load_encoder("xm-micro", device="cpu")
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    texts = enc.encode_texts([f"caption number {i}" for i in range(6)])
    pos = torch.eye(6, dtype=torch.bool)
    eps = 8 / 255
    adv = pgd_attack(enc, imgs, texts, pos, eps=eps, steps=5, step_size=2 / 255, seed=0)
    x0 = imgs.float() / 255
    assert (adv - x0).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1

    def loss(x):
        with torch.no_grad():
            logits = enc.logit_scale * enc.embed_pixels(x) @ texts.T
        return F.cross_entropy(logits, torch.arange(6)).item()

    assert loss(adv) > loss(x0)
    same = pgd_attack(enc, imgs, texts, pos, eps=0.0, steps=3, step_size=1 / 255, seed=0)
    assert torch.allclose(same, x0)


def test_image_without_captions_is_no_i2t_query():
    enc = FakeEncoder({"a": [1, 0], "b": [0.9, 0.1]})
    data = fake_data([[1, 0], [0, 1]], [["a", "b"], []])
    r = evaluate(enc, data, "retrieval")["retrieval"]
    assert r["n_queries"] == {"t2i": 2, "i2t": 1}
    assert r["i2t"]["R@1"] == 1.0 and r["t2i"]["R@1"] == 1.0
