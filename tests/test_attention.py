"""The written-out self-attention used for training on CPUs: equal to a per-head loop (brute force) and to
open_clip's nn.MultiheadAttention path, forward and gradients; inference keeps open_clip's path; the
state dict does not change; whole training runs give the same loss curve to 1e-5 with and without it."""

import copy
import math

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock, TextTransformer

import xmodal.models.tome as tome
import xmodal.train.trainer as trainer_module
from tests.test_train import micro_curve
from xmodal.models.attention import attend, remove_explicit_attention, use_explicit_attention


def _loop_attention(
    block: ResidualAttentionBlock, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v one sample and one head at a time, from the block's packed weights."""
    a = block.attn
    n, t, d = x.shape
    h = a.num_heads
    dh = d // h
    wq, wk, wv = a.in_proj_weight.chunk(3)
    bq, bk, bv = a.in_proj_bias.chunk(3)
    out = torch.zeros(n, t, d, dtype=torch.float64)
    for i in range(n):
        xi = x[i].double()
        for j in range(h):
            s = slice(j * dh, (j + 1) * dh)
            q = xi @ wq[s].double().T + bq[s].double()
            k = xi @ wk[s].double().T + bk[s].double()
            v = xi @ wv[s].double().T + bv[s].double()
            logits = q @ k.T / math.sqrt(dh) + (0 if mask is None else mask.double())
            out[i, :, s] = torch.softmax(logits, -1) @ v
    return out @ a.out_proj.weight.double().T + a.out_proj.bias.double()


@pytest.mark.parametrize("causal", [False, True])
def test_equals_a_per_head_loop_and_open_clips_path(causal):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4)
    fast = copy.deepcopy(block)
    assert use_explicit_attention(fast) == 1
    x = torch.randn(3, 9, 32)
    mask = torch.full((9, 9), float("-inf")).triu(1) if causal else None
    ref = _loop_attention(block, x, mask)
    ours = fast.attention(x, attn_mask=mask)
    theirs = block.attention(x, attn_mask=mask)
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    assert torch.allclose(theirs.double(), ref, atol=1e-5)  # the reference is open_clip's formula
    fast(x, attn_mask=mask).square().sum().backward()
    block(x, attn_mask=mask).square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), fast.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * p.grad.abs().max(), name  # fp32 summation order


def test_a_per_sample_mask_of_each_head_is_added_to_its_own_logits():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.randn(2, 3, 5, 5)
    ref = torch.softmax(q @ k.transpose(-2, -1) / 2 + mask, -1) @ v  # √d = 2
    assert torch.allclose(attend(q, k, v, mask), ref, atol=1e-6)
    with torch.no_grad():  # SDPA without gradients: the same numbers
        assert torch.allclose(attend(q, k, v, mask), ref, atol=1e-6)


def test_inference_and_the_state_dict_keep_open_clips_path(monkeypatch):
    torch.manual_seed(2)
    text = TextTransformer(context_length=8, vocab_size=50, width=32, heads=4, layers=2, output_dim=16)
    keys = list(text.state_dict())
    assert use_explicit_attention(text) == 2
    assert list(text.state_dict()) == keys
    called = []
    original = ResidualAttentionBlock.attention
    monkeypatch.setattr(
        ResidualAttentionBlock, "attention", lambda *a, **k: called.append("open_clip") or original(*a, **k)
    )
    tokens = torch.randint(1, 50, (2, 8))
    with torch.no_grad():
        text(tokens)
    assert called == ["open_clip", "open_clip"]
    called.clear()
    text(tokens)
    assert called == []
    remove_explicit_attention(text)
    text(tokens)
    assert called == ["open_clip", "open_clip"]


@pytest.mark.parametrize("extra", [[], ["--tome", "2"]])
def test_training_gives_the_loss_curve_of_open_clips_attention(tiny_manifest, tmp_path, monkeypatch, extra):
    explicit = micro_curve(tiny_manifest, tmp_path / "explicit", *extra)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(trainer_module, "use_explicit_attention", lambda model: 0)
    monkeypatch.setattr(tome, "attend", lambda q, k, v, mask=None, dropout=0.0: sdpa(q, k, v, mask, dropout))
    plain = micro_curve(tiny_manifest, tmp_path / "sdpa", *extra)
    assert len(explicit) == 4
    assert max(abs(a - b) for a, b in zip(explicit, plain, strict=True)) < 1e-5
