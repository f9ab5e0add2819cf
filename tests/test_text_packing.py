"""The text tower on packed rows (xmodal/models/text.py): each block equal to the full block on the
caption's own rows (brute force: the whole padded batch, then the rows), encode_text equal to open_clip's,
forward and every gradient, with or without padding rows that round the packed count up, with grad
checkpointing, written-out attention, LayerScale and without gradients; batches without padding keep the
plain trimmed path; a training run gives the same loss curve to 1e-5 packed and unpacked."""

import open_clip
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

import xmodal.models.pooled as pooled
import xmodal.models.text as text_module
from tests.test_train import micro_curve
from xmodal.models.attention import use_explicit_attention


def _causal(t: int) -> torch.Tensor:
    return torch.full((t, t), float("-inf")).triu(1)


@pytest.mark.parametrize("last", [False, True])
def test_packed_block_is_the_full_blocks_rows(last):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, ls_init_value=0.5)
    n, t = 5, 9
    ends = torch.tensor([8, 0, 3, 6, 2])
    x = torch.randn(n, t, 32)
    valid = torch.arange(t) <= ends[:, None]
    index = valid.view(-1).nonzero().squeeze(1)
    full = block(x, attn_mask=_causal(t))
    packed = x.reshape(n * t, 32)[index]
    if last:
        rows = (ends + 1).cumsum(0) - 1
        got = text_module.packed_block(block, packed, index, (n, t), _causal(t), ends, rows)
        want = full[torch.arange(n), ends]
    else:
        got = text_module.packed_block(block, packed, index, (n, t), _causal(t))
        want = full[valid]  # row-major: the packed order
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def _model(**text):
    torch.manual_seed(1)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 8, "patch_size": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 4, "layers": 3, **text},
    }
    return open_clip.CLIP(**cfg).train()


def _tokens(lengths) -> torch.Tensor:
    tok = torch.zeros(len(lengths), 12, dtype=torch.long)
    for i, n in enumerate(lengths):  # n tokens, then the end-of-text (the top id); one at the full context
        tok[i, :n] = torch.randint(1, 90, (n,))
        tok[i, n] = 99
    return tok


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _counting(monkeypatch) -> list[int]:
    calls, original = [], text_module.packed_pooled_rows
    monkeypatch.setattr(text_module, "packed_pooled_rows", lambda *a: calls.append(1) or original(*a))
    return calls


def test_packed_positions_are_the_own_tokens_then_the_first_padding_up_to_the_multiple():
    ends = torch.tensor([2, 0, 4, 1])  # 3 + 1 + 5 + 2 = 11 own tokens of 20
    own = torch.arange(5) <= ends[:, None]
    for multiple, want in [(1, 11), (4, 12), (8, 16), (64, 20)]:
        keep = text_module.packed_positions(ends, 5, multiple)
        assert int(keep.sum()) == want and bool(keep[own].all())
        extra = (keep & ~own).view(-1).nonzero().squeeze(1)
        first = (~own).view(-1).nonzero().squeeze(1)[: want - 11]  # the first padding positions, flat order
        assert torch.equal(extra, first)


@pytest.mark.parametrize("multiple", [1, 8])  # 27 own rows alone, or 5 padding rows run beside them
@pytest.mark.parametrize("variant", ["plain", "explicit attention", "checkpointing"])
def test_encode_text_equals_open_clips(variant, multiple, monkeypatch):
    monkeypatch.setattr(text_module, "PACK_MULTIPLE", multiple)
    model = _model(ls_init_value=0.3)
    if variant == "explicit attention":
        use_explicit_attention(model)
    if variant == "checkpointing":
        model.set_grad_checkpointing(True)
    tok = _tokens([3, 11, 1, 5, 2])  # 27 of 60 trimmed rows are real tokens
    calls = _counting(monkeypatch)
    want = model.encode_text(tok, normalize=True)
    got = text_module.encode_text(model, tok, normalize=True)
    assert calls == [1]
    assert torch.allclose(got, want, atol=1e-6)
    a, b = _grads(model, want[:, :3].sum()), _grads(model, got[:, :3].sum())
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5 * max(a[name].abs().max(), 1e-3), name
    with torch.no_grad():  # inference: scaled_dot_product_attention on the same layout
        assert torch.allclose(text_module.encode_text(model, tok), model.encode_text(tok), atol=1e-5)


def test_batches_without_padding_keep_the_trimmed_path(monkeypatch):
    model = _model()
    calls = _counting(monkeypatch)
    tok = _tokens([4, 4, 4])
    assert torch.allclose(text_module.encode_text(model, tok), model.encode_text(tok), atol=1e-5)
    assert calls == []
    monkeypatch.setattr(pooled, "ResidualAttentionBlock", torch.nn.Identity)  # not a plain block: full path
    assert not pooled.can_pool_last(model.transformer)
    tok = _tokens([1, 6, 2])
    assert torch.allclose(text_module.encode_text(model, tok), model.encode_text(tok), atol=1e-5)
    assert calls == []


def test_training_gives_the_loss_curve_of_the_unpacked_tower(tiny_manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "PACK_BELOW", 1.01)  # pack every batch
    monkeypatch.setattr(text_module, "PACK_MULTIPLE", 8)  # with a few padding rows where they round up
    calls = _counting(monkeypatch)
    packed = micro_curve(tiny_manifest, tmp_path / "packed")
    packed_calls = len(calls)
    assert packed_calls >= 4  # each step's text tower (and any evaluation after it) ran packed
    monkeypatch.setattr(text_module, "PACK_BELOW", 0.0)  # never
    plain = micro_curve(tiny_manifest, tmp_path / "plain")
    assert len(calls) == packed_calls and len(plain) == 4
    assert max(abs(a - b) for a, b in zip(packed, plain, strict=True)) < 1e-5
