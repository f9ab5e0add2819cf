"""The fusion objectives (itm, mlm, mod): the hard-negative sampler's distribution, the MLM corruption's
statistics, and both losses against per-pair / per-position loops written out here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from tests.conftest import log_softmax
from xmodal.models import ModelSpec, build_model, resolve_model_config
from xmodal.models.fusion import Hidden, encode_hidden, text_hidden
from xmodal.objectives import Composite, Features
from xmodal.objectives.fusion_batch import FusionBatch
from xmodal.objectives.matching import negative_weights, sample_negatives

CAPTIONS = [
    "a red circle",
    "a blue square left of a green triangle",
    "a red circle",  # the same caption as row 0: never its negative
    "a small yellow star",
    "two purple hexagons above a circle",
    "a green square",
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    spec = ModelSpec("xm-micro")
    cfg = resolve_model_config(spec)
    cfg["fusion"] = {"width": 32, "depth": 1, "heads": 2}
    return build_model(spec, cfg).eval()


def _batch(model, step=4, captions=CAPTIONS, momentum=None):
    ids = SimpleTokenizer(context_length=16)(captions)
    pixels = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    h = encode_hidden(model, pixels, ids)
    mh = encode_hidden(momentum, pixels, ids) if momentum is not None else None
    fb = FusionBatch(model, h, seed=3, step=step, global_batch=len(ids), offset=0,
                     momentum_model=momentum, momentum_hidden=mh)  # fmt: skip
    img, txt = F.normalize(h.image, dim=-1), F.normalize(h.text, dim=-1)
    extra = {}
    if mh is not None:
        extra = {
            "momentum_image": F.normalize(mh.image, dim=-1),
            "momentum_text": F.normalize(mh.text, dim=-1),
        }
    f = Features.gather(img, txt, model.logit_scale.exp(), fusion=fb, step=step, **extra)
    return f, fb, h


def test_hard_negative_sampler_draws_from_the_masked_softmax():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(5, 5, generator=g) * 2
    same = torch.eye(5, dtype=torch.bool)
    same[0, 3] = same[3, 0] = True  # rows 0 and 3 share a caption
    n = 20000
    draws = sample_negatives(negative_weights(sim, same).repeat(n, 1), torch.Generator().manual_seed(1))
    draws = draws.view(n, 5)
    for i in range(5):
        e = [math.exp(float(sim[i, j])) for j in range(5)]
        allowed = [0.0 if same[i, j] else e[j] / sum(e) for j in range(5)]
        for j in range(5):
            p = allowed[j] / sum(allowed)
            freq = float((draws[:, i] == j).float().mean())
            assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (i, j, freq, p)
            if same[i, j]:
                assert freq == 0.0  # never a positive, never the same caption
    # every other caption identical to row 0's: its negatives are drawn uniformly from the other rows
    all_same = torch.ones(3, 3, dtype=torch.bool)
    w = negative_weights(torch.randn(3, 3), all_same)
    assert torch.equal(w, (~torch.eye(3, dtype=torch.bool)).float())


def _pair_loss(model, h, i_text, i_image, label):
    """−log softmax of the ITM head for one (caption, image) pair, one pair per fusion pass."""
    n = int(h.text_attn[i_text].sum())
    fused = model.fusion(h.text_hidden[i_text : i_text + 1, :n], h.text_attn[i_text : i_text + 1, :n],
                         h.image_hidden[i_image : i_image + 1])  # fmt: skip
    logits = model.fusion.itm_head(fused[0, 0]).tolist()
    return -log_softmax(logits)[label]


def test_itm_matches_a_per_pair_loop(model):
    f, fb, h = _batch(model)
    comp = Composite.from_config("itm")
    with torch.no_grad():
        got = comp.objectives_terms(f)["itm"].item()
        # the draws, redone from the formula with the same seeded generator
        s = (f.logit_scale * f.image @ f.text.T).double()
        same = torch.tensor([[CAPTIONS[i] == CAPTIONS[j] for j in range(6)] for i in range(6)])
        gen = fb.generator(17)
        w_i2t = torch.softmax(s, 1).masked_fill(same, 0)
        w_t2i = torch.softmax(s.T, 1).masked_fill(same, 0)
        neg_text = torch.multinomial(w_i2t.float(), 1, generator=gen).squeeze(1)
        neg_image = torch.multinomial(w_t2i.float(), 1, generator=gen).squeeze(1)
        assert not any(same[i, neg_text[i]] or same[i, neg_image[i]] for i in range(6))
        total = 0.0
        for i in range(6):
            total += _pair_loss(model, h, i, i, 1)  # the positive pair
            total += _pair_loss(model, h, i, int(neg_image[i]), 0)  # text i, a hard negative image
            total += _pair_loss(model, h, int(neg_text[i]), i, 0)  # image i, a hard negative text
    assert abs(got - total / 18) < 1e-5


def test_synthesised_negatives_replace_masked_tokens_with_wrong_predictions(model):
    f, fb, h = _batch(model)
    obj = Composite.from_config("itm(synth=true,synth_prob=0.5)").objectives[0][0]
    m = fb.masking(0.5)
    with torch.no_grad():
        ids, rows = obj.synthesised_ids(fb)
        logits = fb.masked_logits(0.5)
    assert rows.tolist() == [i for i in range(6) if m.selected[i].any()] and len(rows) > 0
    for r, i in enumerate(rows.tolist()):
        for p in range(h.text_ids.shape[1]):
            if not m.selected[i, p]:
                assert ids[r, p] == m.labels[i, p]
                continue
            k_row = int(m.selected[:i].sum() + m.selected[i, :p].sum())  # row-major order
            order = logits[k_row].argsort(descending=True).tolist()
            want = next(t for t in order if t != int(m.labels[i, p]) and t not in (0, 49406, 49407))
            assert int(ids[r, p]) == want != int(m.labels[i, p])
    # the term is then a mean over 3b pairs plus one per synthesised caption
    assert torch.isfinite(obj.terms(f)["itm"])


def _fake_hidden(ids, attn):
    return Hidden(None, None, None, None, ids, attn)


def test_mlm_masking_statistics(model):
    g = torch.Generator().manual_seed(5)
    b, n = 600, 20
    lengths = torch.randint(3, n, (b,), generator=g)  # end-token position per caption
    ids = torch.randint(1, 49406, (b, n), generator=g)
    pos = torch.arange(n)
    ids[:, 0] = 49406
    ids[torch.arange(b), lengths] = 49407
    ids[pos > lengths[:, None]] = 0
    attn = pos <= lengths[:, None]
    fb = FusionBatch(model, _fake_hidden(ids, attn), seed=1, step=2, global_batch=b, offset=0)
    m = fb.masking(0.15)
    candidate = attn & (pos >= 1) & (pos < lengths[:, None])
    assert not (m.selected & ~candidate).any()  # never the start, end or padding
    rate = m.selected.sum() / candidate.sum()
    assert abs(float(rate) - 0.15) < 4 * math.sqrt(0.15 * 0.85 / int(candidate.sum()))
    sel = int(m.selected.sum())
    masked = float(m.to_mask.sum()) / sel
    changed = m.selected & ~m.to_mask & (m.ids != ids)
    kept = m.selected & ~m.to_mask & (m.ids == ids)
    for share, want in ((masked, 0.8), (float(changed.sum()) / sel, 0.1), (float(kept.sum()) / sel, 0.1)):
        assert abs(share - want) < 4 * math.sqrt(want * (1 - want) / sel) + 2e-3, (share, want)
    assert torch.equal(m.ids[~m.selected], ids[~m.selected]) and torch.equal(m.labels, ids)
    assert not m.to_mask[m.ids != ids].any()  # a masked position keeps its id (the embedding changes)
    assert not torch.isin(m.ids[changed], torch.tensor([0, 49406, 49407])).any()
    assert m.n_global == sel
    # a rank holding rows 300…599 of the same global batch draws exactly those rows' corruption
    half = FusionBatch(model, _fake_hidden(ids[300:], attn[300:]), seed=1, step=2, global_batch=b, offset=300)
    mh = half.masking(0.15)
    assert torch.equal(mh.selected, m.selected[300:]) and torch.equal(mh.ids, m.ids[300:])
    assert torch.equal(mh.to_mask, m.to_mask[300:])


def _mlm_reference(model, h, m, momentum=None, alpha=0.0, see_caption=False, mh=None):
    """Per selected position: the head written out (dense → GELU → LayerNorm → tied embedding + bias)
    and the cross-entropy by hand; with a momentum model, ALBEF's (1 − α)·hard + α·soft."""

    def logits_at(mdl, ids, to_mask, image_h):
        _, th, _, attn = text_hidden(mdl, ids, to_mask, mdl.fusion.mask_embedding)
        fused = mdl.fusion(th, attn, image_h)
        rows = []
        for i, p in m.selected.nonzero().tolist():
            x = mdl.fusion.mlm_dense(fused[i, p])
            x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
            x = F.layer_norm(x, x.shape, mdl.fusion.mlm_ln.weight, mdl.fusion.mlm_ln.bias)
            rows.append((mdl.token_embedding.weight @ x + mdl.fusion.mlm_bias).tolist())
        return rows

    rows = logits_at(model, m.ids, m.to_mask, h.image_hidden)
    soft = None
    if momentum is not None:
        if see_caption:
            soft = logits_at(momentum, m.labels, None, mh.image_hidden)
        else:
            soft = logits_at(momentum, m.ids, m.to_mask, mh.image_hidden)
    total = 0.0
    for k, (i, p) in enumerate(m.selected.nonzero().tolist()):
        lp = log_softmax(rows[k])
        loss = -lp[int(m.labels[i, p])]
        if soft is not None:
            q = [math.exp(v) for v in log_softmax(soft[k])]
            loss = (1 - alpha) * loss + alpha * -sum(a * b for a, b in zip(q, lp, strict=True))
        total += loss
    return total / len(rows)


