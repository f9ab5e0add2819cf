"""ToMe (xmodal.models.tome) against brute-force references written from the paper's description."""

import copy
import io
import math

import pytest
import torch
from open_clip.transformer import Transformer, VisionTransformer

from xmodal.models import ModelSpec, build_model
from xmodal.models.tome import (
    apply_tome,
    bipartite_soft_matching,
    merge_wavg,
    remove_tome,
    tome_block,
    tome_token_counts,
)


def naive_merge(x, size, metric, r):
    """Loop version of bipartite soft matching + size-weighted merge, one image at a time.

    Even positions are set A, odd positions set B; each A token but the class token (index 0) finds its
    most cosine-similar B token; the r A tokens with the highest such similarity are folded into their B
    partner as size-weighted means. Output: kept A tokens in order, then every B token in order; with
    nothing to merge, the tokens unchanged (the authors' `do_nothing`).
    """
    if min(r, (x.shape[1] - 1) // 2) <= 0:
        return x.double(), size.double()
    xs, sizes = [], []
    for xb, sb, mb in zip(x.double(), size.double(), metric.double(), strict=True):
        t = xb.shape[0]
        rb = min(r, (t - 1) // 2)
        a_idx, b_idx = list(range(0, t, 2)), list(range(1, t, 2))
        best = {}
        for i in a_idx[1:]:
            sims = [torch.dot(mb[i], mb[j]) / (mb[i].norm() * mb[j].norm()) for j in b_idx]
            j = max(range(len(b_idx)), key=lambda k: sims[k])
            best[i] = (sims[j].item(), b_idx[j])
        merged = sorted(best, key=lambda i: -best[i][0])[:rb]
        acc = {j: (xb[j] * sb[j], sb[j].clone()) for j in b_idx}
        for i in merged:
            v, s = acc[best[i][1]]
            acc[best[i][1]] = (v + xb[i] * sb[i], s + sb[i])
        kept = [i for i in a_idx if i not in merged]
        xs.append(torch.stack([xb[i] for i in kept] + [acc[j][0] / acc[j][1] for j in b_idx]))
        sizes.append(torch.stack([sb[i] for i in kept] + [acc[j][1] for j in b_idx]))
    return torch.stack(xs), torch.stack(sizes)


def reference_block(blk, x, size, r, prop_attn=True):
    """A ToMe block by hand: per-head attention with log(size) added to the logits, then `naive_merge`."""
    attn = blk.attn
    d, h = x.shape[-1], attn.num_heads
    dh = d // h
    y = blk.ln_1(x)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    heads, keys = [], []
    for i in range(h):
        q = y @ w[i * dh : (i + 1) * dh].T + b[i * dh : (i + 1) * dh]
        k = y @ w[d + i * dh : d + (i + 1) * dh].T + b[d + i * dh : d + (i + 1) * dh]
        v = y @ w[2 * d + i * dh : 2 * d + (i + 1) * dh].T + b[2 * d + i * dh : 2 * d + (i + 1) * dh]
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if prop_attn:
            logits = logits + size.log().transpose(-1, -2)
        heads.append(logits.softmax(dim=-1) @ v)
        keys.append(k)
    x = x + blk.ls_1(attn.out_proj(torch.cat(heads, dim=-1)))
    x, size = naive_merge(x, size, sum(keys) / h, r)
    x, size = x.float(), size.float()
    return x + blk.ls_2(blk.mlp(blk.ln_2(x))), size


def tiny_tower(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=4, width=64, layers=3, heads=4, mlp_ratio=2.0, output_dim=16)
    return VisionTransformer(**{**cfg, **kw}).eval()


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_model(ModelSpec(name="xm-tiny")).eval()


@pytest.mark.parametrize("r", [1, 5, 100])
def test_matching_and_merge_equal_naive_loops(r):
    torch.manual_seed(r)
    x, metric = torch.randn(3, 17, 8), torch.randn(3, 17, 6)
    metric[:, 0] = metric[:, 1]  # the class token's best match is perfect: it must still not merge
    size = torch.randint(1, 5, (3, 17, 1)).float()
    got_x, got_size = merge_wavg(bipartite_soft_matching(metric, r), x, size)
    want_x, want_size = naive_merge(x, size, metric, r)
    assert got_x.shape == (3, 17 - min(r, 8), 8)
    torch.testing.assert_close(got_x.double(), want_x)
    torch.testing.assert_close(got_size.double(), want_size)
    assert torch.equal(got_x[:, 0], x[:, 0]) and (got_size[:, 0] == size[:, 0]).all()  # class token kept
    assert torch.equal(got_size.sum(1), size.sum(1))  # every patch is counted once


def test_r0_is_the_unpatched_tower_and_state_dict_is_unchanged(clip):
    model = copy.deepcopy(clip)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.encode_image(images)
        apply_tome(model, 0)
        assert torch.equal(model.encode_image(images), want)
        keys = list(model.state_dict())
        apply_tome(model, 8)
        assert not torch.allclose(model.encode_image(images), want)
        assert list(model.state_dict()) == keys
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        plain = copy.deepcopy(clip)
        plain.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        model.load_state_dict(clip.state_dict(), strict=True)
        remove_tome(model)
        assert type(model.visual.transformer) is Transformer and not hasattr(
            model.visual.transformer, "tome_r"
        )
        assert torch.equal(model.encode_image(images), want)
        assert torch.equal(plain.encode_image(images), want)


@pytest.mark.parametrize("ls, prop_attn", [(None, True), (0.5, True), (None, False)])
def test_block_and_tower_equal_reference_forward(ls, prop_attn):
    visual = tiny_tower(ls_init_value=ls)
    r = [6, 0, 9]  # a block with r=0 after merging still needs the size bias
    apply_tome(visual, r, prop_attn=prop_attn)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = visual._embeds(images)
        want_x, want_size, size = x, torch.ones_like(x[..., :1]), None
        for blk, ri in zip(visual.transformer.resblocks, r, strict=True):
            want_x, want_size = reference_block(blk, want_x, want_size, ri, prop_attn)
            x, size = tome_block(blk, x, size, ri, prop_attn)
            torch.testing.assert_close(x, want_x, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(size, want_size)
        pooled, _ = visual._pool(want_x)
        torch.testing.assert_close(visual(images), pooled @ visual.proj, rtol=1e-4, atol=1e-5)


def test_sequence_first_transformer_gives_the_same_result():
    visual = tiny_tower()
    apply_tome(visual, 5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = visual(images)
        seq_first = Transformer(64, 3, 4, 2.0, batch_first=False)
        seq_first.load_state_dict(visual.transformer.state_dict())
        visual.transformer = seq_first
        apply_tome(visual, 5)
        torch.testing.assert_close(visual(images), want, rtol=1e-5, atol=1e-6)


def test_gradients_flow_and_checkpointing_agrees(clip):
    model = copy.deepcopy(clip).train()
    apply_tome(model, 8)
    images, text = torch.randn(4, 3, 64, 64), torch.randint(1, 400, (4, 32))

    def grads():
        model.zero_grad()
        img, txt = model.encode_image(images, normalize=True), model.encode_text(text, normalize=True)
        logits = 10 * img @ txt.T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
        loss.backward()
        return {n: p.grad.clone() for n, p in model.visual.named_parameters()}

    g = grads()
    for name, grad in g.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.visual.set_grad_checkpointing(True)
    g_ckpt = grads()
    for name in g:
        torch.testing.assert_close(g_ckpt[name], g[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "r, counts", [(8, [65, 57, 49, 41]), (40, [65, 33, 17, 9]), ([10, 0], [65, 55, 55, 55])]
)
def test_token_counts_and_output_shape(clip, r, counts):
    model = copy.deepcopy(clip)
    apply_tome(model, r)
    assert tome_token_counts(65, r, 3) == counts
    seen = []  # tokens after each block's merge: the MLP runs on them
    for blk in model.visual.transformer.resblocks:
        blk.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.encode_image(images)
        assert seen == counts[1:]
        assert torch.equal(model.encode_image(images), out)  # deterministic
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the log-size bias follows the query's dtype
            low = model.encode_image(images)
    assert out.shape == low.shape == (2, 128)
    torch.testing.assert_close(low.float(), out, rtol=0.1, atol=0.1)


def test_rejects_bad_input(clip):
    model = copy.deepcopy(clip)
    with pytest.raises(ValueError):
        apply_tome(model, [1, 2, 3, 4])
    with pytest.raises(ValueError):
        apply_tome(model, -1)
    with pytest.raises(TypeError):
        apply_tome(torch.nn.Linear(2, 2), 4)
    remove_tome(model)  # no-op when unpatched


def test_a_tome_run_is_evaluated_and_served_with_the_same_merging(tiny_manifest, tmp_path):
    import json

    from tests.conftest import run_in_process
    from xmodal.models import resolve_model_config
    from xmodal.models.encoder import load_encoder
    from xmodal.models.tome import remove_tome

    cfg = resolve_model_config(ModelSpec("xm-micro"))
    cfg["vision_cfg"]["layers"] = 2  # (one block: the class token's output does not see the merge)
    (tmp_path / "two-blocks.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    model = str(tmp_path / "two-blocks.json")
    common = ["train", "--data", tiny_manifest, "--model", model, "--precision", "fp32", "--no-progress"]
    run_in_process(*common, "--batch-size", "8", "--steps", "2", "--tome", "2", "--out", run)
    enc = load_encoder(run, device="cpu")  # what eval, index and serve load
    tower = enc.model.visual.transformer
    assert tower.tome_r == [2, 2] and tower.tome_prop_attn is False
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        merged = enc.model.encode_image(x)
        remove_tome(enc.model)
        plain = enc.model.encode_image(x)
    assert not torch.allclose(merged, plain)  # the merging is in force after loading
    exported = run_in_process("export", run, tmp_path / "oc")
    assert exported.returncode == 0 and "tome" not in (tmp_path / "oc" / "model.json").read_text()
    bad = run_in_process(*common, "--batch-size", "8", "--steps", "2", "--tome", "2", "--objective",
                         "clip+filip", "--out", tmp_path / "bad", check=False)  # fmt: skip
    assert bad.returncode == 2 and "--tome 2: not with tokens yet" in bad.stderr
