"""FLIP patch dropout: open_clip's count and a uniform subset (brute force), each row's draw a function of its
place in the global batch (slices = the whole), whole runs equal under GradCache, the unmasked tuning steps
and evaluation see every patch, bad flags are one-line errors."""

import pytest
import torch
from open_clip.transformer import PatchDropout

from tests.conftest import run_in_process
from tests.test_train import MICRO, micro_curve
from xmodal.models.patch_dropout import SeededPatchDropout, kept_patches
from xmodal.train.batcher import stable_seed
from xmodal.train.config import TrainConfig
from xmodal.train.trainer import Trainer


def _tokens(b: int, n: int, d: int = 4) -> torch.Tensor:
    return torch.randn(b, 1 + n, d, generator=torch.Generator().manual_seed(b * 100 + n))


@pytest.mark.parametrize("n,prob", [(16, 0.5), (16, 0.75), (64, 0.5), (63, 0.25), (3, 0.9)])
def test_keeps_open_clips_count_of_a_uniform_subset_and_the_class_token(n, prob):
    b, step = 6, 7
    x = _tokens(b, n)
    drop = SeededPatchDropout(prob, seed=3).train()
    drop.at(step, 0, b)
    out = drop(x)

    oc = PatchDropout(prob).train()
    assert out.shape == oc(x).shape == (b, 1 + kept_patches(n, prob), x.shape[-1])
    # brute force: the kept patches are the k largest of the row's seeded uniform draws, in patch order
    rand = torch.rand(b, n, generator=torch.Generator().manual_seed(stable_seed(3, step, 13)))
    k = kept_patches(n, prob)
    for r in range(b):
        keep = sorted(sorted(range(n), key=lambda j: -rand[r, j].item())[:k])
        want = torch.cat([x[r, :1], x[r, 1:][keep]])
        assert torch.equal(out[r], want)


def test_each_row_draws_by_its_place_in_the_global_batch():
    b, n = 8, 16
    x = _tokens(b, n)
    drop = SeededPatchDropout(0.5, seed=0).train()
    drop.at(2, 0, b)
    whole = drop(x)
    parts = []
    for off in (0, 3, 5):  # uneven slices, as micro-batches or ranks of the same step
        end = {0: 3, 3: 5, 5: 8}[off]
        drop.at(2, off, b)
        parts.append(drop(x[off:end]))
    assert torch.equal(torch.cat(parts), whole)
    drop.at(3, 0, b)  # another step draws other patches
    assert not torch.equal(drop(x), whole)


def test_eval_mode_and_inactive_draws_see_every_patch():
    x = _tokens(4, 16)
    drop = SeededPatchDropout(0.5).train()
    assert torch.equal(drop(x), x)  # no draw said yet
    drop.at(0, 0, 4, active=False)
    assert torch.equal(drop(x), x)
    drop.at(0, 0, 4)
    assert drop(x).shape[1] == 9
    assert torch.equal(drop.eval()(x), x)


def _seen_tokens(trainer: Trainer) -> list[tuple[bool, int]]:
    """(training?, token count) of every image-tower forward, recorded at ln_pre."""
    seen: list[tuple[bool, int]] = []
    visual = trainer.model.visual
    visual.ln_pre.register_forward_pre_hook(lambda m, a: seen.append((visual.training, a[0].shape[1])))
    return seen


def test_unmasked_tuning_steps_and_validation_see_every_patch(tiny_manifest, tmp_path):
    cfg = TrainConfig(
        data=str(tiny_manifest),
        val=str(tiny_manifest),
        out=str(tmp_path / "run"),
        model="xm-micro",
        batch_size=8,
        steps=5,
        patch_dropout=0.75,
        unmasked_steps=2,
        precision="fp32",
        progress=False,
        warmup=1,
    )
    trainer = Trainer(cfg)
    seen = _seen_tokens(trainer)
    trainer.fit()
    train = [t for training, t in seen if training]
    # xm-micro: 32 px / patch 8 = 16 patches + the class token; 0.75 dropped keeps 4
    assert train == [5, 5, 5, 17, 17]
    assert {t for training, t in seen if not training} == {17}  # the final validation
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "patch_dropout: 0.75" in saved and "unmasked_steps: 2" in saved


def test_gradcache_micro_batches_drop_what_the_whole_batch_drops(tiny_manifest, tmp_path):
    whole = micro_curve(tiny_manifest, tmp_path / "whole", "--patch-dropout", "0.5")
    accum = micro_curve(tiny_manifest, tmp_path / "accum", "--patch-dropout", "0.5", "--accum-steps", "2")
    plain = micro_curve(tiny_manifest, tmp_path / "plain")
    assert len(whole) == 4
    assert max(abs(a - b) for a, b in zip(whole, accum, strict=True)) < 1e-5
    assert max(abs(a - b) for a, b in zip(whole, plain, strict=True)) > 1e-3  # dropout changed the steps


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--patch-dropout", "1.0"], "--patch-dropout 1.0: the share of patches dropped, in [0, 1)"),
        (["--unmasked-steps", "2"], "--unmasked-steps tunes without patch dropout"),
        (["--patch-dropout", "0.5", "--unmasked-steps", "3"], "--unmasked-steps 3: the run has 3 steps"),
        (["--patch-dropout", "0.5", "--compile"], "not with --compile yet"),
        (["--patch-dropout", "0.5", "--objective", "clip+filip"], "not with tokens yet"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_manifest, tmp_path, flags, needle):
    common = ["train", "--data", tiny_manifest, *MICRO, "--batch-size", "8", "--steps", "3"]
    p = run_in_process(*common, "--out", tmp_path / "r", *flags, check=False)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
