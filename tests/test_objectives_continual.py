"""`modx` (Mod-X) against a float64 brute force and against a literal port of the authors' code (value and
gradients), `bct` against a brute force; exact sharding; `--init-from OLD --objective clip+modx` keeps the
old model frozen and exact."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import dot, log_softmax, run_in_process, unit_rows, write_tiny_manifest
from xmodal.errors import UserError
from xmodal.objectives import Composite
from xmodal.objectives.registry import Features
from xmodal.train.config import TrainConfig
from xmodal.train.trainer import Trainer


def pairs(seed=0, n=10, d=6):
    """New features x, y and old ones u, v close enough that the old model ranks some rows right."""
    x, y = unit_rows(n, d, seed), unit_rows(n, d, seed + 1)
    u = F.normalize(x + 0.6 * unit_rows(n, d, seed + 2), dim=1)
    v = F.normalize(x + 0.6 * unit_rows(n, d, seed + 3), dim=1)  # old texts near the old images' pairs
    return x, y, u, v


OLD_SCALE = 7.0


def features(x, y, u, v, s=slice(None)):
    return Features(
        x[s], y[s], x, y, s.start or 0, torch.tensor(1.0, dtype=torch.float64),
        teacher_image=u[s], teacher_text=v[s], all_teacher_image=u, all_teacher_text=v,
        teacher_logit_scale=torch.tensor(OLD_SCALE, dtype=torch.float64),
    )  # fmt: skip


def brute_modx(x, y, u, v, t):
    """The paper's term from loops: rows the old model gets wrong take the new row (KL 0), sum of KLs."""

    def side(a, b, p, q):
        total = 0.0
        for i in range(len(a)):
            new = [dot(a[i], b[j]) / t for j in range(len(b))]
            old = [dot(p[i], q[j]) / t for j in range(len(q))]
            if max(range(len(old)), key=old.__getitem__) != i:
                old = new  # cognition align
            lo, ln = log_softmax(old), log_softmax(new)
            total += sum(math.exp(a_) * (a_ - b_) for a_, b_ in zip(lo, ln, strict=True))
        return total

    rows = [r.tolist() for r in (x, y, u, v)]
    return (side(rows[0], rows[1], rows[2], rows[3]) + side(rows[1], rows[0], rows[3], rows[2])) / 2


def authors_port(x, y, u, v):
    """`ModX_Training/continue_train_model.py`'s distillation term, line for line (t = 1)."""

    def cognition_align(old, new):
        index = torch.max(old, 1)[1]
        for i in range(old.shape[0]):
            if index[i] != i:
                old[i] = new[i]
        return old, new

    old_i2t, per_image = cognition_align(u @ v.t(), x @ y.t())
    old_t2i, per_text = cognition_align(v @ u.t(), y @ x.t())
    kl_img = F.kl_div(per_image.softmax(dim=-1).log(), old_i2t.softmax(dim=-1), reduction="sum")
    kl_txt = F.kl_div(per_text.softmax(dim=-1).log(), old_t2i.softmax(dim=-1), reduction="sum")
    return (kl_img + kl_txt) / 2


@pytest.mark.parametrize("t", [1.0, 0.1])
def test_modx_matches_brute_force_and_shards_exactly(t):
    x, y, u, v = pairs()
    comp = Composite.from_config(f"modx(t={t})")
    got = comp.objectives_terms(features(x, y, u, v))["modx"].item()
    want = brute_modx(x, y, u, v, t)
    kept = ((u @ v.T).argmax(1) == torch.arange(len(u))).sum().item()
    assert 0 < kept < len(u)  # both kinds of row occur
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12) and want > 0
    n = len(x) // 2
    parts = [
        comp.objectives_terms(features(x, y, u, v, s))["modx"].item() for s in (slice(0, n), slice(n, None))
    ]
    assert sum(parts) / 2 == pytest.approx(want, rel=1e-10)


