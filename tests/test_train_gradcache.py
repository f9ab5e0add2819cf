"""Cached-feature accumulation is exact for stochastic towers (dropout, patch dropout); BatchNorm towers are
refused; the float16 loss scaler unscales before clipping and skips overflowed steps."""

import json

import pytest
import torch

from xmodal.errors import UserError
from xmodal.train import gradcache
from xmodal.train.batcher import Batcher
from xmodal.train.config import TrainConfig
from xmodal.train.trainer import Trainer

K = 4  # micro-batches


def _patch_dropout_config(tmp_path):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
            "mlp_ratio": 2,
            "patch_dropout": 0.5,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "micro-patch-dropout.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _trainer(tiny_manifest, tmp_path, **kw) -> Trainer:
    cfg = TrainConfig(
        data=str(tiny_manifest),
        out=str(tmp_path / "run"),
        batch_size=8,
        accum_steps=K,
        precision="fp32",
        progress=False,
        lr=1e-3,
        warmup=1,
        **kw,
    )
    return Trainer(cfg)


def _batch(trainer: Trainer):
    data = trainer._load(trainer.cfg.data)
    return Batcher(data, trainer.tokenizer, trainer.cfg, trainer.dist).get(0)


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _reference_grads(trainer: Trainer, images, tokens, seed: int) -> dict[str, torch.Tensor]:
    """The same loss in one differentiable pass: each micro-batch forward with gradients, in the same
    order and from the same RNG state as the accumulated step's first pass, so the masks are the same."""
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    micro = len(images) // K
    feats = [
        trainer._features(trainer._pixels(im, 0, i * micro), tk)
        for i, (im, tk) in enumerate(zip(images.chunk(K), tokens.chunk(K), strict=True))
    ]
    img, txt = torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats])
    scale, bias = trainer.model.logit_scale.exp(), trainer.model.logit_bias
    trainer.objective(img, txt, scale, bias)[0].backward()
    return _grads(trainer)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("tower", ["minilm_text", "patch_dropout_vision"])
def test_accumulated_gradient_equals_one_pass_with_the_same_masks(
    tiny_manifest, tmp_path, tower, monkeypatch
):
    if tower == "minilm_text":
        from xmodal.models import minilm_path

        trainer = _trainer(
            tiny_manifest, tmp_path, model="xm-micro", hf_text=str(minilm_path()), lock_text=True
        )
    else:
        trainer = _trainer(tiny_manifest, tmp_path, model=_patch_dropout_config(tmp_path))
    assert trainer.model.training
    images, tokens, _ = _batch(trainer)

    ref = _reference_grads(trainer, images, tokens, seed=123)
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    trainer.backward(0, images, tokens)
    assert _max_diff(_grads(trainer), ref) < 1e-5

    # The test has teeth: without replaying the RNG state the second pass draws new masks.
    class NoReplay:
        def __init__(self, *tensors):
            pass

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(gradcache, "RandContext", NoReplay)
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    trainer.backward(0, images, tokens)
    assert _max_diff(_grads(trainer), ref) > 1e-4


def test_rand_context_replays_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    ctx = gradcache.RandContext()
    first = torch.rand(5)
    after_first = torch.rand(3)
    torch.manual_seed(0)
    torch.rand(5)
    with ctx:
        again = torch.rand(5)
    assert torch.equal(first, again)
    assert torch.equal(torch.rand(3), after_first)  # the block did not advance the global stream


def test_batchnorm_tower_refuses_accumulation(tiny_manifest, tmp_path):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "rn-micro.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="BatchNorm.*--accum-steps 1"):
        _trainer(tiny_manifest, tmp_path, model=str(path))
    cfg1 = TrainConfig(
        data=str(tiny_manifest),
        out=str(tmp_path / "r1"),
        model=str(path),
        batch_size=8,
        precision="fp32",
        progress=False,
    )
    assert Trainer(cfg1).cfg.accum_steps == 1  # without accumulation the same tower trains


def test_grad_scaler_unscales_before_clipping_and_skips_overflowed_steps(tiny_manifest, tmp_path):
    """The float16 path's scaler logic, exercised on the CPU in fp32 (torch.amp.GradScaler('cpu'))."""

    def fresh(name, grad_clip=0.05):
        torch.manual_seed(0)
        cfg = TrainConfig(
            data=str(tiny_manifest),
            out=str(tmp_path / name),
            model="xm-micro",
            batch_size=8,
            accum_steps=2,
            precision="fp32",
            progress=False,
            lr=1e-3,
            warmup=1,
            grad_clip=grad_clip,
        )
        return Trainer(cfg)

    plain, scaled = fresh("plain"), fresh("scaled")
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    images, tokens, _ = _batch(plain)
    for t in (plain, scaled):
        t.train_step(0, images, tokens)
    wp, ws = plain.model.state_dict(), scaled.model.state_dict()
    assert max((wp[k] - ws[k]).abs().max().item() for k in wp) < 1e-6  # clipped the unscaled gradient

    over = fresh("over")
    over.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # loss × scale overflows float32
    before = {k: v.clone() for k, v in over.model.state_dict().items()}
    over.train_step(0, images, tokens)
    after = over.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # step skipped
    assert over.scaler.get_scale() == 2.0**126  # and the scale backed off
