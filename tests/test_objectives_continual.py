"""`modx` (Mod-X) and `ctp` (CTP's topology preservation) against a float64 brute force and against a
literal port of the authors' code (value and gradients), `bct` against a brute force, CTP's compatible
momentum contrast against a brute force with its queue; exact sharding; `--init-from OLD --objective
clip+modx` (or `clip+ctp`) keeps the old model frozen and exact, and CTP's EMA follows its anchored rule."""

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


@pytest.mark.parametrize("objective", ["clip+modx:0.5", "clip+ctp(momentum=0.9,queue=16)"])
def test_init_from_old_run_gives_the_continual_objective_a_frozen_exact_copy_of_it(tmp_path, objective):
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
        batch_size=8, precision="fp32", progress=False, objective=objective, warmup=1, save_every=1,
        keep_checkpoints=3,
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
    if "momentum" not in objective:
        return
    # CTP's compatible EMA, from θ_m = θ_old: θ_m ← 0.9·θ_m + 0.05·θ + 0.05·θ_old after every step
    names = [n for n, _ in tr.model.named_parameters()]
    want = {k: old_w[k].double() for k in names}
    plain = dict(want)  # what the plain EMA θ_m ← 0.9·θ_m + 0.1·θ would give
    for step in (1, 2, 3):
        saved = torch.load(tmp_path / "new" / "checkpoints" / f"step_{step}.pt", weights_only=True)
        live = {k: saved["model"][k].double() for k in names}
        want = {k: 0.9 * want[k] + 0.05 * live[k] + 0.05 * old_w[k].double() for k in names}
        plain = {k: 0.9 * plain[k] + 0.1 * live[k] for k in names}
        ema = {k: saved["momentum_model"][k].double() for k in names}
        assert max((ema[k] - want[k]).abs().max().item() for k in names) < 1e-6, step
    assert max((ema[k] - plain[k]).abs().max().item() for k in names) > 1e-5  # the test tells them apart
    with pytest.raises(UserError, match="anchored"):  # a --teacher is no previous model to anchor on
        Trainer(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "t"), "teacher": str(old)}))


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


# -- ctp ---------------------------------------------------------------------------------------------------


def brute_ctp(x, y, u, v, t):
    """CTP's topology preservation from loops: for each row, KL(old softmax ‖ new softmax) over the batch's
    columns (cross-modal rows whole, same-modal rows without the sample's own column), a mean over rows."""

    def side(a, b, p, q, skip_own):
        total = 0.0
        for i in range(len(a)):
            cols = [j for j in range(len(b)) if not (skip_own and j == i)]
            lo = log_softmax([dot(p[i], q[j]) / t for j in cols])
            ln = log_softmax([dot(a[i], b[j]) / t for j in cols])
            total += sum(math.exp(o) * (o - n) for o, n in zip(lo, ln, strict=True))
        return total / len(a)

    x, y, u, v = (r.tolist() for r in (x, y, u, v))
    cross = (side(x, y, u, v, False) + side(y, x, v, u, False)) / 2
    same = (side(x, x, u, u, True) + side(y, y, v, v, True)) / 2
    return cross + same


def ctp_authors_port(x, y, u, v, temp=0.07):
    """`CLIP_Pretrain.CTP` (models/clip_pretrain.py of KevinLight831/CTP), its topology terms line for line,
    one process (rank 0, so the gathers are the identity)."""
    batch_size = x.shape[0]
    mask_index = torch.arange(0, batch_size).unsqueeze_(-1)
    sim_i2t, sim_t2i = x @ y.T, y @ x.T
    sim_i2i = (x @ x.T).scatter(1, mask_index, -1000)
    sim_t2t = (y @ y.T).scatter(1, mask_index, -1000)
    with torch.no_grad():
        sim_i2t_ref, sim_t2i_ref = u @ v.T, v @ u.T
        sim_i2i_ref = (u @ u.T).scatter(1, mask_index, -1000)
        sim_t2t_ref = (v @ v.T).scatter(1, mask_index, -1000)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    loss = 0 * x.sum()
    loss_i2t = kl(F.log_softmax(sim_i2t / temp, dim=1), F.softmax(sim_i2t_ref / temp, dim=1))
    loss_t2i = kl(F.log_softmax(sim_t2i / temp, dim=1), F.softmax(sim_t2i_ref / temp, dim=1))
    loss = loss + (loss_i2t + loss_t2i) / 2
    loss_cos_i = kl(F.log_softmax(sim_i2i / temp, dim=1), F.softmax(sim_i2i_ref / temp, dim=1))
    loss_cos_t = kl(F.log_softmax(sim_t2t / temp, dim=1), F.softmax(sim_t2t_ref / temp, dim=1))
    return loss + (loss_cos_i + loss_cos_t) / 2