def test_mlm_matches_a_per_position_loop(model):
    f, fb, h = _batch(model)
    with torch.no_grad():
        got = Composite.from_config("mlm(prob=0.4)").objectives_terms(f)["mlm"].item()
        want = _mlm_reference(model, h, fb.masking(0.4))
    assert fb.masking(0.4).n_global > 0 and abs(got - want) < 1e-4 * max(1.0, want)


@pytest.mark.parametrize("mode", ["albef", "cross"])
def test_mod_distils_mlm_from_the_momentum_model(model, mode):
    momentum = copy.deepcopy(model)
    with torch.no_grad():
        for p in momentum.parameters():
            p.add_(0.05 * torch.randn_like(p))
    f, fb, h = _batch(model, step=5, momentum=momentum)
    comp = Composite.from_config(f"mod(alpha=0.6,warmup=10,queue=0,mlm={mode})+mlm(prob=0.4)")
    with torch.no_grad():
        terms = comp.objectives_terms(f)
        want = _mlm_reference(
            model, h, fb.masking(0.4), momentum, 0.6 * 5 / 10, mode == "cross", fb.momentum_hidden
        )
    assert abs(terms["mlm"].item() - want) < 1e-4 * max(1.0, want)
    assert "mod" in terms and "momentum" in comp.needs


