"""The last block run for the pooled row only (xmodal/models/pooled.py): equal to the full block's row
(brute force: the whole block, then the row), to open_clip's encode_image / encode_text, forward and
gradients, with patch dropout, grad checkpointing, explicit attention and without gradients; ToMe and other
towers take the full path; whole training runs give the same loss curve to 1e-5 with and without it."""

import copy

import open_clip
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

import xmodal.models.pooled as pooled
import xmodal.models.text as text_module
from tests.test_train import micro_curve
from xmodal.models.attention import use_explicit_attention
from xmodal.models.patch_dropout import install_patch_dropout
from xmodal.models.text import encode_text
from xmodal.models.tome import apply_tome


@pytest.mark.parametrize("masked", [False, True])
def test_last_block_row_is_the_full_blocks_row(masked):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, ls_init_value=0.5)  # LayerScale on: ls_1 / ls_2 are not identities
    x = torch.randn(5, 9, 32)
    mask = torch.full((9, 9), float("-inf")).triu(1) if masked else None
    rows = torch.tensor([0, 8, 3, 3, 6]) if masked else None
    full = block(x, attn_mask=mask)
    want = full[:, 0] if rows is None else full[torch.arange(5), rows]
    got = pooled.last_block_row(block, x, rows, mask)
    assert got.shape == (5, 32)
    assert torch.allclose(got, want, atol=1e-5)


def _model(**vision):
    torch.manual_seed(1)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "head_width": 8,
            "patch_size": 8,
            **vision,
        },
        "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2},
    }
    return open_clip.CLIP(**cfg).train()


def _tokens() -> torch.Tensor:
    tok = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate([3, 7, 5, 2]):  # captions of different lengths; the end-of-text has the top id
        tok[i, : n + 1] = torch.randint(1, 90, (n + 1,))
        tok[i, n + 1] = 99
    return tok


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5 * max(a[name].abs().max(), 1e-3), name


@pytest.mark.parametrize("variant", ["plain", "explicit attention", "patch dropout", "checkpointing"])
def test_features_and_gradients_equal_open_clips(variant):
    model = _model(ls_init_value=0.3)
    if variant == "explicit attention":
        assert use_explicit_attention(model) == 4
    if variant == "patch dropout":
        install_patch_dropout(model, 0.5, seed=3, flag="--patch-dropout").at(step=2, offset=0, total=4)
    if variant == "checkpointing":
        model.set_grad_checkpointing(True)
    pixels, tok = torch.randn(4, 3, 32, 32), _tokens()
    assert pooled.can_pool_image(model.visual) and pooled.can_pool_last(model.transformer)

    want = model.encode_image(pixels, normalize=True)
    got = pooled.encode_image(model, pixels, normalize=True)
    assert torch.allclose(got, want, atol=1e-6)
    _same_grads(
        _grads(model, want.square().sum() + want[:, 0].sum()),
        _grads(model, got.square().sum() + got[:, 0].sum()),
    )

    want = model.encode_text(tok)
    got = encode_text(model, tok)
    assert torch.allclose(got, want, atol=1e-5)
    _same_grads(_grads(model, want.square().sum()), _grads(model, got.square().sum()))

    with torch.no_grad():  # inference: the SDPA kernel, the same numbers
        assert torch.allclose(pooled.encode_image(model, pixels), model.encode_image(pixels), atol=1e-6)
        assert torch.allclose(encode_text(model, tok), model.encode_text(tok), atol=1e-5)


def test_other_towers_take_their_own_forward(monkeypatch):
    tome_model = _model()
    apply_tome(tome_model, 2)
    avg = _model(pool_type="avg")
    assert not pooled.can_pool_image(tome_model.visual)  # ToMe's transformer merges rows in every block
    assert not pooled.can_pool_image(avg.visual)  # every row is pooled
    pixels = torch.randn(2, 3, 32, 32)
    called = []
    monkeypatch.setattr(pooled, "pooled_rows", lambda *a, **k: called.append(1))
    for m in (tome_model, avg):
        want = copy.deepcopy(m).encode_image(pixels)
        assert torch.equal(pooled.encode_image(m, pixels), want)
    assert called == []


def test_training_gives_the_loss_curve_of_the_full_last_block(tiny_manifest, tmp_path, monkeypatch):
    calls = []
    counted = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
    original = pooled.pooled_rows
    monkeypatch.setattr(
        text_module, "PACK_BELOW", 0.0
    )  # the unpacked text tower (packing: test_text_packing)
    monkeypatch.setattr(pooled, "pooled_rows", counted)
    monkeypatch.setattr(text_module, "pooled_rows", counted)
    fast = micro_curve(tiny_manifest, tmp_path / "pooled")
    assert len(calls) >= 8  # each of the 4 steps: both towers took the pooled path
    monkeypatch.setattr(pooled, "can_pool_image", lambda visual: False)
    monkeypatch.setattr(text_module, "can_pool_last", lambda transformer: False)
    full = micro_curve(tiny_manifest, tmp_path / "full")
    assert len(fast) == 4
    assert max(abs(a - b) for a, b in zip(fast, full, strict=True)) < 1e-5