@pytest.mark.parametrize("t", [0.07, 0.5, 3.0])
def test_ctp_matches_brute_force_and_shards_exactly(t):
    x, y, u, v = pairs(seed=11)
    comp = Composite.from_config(f"ctp(t={t})")
    want = brute_ctp(x, y, u, v, t)
    got = comp.objectives_terms(features(x, y, u, v))
    assert set(got) == {"ctp"} and want > 0
    assert got["ctp"].item() == pytest.approx(want, rel=1e-10)
    n = len(x) // 2  # two ranks: each its rows' mean against the whole batch; their average is the whole
    parts = [
        comp.objectives_terms(features(x, y, u, v, s))["ctp"].item() for s in (slice(0, n), slice(n, None))
    ]
    assert sum(parts) / 2 == pytest.approx(want, rel=1e-10)


def test_ctp_value_and_gradients_equal_the_authors_code():
    x, y, u, v = pairs(seed=5, n=12, d=8)
    leaves = [a.clone().requires_grad_(True) for a in (x, y)]
    ours = Composite.from_config("ctp").objectives_terms(features(*leaves, u, v))["ctp"]
    ours.backward()
    ref_leaves = [a.clone().requires_grad_(True) for a in (x, y)]
    ref = ctp_authors_port(*ref_leaves, u, v)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10) and ref.item() > 0
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_ctp_gradient_reaches_the_new_features_only_and_vanishes_when_nothing_changed():
    x, y, u, v = pairs(seed=3)
    new = [a.clone().requires_grad_(True) for a in (x, y)]
    old = [a.clone().requires_grad_(True) for a in (u, v)]
    comp = Composite.from_config("ctp")
    total, terms = comp(*new, torch.tensor(1.0), teacher_image=old[0], teacher_text=old[1])
    total.backward()
    assert all(a.grad is not None and a.grad.abs().max() > 1e-2 for a in new)
    assert all(a.grad is None for a in old)  # the old model's features are detached: it never moves
    same = [a.clone().requires_grad_(True) for a in (u, v)]
    total, _ = comp(*same, torch.tensor(1.0), teacher_image=u, teacher_text=v)
    total.backward()
    assert total.item() == pytest.approx(0, abs=1e-12)
    assert all(a.grad.abs().max() < 1e-6 for a in same)  # float32 (the gather's cast): rounding only


def brute_momentum_contrast(q, keys_m, queue, t):
    """Mean over rows of −log softmax(q_i · [keys_m; queue]ᵀ / t)_i."""
    keys = keys_m.tolist() + queue.tolist()
    total = 0.0
    for i, row in enumerate(q.tolist()):
        total -= log_softmax([dot(row, k) / t for k in keys])[i]
    return total / len(q)


def test_ctp_compatible_momentum_contrast_matches_brute_force_with_its_queue():
    comp = Composite.from_config("ctp(momentum=0.9,queue=6)")
    assert comp.needs == {"pooled", "teacher", "momentum"} and comp.ema_decay == 0.9
    assert comp.ema_anchor == 0.5 and Composite.from_config("ctp").needs == {"pooled", "teacher"}
    queue_i, queue_t = torch.empty(0, 6, dtype=torch.float64), torch.empty(0, 6, dtype=torch.float64)
    for step in range(3):  # batches of 4: the queue of 6 holds the last 6 momentum rows, newest last
        x, y, u, v = pairs(seed=20 + step, n=4)
        xm, ym = F.normalize(x + 0.3 * u, dim=1), F.normalize(y + 0.3 * v, dim=1)
        f = features(x, y, u, v)
        f.momentum_image, f.momentum_text, f.all_momentum_image, f.all_momentum_text = xm, ym, xm, ym
        got = comp.objectives_terms(f)
        want = (
            brute_momentum_contrast(x, ym, queue_t, 0.07) + brute_momentum_contrast(y, xm, queue_i, 0.07)
        ) / 2
        assert got["ctp_momentum"].item() == pytest.approx(want, rel=1e-10), step
        assert got["ctp"].item() == pytest.approx(brute_ctp(x, y, u, v, 0.07), rel=1e-10)
        comp.commit()
        queue_i, queue_t = torch.cat([queue_i, xm])[-6:], torch.cat([queue_t, ym])[-6:]
    state = comp.state_dict()["ctp"]  # saved with the checkpoint, restored on resume
    assert state["filled"] == 6 and len(state["queue_image"]) == 6
    again = Composite.from_config("ctp(momentum=0.9,queue=6)")
    again.load_state_dict(comp.state_dict())
    assert torch.equal(again.state_dict()["ctp"]["queue_text"], state["queue_text"])


def test_ctp_checks_its_parameters_and_inputs():
    x, y, _, _ = pairs()
    for bad, needle in [("t=0", "t=0"), ("momentum=1", "momentum=1"), ("queue=-1", "queue"),
                        ("anchor=2", "anchor")]:  # fmt: skip
        with pytest.raises(UserError, match=needle):
            Composite.from_config(f"ctp({bad})")
    with pytest.raises(ValueError, match="old model"):
        Composite.from_config("ctp").objectives_terms(Features(x, y, x, y, 0, torch.tensor(1.0)))
    with pytest.raises(UserError, match="anchors"):  # one EMA model cannot follow two update rules
        _ = Composite.from_config("momentum+ctp(momentum=0.995)").ema_anchor
    assert Composite.from_config("momentum+ctp(momentum=0.995,anchor=0)").ema_anchor == 0.0
