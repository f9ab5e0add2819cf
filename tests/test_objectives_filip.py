"""FILIP's token-wise late interaction (`filip`) against python-loop references in float64, exact under
sharding, blind to padding; `encode_with_tokens` gives the pooled features of the ordinary path."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import xmodal.models.text as text_module
from xmodal.errors import UserError
from xmodal.objectives import REGISTRY, Composite, Features
from xmodal.objectives.late_interaction import filip_loss, keep_count, select_image_tokens

# -- references -------------------------------------------------------------------------------


def _batch(b=6, n=5, length=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b, length, d, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    lengths[0] = length
    mask = torch.arange(length)[None] < lengths[:, None]
    mask[1, 0] = False  # a hole (a dropped start token) is padding too
    mask[1, 1] = True
    return img, txt, mask


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def brute_select(img, txt, mask, keep):
    """Each image's `keep` tokens with the highest max similarity to any real token of any text."""
    out = []
    for toks in img.tolist():
        score = [
            max(
                _dot(x, y)
                for t, m in zip(txt.tolist(), mask.tolist(), strict=True)
                for y, r in zip(t, m, strict=True)
                if r
            )
            for x in toks
        ]
        best = sorted(range(len(toks)), key=lambda k: -score[k])[:keep]
        out.append([toks[k] for k in sorted(best)])
    return out


def brute_filip(img, txt, mask, t):
    """img: per image a list of token vectors; txt/mask: tensors. Python loops over every pair."""
    img = img if isinstance(img, list) else img.tolist()
    words = [
        [y for y, r in zip(tt, m, strict=True) if r]
        for tt, m in zip(txt.tolist(), mask.tolist(), strict=True)
    ]
    n = len(img)
    s_i = [
        [sum(max(_dot(x, y) for y in words[j]) for x in img[i]) / len(img[i]) for j in range(n)]
        for i in range(n)
    ]
    s_t = [
        [sum(max(_dot(x, y) for x in img[i]) for y in words[j]) / len(words[j]) for j in range(n)]
        for i in range(n)
    ]
    total = 0.0
    for k in range(n):
        row = [t * s_i[k][j] for j in range(n)]  # image k against every text
        total -= row[k] - math.log(sum(math.exp(v) for v in row))
        col = [t * s_t[i][k] for i in range(n)]  # text k against every image
        total -= col[k] - math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def _filip(**params):
    return REGISTRY["filip"](REGISTRY["filip"].Params(**params))


def _features(img, txt, mask, t, **kw):
    b = len(img)
    dummy = torch.zeros(b, 2, dtype=img.dtype)
    return Features(dummy, dummy, dummy, dummy, 0, t, image_tokens=img, text_tokens=txt, text_mask=mask, **kw)


T = torch.tensor(4.0, dtype=torch.float64)

# -- the objective ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_mb", [32.0, 1e-6])  # one block; one caption per block
def test_filip_matches_python_loops(chunk_mb):
    img, txt, mask = _batch()
    expect = brute_filip(img, txt, mask, 4.0)
    assert abs(filip_loss(img, txt, mask, T, chunk_mb=chunk_mb).item() - expect) < 1e-12
    got = _filip(chunk_mb=chunk_mb).terms(_features(img.float(), txt.float(), mask, T.float()))["filip"]
    assert abs(got.item() - expect) < 1e-5  # the objective works in float32


@pytest.mark.parametrize("fraction, keep", [(0.4, 2), (0.25, 2), (0.01, 1), (0.8, 4)])
def test_token_selection_matches_python_loops(fraction, keep):
    img, txt, mask = _batch(n=5, seed=1)
    assert keep_count(5, fraction) == keep
    sel = select_image_tokens(img, txt, mask, keep, chunk_mb=1e-6)
    assert torch.allclose(sel, torch.tensor(brute_select(img, txt, mask, keep), dtype=img.dtype), atol=0)
    expect = brute_filip(brute_select(img, txt, mask, keep), txt, mask, 4.0)
    obj = _filip(token_fraction=fraction)
    got = obj.terms(_features(img, txt, mask, T))["filip"]
    assert abs(got.item() - expect) < 1e-12