def test_modx_value_and_gradients_equal_the_authors_code():
    x, y, u, v = pairs(seed=4, n=12, d=8)
    leaves = [a.clone().requires_grad_(True) for a in (x, y)]
    ours = Composite.from_config("modx").objectives_terms(features(*leaves, u, v))["modx"]
    ours.backward()
    ref_leaves = [a.clone().requires_grad_(True) for a in (x, y)]
    ref = authors_port(*ref_leaves, u, v)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_modx_is_zero_when_nothing_changed_and_checks_its_inputs():
    x, y, _, _ = pairs()
    assert Composite.from_config("modx").objectives_terms(features(x, y, x, y))[
        "modx"
    ].item() == pytest.approx(0, abs=1e-12)
    with pytest.raises(UserError, match="t=0"):
        Composite.from_config("modx(t=0)")
    with pytest.raises(ValueError, match="old model"):
        Composite.from_config("modx").objectives_terms(Features(x, y, x, y, 0, torch.tensor(1.0)))


def test_init_from_old_run_gives_modx_a_frozen_exact_copy_of_it(tmp_path):
    data = write_tiny_manifest(tmp_path / "tiny")
    fast = [
        "--precision",
        "fp32",
        "--no-progress",
        "--batch-size",
        "8",
        "--warmup",
        "1",
        "--model",
        "xm-micro",
    ]
    old = tmp_path / "old"
    run_in_process("train", "--data", data, "--out", old, "--steps", "3", *fast)
    old_w = torch.load(old / "checkpoints" / "latest.pt", weights_only=True)["model"]
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "new"), model="xm-micro", init_from=str(old), steps=3,
        batch_size=8, precision="fp32", progress=False, objective="clip+modx:0.5", warmup=1,
    )  # fmt: skip
    tr = Trainer(cfg)
    assert all(torch.equal(tr.teacher.state_dict()[k], w) for k, w in old_w.items())
    assert all(torch.equal(tr.model.state_dict()[k], w) for k, w in old_w.items())
    tr.fit()
    assert all(not p.requires_grad and p.grad is None for p in tr.teacher.parameters())
    assert all(torch.equal(tr.teacher.state_dict()[k], w) for k, w in old_w.items())  # never moved
    new_w = torch.load(tmp_path / "new" / "checkpoints" / "latest.pt", weights_only=True)["model"]
    assert any(not torch.equal(new_w[k], w) for k, w in old_w.items())  # the new model did train
    # A resumed continual run rebuilds its frozen old model from --init-from, not from its own weights.
    again = Trainer(TrainConfig(**{**cfg.__dict__, "steps": 4}), resume=True)
    assert all(torch.equal(again.teacher.state_dict()[k], w) for k, w in old_w.items())


def brute_bct(x, y, u, v, scale):
    """Cross-entropy of each new image over the old texts (and each new text over the old images)."""

    def side(a, q):
        total = 0.0
        for i in range(len(a)):
            total -= log_softmax([scale * dot(a[i], q[j]) for j in range(len(q))])[i]
        return total / len(a)

    x, y, u, v = (r.tolist() for r in (x, y, u, v))
    return (side(x, v) + side(y, u)) / 2


@pytest.mark.parametrize("t", [0.0, 0.25])
def test_bct_matches_brute_force_and_shards_exactly(t):
    x, y, u, v = pairs(seed=7)
    comp = Composite.from_config(f"bct(t={t})")
    want = brute_bct(x, y, u, v, OLD_SCALE if t == 0 else 1 / t)
    assert comp.objectives_terms(features(x, y, u, v))["bct"].item() == pytest.approx(want, rel=1e-10)
    n = len(x) // 2
    parts = [
        comp.objectives_terms(features(x, y, u, v, s))["bct"].item() for s in (slice(0, n), slice(n, None))
    ]
    assert sum(parts) / 2 == pytest.approx(want, rel=1e-10)
    # compatible new features (the old ones themselves) score better than unrelated ones
    assert comp.objectives_terms(features(u, v, u, v))["bct"].item() < want


def test_bct_refuses_another_width():
    x, y, _, _ = pairs()
    u, v = unit_rows(10, 4, 1), unit_rows(10, 4, 2)
    with pytest.raises(UserError, match="old width"):
        Composite.from_config("bct").objectives_terms(features(x, y, u, v))
