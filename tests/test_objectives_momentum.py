"""momentum (ALBEF ITC with queues and momentum distillation): the formula against loops, the sharding
exactness, the queue's ring buffer, and an exact resume of a run with an EMA model and queues."""

import json
import math
import shutil

import pytest
import torch

from tests.conftest import unit_rows as _unit
from xmodal.errors import UserError
from xmodal.objectives import Composite, Features
from xmodal.train.config import TrainConfig
from xmodal.train.trainer import Trainer


def _features(x, y, xm, ym, rows=slice(None), t=5.0, step=0):
    start = rows.start or 0
    return Features(
        x[rows], y[rows], x, y, start, torch.tensor(t, dtype=torch.float64),
        momentum_image=xm[rows], momentum_text=ym[rows], all_momentum_image=xm, all_momentum_text=ym,
        step=step,
    )  # fmt: skip


def brute(x, y, xm, ym, qx, qy, t, alpha):
    """ALBEF's loss_ita, written out with loops: keys = global momentum batch then the queue."""
    keys_y, keys_x = list(ym) + list(qy), list(xm) + list(qx)
    total = 0.0
    for queries, queries_m, keys in ((x, xm, keys_y), (y, ym, keys_x)):
        for i in range(len(queries)):
            s = [t * float(queries[i] @ k) for k in keys]
            s_m = [t * float(queries_m[i] @ k) for k in keys]
            lse, lse_m = math.log(sum(map(math.exp, s))), math.log(sum(map(math.exp, s_m)))
            for j in range(len(keys)):
                target = alpha * math.exp(s_m[j] - lse_m) + (1 - alpha) * (1.0 if j == i else 0.0)
                total -= target * (s[j] - lse) / len(queries)
    return total / 2


def test_matches_albef_itc_with_queue_and_shards_exactly():
    b, d = 6, 5
    x, y, xm, ym = (_unit(b, d, s) for s in range(4))
    qx, qy = _unit(4, d, 10), _unit(4, d, 11)
    comp = Composite.from_config("momentum(queue=4,alpha=0.3)")
    obj = comp.objectives[0][0]
    obj.queue_image, obj.queue_text, obj.filled = qx.clone(), qy.clone(), 4
    whole = comp.objectives_terms(_features(x, y, xm, ym))["momentum"].item()
    assert abs(whole - brute(x, y, xm, ym, qx, qy, 5.0, 0.3)) < 1e-10
    halves = [
        comp.objectives_terms(_features(x, y, xm, ym, s))["momentum"].item()
        for s in (slice(0, 3), slice(3, 6))
    ]
    assert abs(sum(halves) / 2 - whole) < 1e-12
    # α = 0 and an empty queue: CLIP's InfoNCE with the momentum features as keys
    plain = Composite.from_config("momentum(alpha=0)")
    clip = Composite.from_config("clip")
    got = plain.objectives_terms(_features(x, y, x, y))["momentum"].item()
    want = clip.objectives_terms(Features(x, y, x, y, 0, torch.tensor(5.0, dtype=torch.float64)))["clip"]
    assert abs(got - want.item()) < 1e-12


def test_alpha_warmup_and_queue_ring_buffer():
    obj = Composite.from_config("momentum(queue=5,alpha=0.4,warmup=10)").objectives[0][0]
    assert obj.alpha_at(0) == 0 and abs(obj.alpha_at(5) - 0.2) < 1e-12 and obj.alpha_at(50) == 0.4
    d = 3
    seen = []
    for step in range(4):  # 3 rows per step into 5 slots: wraps on the second step
        x, y = _unit(3, d, 20 + step), _unit(3, d, 40 + step)
        obj.terms(_features(x, y, x, y, step=step))
        obj.commit()
        seen += list(x)
    assert obj.filled == 5 and obj.ptr == (4 * 3) % 5
    kept = {tuple(r.tolist()) for r in obj.queue_image}
    assert kept == {tuple(r.tolist()) for r in seen[-5:]}  # the five newest, oldest out
    state = obj.state_dict()
    other = Composite.from_config("momentum(queue=5)").objectives[0][0]
    other.load_state_dict(state)
    assert torch.equal(other.queue_text, obj.queue_text) and other.ptr == obj.ptr
    with pytest.raises(UserError, match="queue"):
        Composite.from_config("momentum(queue=6)").objectives[0][0].load_state_dict(state)
    with pytest.raises(UserError, match="momentum"):
        Composite.from_config("momentum(momentum=1.5)")


def _cfg(manifest, out, objective, steps=6):
    return TrainConfig(
        data=str(manifest), out=str(out), model="xm-micro", steps=steps, batch_size=8, precision="fp32",
        progress=False, log_every=1, save_every=3, objective=objective,
        lr=1e-3, warmup=2, aug_crop_scale=0.8,
    )  # fmt: skip


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize(
    "objective",
    [
        "clip+momentum:0.5(queue=12,momentum=0.9)",
        "clip+cwcl:0.5(targets=teacher)",
        "mod(queue=12,momentum=0.9)+itm(synth=true)+mlm",  # the EMA copy holds the fusion encoder too
    ],
)
def test_resume_with_momentum_model_queues_or_teacher_is_exact(tiny_manifest, tmp_path, objective):
    """An EMA model, feature queues and a frozen teacher (the initial model, rebuilt on resume) all
    continue exactly: the resumed run's losses and weights are the uninterrupted run's."""
    momentum = "momentum" in objective or "mod" in objective
    key = "mod" if "mod" in objective else "momentum"
    ref = Trainer(_cfg(tiny_manifest, tmp_path / "ref", objective)).fit()
    cut = tmp_path / "cut"  # the same run, as if it had stopped after step 3
    shutil.copytree(ref, cut)
    ckpts = cut / "checkpoints"
    for name in ("latest.pt", "step_6.pt"):
        (ckpts / name).unlink()
    shutil.copy(ckpts / "step_3.pt", ckpts / "latest.pt")
    state3 = torch.load(ckpts / "latest.pt", weights_only=True)
    if momentum:
        assert state3["objectives"][key]["filled"] == 12 and state3["momentum_model"] is not None
    Trainer(_cfg(tiny_manifest, cut, objective), resume=True).fit()
    a, b = _losses(ref), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, step
    sa = torch.load(ref / "checkpoints" / "latest.pt", weights_only=True)
    sb = torch.load(cut / "checkpoints" / "latest.pt", weights_only=True)
    for part in ("model", "momentum_model") if momentum else ("model",):
        for k in sa[part]:
            assert torch.allclose(sa[part][k], sb[part][k], atol=1e-6), (part, k)
    if not momentum:
        return
    qa, qb = sa["objectives"][key], sb["objectives"][key]
    assert torch.allclose(qa["queue_text"], qb["queue_text"], atol=1e-6) and qa["ptr"] == qb["ptr"]
    # the EMA really lags the model: it is neither the initial nor the current weights
    for name in [next(k for k in sa["model"] if "proj" in k)] + [k for k in sa["model"] if "fusion." in k][
        :1
    ]:
        assert not torch.allclose(sa["model"][name], sa["momentum_model"][name]), name