def test_token_fraction_one_is_no_selection():
    img, txt, mask = _batch(seed=2)
    plain = filip_loss(img, txt, mask, T)
    assert _filip(token_fraction=1.0).terms(_features(img, txt, mask, T))["filip"].item() == plain.item()
    assert select_image_tokens(img, txt, mask, keep=img.shape[1]) is img
    # selecting every token through the scoring path: the same set, so the same loss
    every = select_image_tokens(img, txt, mask, keep=img.shape[1] - 1)
    assert every.shape[1] == img.shape[1] - 1
    perm = img[:, torch.randperm(img.shape[1], generator=torch.Generator().manual_seed(0))]
    assert abs(filip_loss(perm, txt, mask, T).item() - plain.item()) < 1e-12  # token order is irrelevant


@pytest.mark.parametrize("fraction", [1.0, 0.4])
def test_sharded_halves_average_to_the_whole_batch(fraction):
    """Each half scores its own rows against the whole batch's tokens ("all"); the mean of the two
    halves' terms is the one-process value, and so is the mean of their gradients."""
    img, txt, mask = _batch(b=8, seed=3)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    keep = keep_count(img.shape[1], fraction)
    whole = _filip(token_fraction=fraction).terms(_features(img, txt, mask, T))["filip"]
    (g_img, g_txt) = torch.autograd.grad(whole, (img, txt))
    all_sel = select_image_tokens(img, txt, mask, keep)
    parts = []
    for s in (slice(0, 4), slice(4, 8)):
        sel = select_image_tokens(img[s], txt, mask, keep)  # scored against all texts, as a rank does
        assert torch.equal(sel, all_sel[s])
        parts.append(filip_loss(sel, txt[s], mask[s], T, all_sel, txt, mask, offset=s.start, chunk_mb=1e-6))
    assert abs(sum(p.item() for p in parts) / 2 - whole.item()) < 1e-12
    h_img, h_txt = torch.autograd.grad(sum(parts) / 2, (img, txt))
    assert torch.allclose(h_img, g_img, atol=1e-12) and torch.allclose(h_txt, g_txt, atol=1e-12)


def test_padding_never_affects_the_loss_or_gradients():
    img, txt, mask = _batch(seed=4)
    img.requires_grad_(True)
    base = txt.clone().requires_grad_(True)
    loss = _filip(token_fraction=0.4).terms(_features(img, base, mask, T))["filip"]
    g = torch.autograd.grad(loss, (img, base))
    noisy = txt.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), txt.shape[-1], dtype=txt.dtype) * 100
    for pad in (noisy, torch.full_like(txt, float("nan")).where(~mask[..., None], txt)):
        pad = pad.requires_grad_(True)
        other = _filip(token_fraction=0.4).terms(_features(img, pad, mask, T))["filip"]
        h = torch.autograd.grad(other, (img, pad))
        assert other.item() == loss.item()
        assert torch.equal(h[0], g[0]) and torch.equal(h[1], g[1])
        assert not h[1][~mask].any()  # no gradient into padding


def test_gradients_match_finite_differences_and_do_not_depend_on_the_blocks():
    img, txt, mask = _batch(b=4, n=3, length=3, d=3, seed=5)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: filip_loss(a, b, mask, T), (img, txt))
    img, txt, mask = _batch(b=8, seed=7)
    grads = []
    for chunk_mb in (32.0, 1e-6):
        a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(filip_loss(a, b, mask, T, chunk_mb=chunk_mb), (a, b)))
    for g, h in zip(*grads, strict=True):
        assert torch.allclose(g, h, atol=1e-14)


def test_spec_params_and_errors():
    obj = Composite.from_config("clip+filip:0.5(token_fraction=0.25,chunk_mb=8)").objectives[1][0]
    assert obj.params.token_fraction == 0.25 and obj.params.chunk_mb == 8.0
    assert obj.needs == {"pooled", "tokens"} and not obj.supports_accumulation
    for bad in ("filip(token_fraction=0)", "filip(token_fraction=1.5)", "filip(chunk_mb=0)"):
        with pytest.raises(UserError, match="bad parameter value"):
            Composite.from_config(bad)
    img, txt, mask = _batch()
    with pytest.raises(ValueError, match="needs image_tokens"):
        _filip().terms(Features(img[:, 0], txt[:, 0], img[:, 0], txt[:, 0], 0, T))