def test_mod_refuses_momentum_beside_it():
    from xmodal.errors import UserError

    with pytest.raises(UserError, match="drop momentum"):
        Composite.from_config("mod+momentum")


def test_mlm_gets_gradients_when_itm_synthesises_first(model):
    """itm(synth) runs the shared masked pass first; mlm must still train through the cached logits."""
    f, fb, h = _batch(model)
    comp = Composite.from_config("itm(synth=true)+mlm")
    total, _ = comp(f.image, f.text, f.logit_scale, fusion=fb)
    model.zero_grad()
    total.backward()
    assert model.fusion.mlm_bias.grad is not None and model.fusion.mlm_bias.grad.abs().sum() > 0
    assert model.fusion.itm_head.weight.grad.abs().sum() > 0


def test_hugging_face_text_tower_feeds_the_fusion_encoder():
    """MiniLM as the text tower: pooled features equal the tower's own, the mask embedding goes in
    through `inputs_embeds`, and masking never selects [CLS], [SEP] or padding."""
    from xmodal.models import minilm_path
    from xmodal.models.build import build_tokenizer
    from xmodal.models.text import encode_text

    spec = ModelSpec("xm-micro", hf_text=str(minilm_path()))
    cfg = resolve_model_config(spec)
    cfg["fusion"] = {"width": 32, "depth": 1, "heads": 2}
    torch.manual_seed(0)
    hf = build_model(spec, cfg).eval()
    ids = build_tokenizer(cfg)(CAPTIONS)
    pixels = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        h = encode_hidden(hf, pixels, ids)
        assert torch.allclose(h.text, encode_text(hf, ids), atol=1e-5)
        fb = FusionBatch(hf, h, seed=0, step=0, global_batch=6, offset=0)
        m = fb.masking(0.5)
        assert m.selected.any() and not (m.selected & ~h.text_attn).any()
        assert not m.selected[:, 0].any() and not m.selected[torch.arange(6), h.text_attn.sum(1) - 1].any()
        masked, _ = fb.encode_text(m.ids, m.to_mask)
        plain, _ = fb.encode_text(m.ids)
        assert not torch.allclose(masked, plain)  # the mask embedding changed the tower's input
        f = Features.gather(
            F.normalize(h.image, dim=-1), F.normalize(h.text, dim=-1), hf.logit_scale.exp(), fusion=fb
        )
        terms = Composite.from_config("itm+mlm(prob=0.5)").objectives_terms(f)
    assert all(torch.isfinite(v) for v in terms.values())