# -- two processes (gloo) --------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, img, txt, mask, fraction, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    s = slice(rank * 4, rank * 4 + 4)
    n = int(mask[s].sum(0).nonzero().max()) + 1  # this rank's own trimmed length
    mine_img = img[s].clone().requires_grad_(True)
    mine_txt = txt[s, :n].clone().requires_grad_(True)
    f = Features.gather(
        mine_img[:, 0], mine_txt[:, 0], T, image_tokens=mine_img, text_tokens=mine_txt, text_mask=mask[s, :n]
    )
    loss = _filip(token_fraction=fraction).terms(f)["filip"]
    loss.backward()
    torch.save((loss.item(), mine_img.grad, mine_txt.grad), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("fraction", [0.4])
def test_two_gloo_ranks_with_different_lengths_equal_one_process(fraction, tmp_path):
    img, txt, mask = _batch(b=8, seed=6)
    mask[:4, 2:] = False  # rank 0's captions are shorter: each rank trims to its own length
    mask[:4, :2] = True
    mask[4] = True  # rank 1's are full length
    img.requires_grad_(True)
    txt.requires_grad_(True)
    whole = _filip(token_fraction=fraction).terms(_features(img, txt, mask, T))["filip"]
    g_img, g_txt = torch.autograd.grad(whole, (img, txt))
    mp.spawn(_rank, args=(_free_port(), img.detach(), txt.detach(), mask, fraction, str(tmp_path)), nprocs=2)
    out = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    # the trainer averages gradients over ranks; each rank's loss is its rows' mean
    assert abs((out[0][0] + out[1][0]) / 2 - whole.item()) < 1e-12
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]) / 2, g_img, atol=1e-12)
    assert torch.allclose(out[0][2] / 2, g_txt[:4, :2], atol=1e-12)
    assert torch.allclose(out[1][2] / 2, g_txt[4:], atol=1e-12)


# -- encode_with_tokens (open_clip imported here only: the gloo ranks above start faster) ---------


def encode_with_tokens(*args):
    from xmodal.models.tokens import encode_with_tokens

    return encode_with_tokens(*args)


def encode_text(*args, **kw):
    from xmodal.models.text import encode_text

    return encode_text(*args, **kw)


def _build(name, **spec_kw):
    from xmodal.models.build import ModelSpec, build_model, build_tokenizer, resolve_model_config

    spec = ModelSpec(name=name, **spec_kw)
    cfg = resolve_model_config(spec)
    return build_model(spec, cfg), build_tokenizer(cfg)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = _build("xm-tiny")
    tok = tokenizer(["a red circle!", "green square on white", "x", "a blue blue blue square"])
    pixels = torch.randn(4, 3, 64, 64)
    return model, pixels, tok


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


def _every_row(monkeypatch):
    """encode_text with its last block run for every row, as the token path runs it."""
    monkeypatch.setattr(text_module, "can_pool_last", lambda transformer: False)


def test_encode_with_tokens_pooled_equal_the_plain_path_in_one_pass(tiny, monkeypatch):
    model, pixels, tok = tiny
    model.eval()
    counters = [_count_calls(model.visual.transformer), _count_calls(model.transformer)]
    img, txt, img_tok, txt_tok, mask = encode_with_tokens(model, pixels, tok)
    assert [len(c) for c, _ in counters] == [1, 1]  # one pass through each tower
    for _, h in counters:
        h.remove()
    assert torch.equal(img, model.encode_image(pixels, normalize=True))
    assert torch.allclose(txt, encode_text(model, tok, normalize=True), atol=1e-6)  # its last block: one row
    _every_row(monkeypatch)
    assert torch.equal(txt, encode_text(model, tok, normalize=True))
    assert model.visual.output_tokens is False  # restored
    n = int(tok.argmax(-1).max()) + 1  # trimmed to the longest caption
    assert img_tok.shape == (4, 64, 128) and txt_tok.shape == (4, n, 128) and mask.shape == (4, n)
    assert all(x.dtype == torch.float32 for x in (img, txt, img_tok, txt_tok))
    assert torch.allclose(img_tok.norm(dim=-1), torch.ones(4, 64)) and mask.dtype == torch.bool
    end = tok.argmax(-1)
    for i in range(4):
        assert mask[i].tolist() == [1 <= p <= end[i] for p in range(n)]

    # the token features, computed the long way: every position, untrimmed, projected
    v = model.visual
    with torch.no_grad():
        x = v.ln_post(v.transformer(v._embeds(pixels)))
        assert torch.allclose(img_tok, F.normalize(x[:, 1:] @ v.proj, dim=-1), atol=1e-5)
        assert torch.allclose(img, F.normalize(x[:, 0] @ v.proj, dim=-1), atol=1e-5)
        y = model.token_embedding(tok) + model.positional_embedding
        y = model.ln_final(model.transformer(y, attn_mask=model.attn_mask)) @ model.text_projection
        assert torch.allclose(txt_tok, F.normalize(y[:, :n], dim=-1), atol=1e-5)
        assert torch.allclose(txt, F.normalize(y[torch.arange(4), end], dim=-1), atol=1e-5)


def test_encode_with_tokens_under_bf16_autocast_returns_float32(tiny, monkeypatch):
    model, pixels, tok = tiny
    _every_row(monkeypatch)
    model.train()
    ref = encode_with_tokens(model, pixels, tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = encode_with_tokens(model, pixels, tok)
        assert torch.equal(got[0], model.encode_image(pixels, normalize=True).float())
        assert torch.equal(got[1], encode_text(model, tok, normalize=True).float())
    assert all(x.dtype == torch.float32 for x in got[:4]) and torch.equal(got[4], ref[4])
    for a, b in zip(got[:4], ref[:4], strict=True):
        assert (a - b).abs().max() < 0.05
    # gradients reach both towers through the token features
    f = Features.gather(got[0], got[1], model.logit_scale.exp(), image_tokens=got[2], text_tokens=got[3])
    f.text_mask = got[4]
    loss = _filip(token_fraction=0.25).terms(f)["filip"]
    loss.backward()
    assert model.visual.conv1.weight.grad is not None and model.token_embedding.weight.grad is not None
    model.zero_grad()


def test_hf_text_tower_gives_tokens():
    from xmodal.models import minilm_path

    torch.manual_seed(0)
    model, tokenizer = _build("xm-micro", hf_text=str(minilm_path()))
    model.eval()
    tok = tokenizer(["a red circle", "a green square on a white background"])
    pixels = torch.randn(2, 3, 32, 32)
    img, txt, img_tok, txt_tok, mask = encode_with_tokens(model, pixels, tok)
    assert torch.equal(img, model.encode_image(pixels, normalize=True))
    assert torch.equal(txt, encode_text(model, tok, normalize=True))
    real = tok != model.text.config.pad_token_id
    assert txt_tok.shape == (2, tok.shape[1], 32) and mask[:, 0].logical_not().all()
    assert torch.equal(mask[:, 1:], real[:, 1:])
    with torch.no_grad():
        h = model.text.transformer(input_ids=tok, attention_mask=real.long()).last_hidden_state
        assert torch.allclose(txt_tok, F.normalize(model.text.proj(h), dim=-1), atol=1e-5)


def test_towers_without_tokens_are_one_line_errors():
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    from xmodal.models.build import ModelSpec, build_model

    model = build_model(ModelSpec(name="resnet"), cfg)
    with pytest.raises(UserError, match="filip needs token features; the ModifiedResNet image tower") as e:
        encode_with_tokens(model, torch.randn(1, 3, 32, 32), torch.zeros(1, 8, dtype=torch.long))
    assert "\n" not in str(e.value)
    from xmodal.models.tokens import check_tokens_supported

    with pytest.raises(UserError, match="the ModifiedResNet image tower"):
        check_tokens_supported(model)  # before training starts
