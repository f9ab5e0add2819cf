"""mixup (m²-mix geodesic hard negatives, M3CoL mixed-sample contrast) against brute-force float64 references,
sharded exactly, with draws that depend only on (seed, step); bad parameters are one-line errors."""

import math

import numpy as np
import pytest
import torch

from tests.conftest import dot as _dot
from tests.conftest import unit_rows as _unit
from xmodal.errors import UserError
from xmodal.objectives import REGISTRY, Composite
from xmodal.objectives.mixup import slerp
from xmodal.objectives.registry import Features

T = 5.0


def _normalise(a):
    n = math.sqrt(_dot(a, a))
    return [v / n for v in a]


def _ce(logits, target):
    """−Σ_j target_j log softmax_j(logits)."""
    lse = math.log(sum(math.exp(v) for v in logits))
    return -sum(p * (v - lse) for p, v in zip(target, logits, strict=True))


def brute_m2mix(x, y, s, lam):
    x, y = x.tolist(), y.tolist()
    n = len(x)
    mixed = []
    for a, b in zip(x, y, strict=True):
        theta = math.acos(_dot(a, b))
        mixed.append(
            [
                p * math.sin(lam * theta) / math.sin(theta)
                + q * math.sin((1 - lam) * theta) / math.sin(theta)
                for p, q in zip(a, b, strict=True)
            ]
        )
    total = 0.0
    for anchors, partners in ((x, y), (y, x)):
        for i in range(n):
            logits = [s * _dot(anchors[i], mixed[j]) for j in range(n)]
            logits[i] = s * _dot(anchors[i], partners[i])
            total += _ce(logits, [float(j == i) for j in range(n)]) / n
    return total


def brute_m3col_side(x, y, s, perm, beta):
    """½[mixed x → y, soft targets P] + ½[y → mixed x, targets P's column], as the authors' mixco_nce."""
    x, y, perm, beta = x.tolist(), y.tolist(), perm.tolist(), beta.tolist()
    n = len(x)
    mixed = [
        _normalise([beta[g] * a + (1 - beta[g]) * b for a, b in zip(x[g], x[perm[g]], strict=True)])
        for g in range(n)
    ]
    target = [[0.0] * n for _ in range(n)]
    for g in range(n):
        target[g][g] += beta[g]
        target[g][perm[g]] += 1 - beta[g]
    forward = sum(_ce([s * _dot(mixed[g], y[j]) for j in range(n)], target[g]) for g in range(n)) / n
    backward = (
        sum(
            _ce([s * _dot(y[j], mixed[g]) for g in range(n)], [target[g][j] for g in range(n)])
            for j in range(n)
        )
        / n
    )
    return (forward + backward) / 2


def _features(x, y, s=slice(None), step=0):
    return Features(x[s], y[s], x, y, s.start or 0, torch.tensor(T, dtype=torch.float64), step=step)


def _mixup(spec):
    return Composite.from_config(spec).objectives[0][0]


@pytest.mark.parametrize("tau", [0.0, 0.1])
def test_m2mix_matches_brute_force_and_shards_exactly(tau):
    x, y = _unit(10, 5, 0), _unit(10, 5, 1)
    comp = Composite.from_config(f"mixup(kind=m2mix,tau={tau})")
    obj = comp.objectives[0][0]
    scale = 1 / tau if tau else T
    for step in (0, 7):
        whole = comp.objectives_terms(_features(x, y, step=step))["mixup"].item()
        assert abs(whole - brute_m2mix(x, y, scale, obj.m2mix_lambda(step))) < 1e-10
        halves = [
            comp.objectives_terms(_features(x, y, s, step))["mixup"].item()
            for s in (slice(0, 5), slice(5, 10))
        ]
        assert abs(sum(halves) / 2 - whole) < 1e-12


@pytest.mark.parametrize("mix", ["both", "image", "text"])
def test_m3col_matches_brute_force_and_shards_exactly(mix):
    x, y = _unit(12, 5, 2), _unit(12, 5, 3)
    comp = Composite.from_config(f"mixup(kind=m3col,mix={mix},p=0.7)")
    obj = comp.objectives[0][0]
    step = 3
    expect = 0.0
    if mix in ("both", "image"):
        perm, beta = obj.m3col_draws(12, step, salt=1)
        expect += brute_m3col_side(x, y, T, perm, beta)
    if mix in ("both", "text"):
        perm, beta = obj.m3col_draws(12, step, salt=2)
        expect += brute_m3col_side(y, x, T, perm, beta)
    whole = comp.objectives_terms(_features(x, y, step=step))["mixup"].item()
    assert abs(whole - expect) < 1e-10
    thirds = (slice(0, 4), slice(4, 8), slice(8, 12))
    parts = [comp.objectives_terms(_features(x, y, s, step))["mixup"].item() for s in thirds]
    assert abs(sum(parts) / 3 - whole) < 1e-12


def test_m3col_draws_follow_the_authors_recipe():
    obj = _mixup("mixup(kind=m3col)")
    assert obj.alpha == 0.15  # the authors' --mixup_beta
    perm, beta = obj.m3col_draws(4000, 5, salt=1)
    assert sorted(perm.tolist()) == list(range(4000))
    unmixed = (beta == 1).double().mean().item()
    assert abs(unmixed - 0.5) < 0.05  # s_thresh: half the rows are mixed
    mixed = beta[beta < 1]
    assert ((mixed > 0) & (mixed < 1)).all()
    assert ((mixed < 0.1) | (mixed > 0.9)).double().mean() > 0.5  # Beta(0.15, 0.15) is U-shaped
    # p = 0: nothing is mixed, the targets are one-hot, and each side is CLIP
    x, y = _unit(8, 4, 4), _unit(8, 4, 5)
    none = Composite.from_config("mixup(kind=m3col,p=0)").objectives_terms(_features(x, y, step=2))["mixup"]
    clip = Composite.from_config("clip").objectives_terms(_features(x, y))["clip"]
    assert abs(none.item() - 2 * clip.item()) < 1e-12


def test_a_row_mixed_with_itself_keeps_target_one():
    """Where π(g) = g the mixed row is the row itself: its target must be 1, not the authors' 1 − β."""
    obj = _mixup("mixup(kind=m3col,p=1)")
    for step in range(200):
        perm, beta = obj.m3col_draws(6, step, salt=1)
        fixed = (perm == torch.arange(6)) & (beta < 1)
        if fixed.any():
            break
    assert fixed.any()
    x, y = _unit(6, 4, 6), _unit(6, 4, 7)
    got = obj.terms(_features(x, y, step=step))["mixup"].item()
    expect = brute_m3col_side(x, y, T, perm, beta) + brute_m3col_side(
        y, x, T, *obj.m3col_draws(6, step, salt=2)
    )
    assert abs(got - expect) < 1e-10  # the brute force adds the two parts, so row g has target 1


def test_draws_depend_on_seed_and_step_only():
    a, b = _mixup("mixup"), _mixup("mixup")
    assert a.alpha == 0.5  # the authors' script: --beta2 0.5
    lams = [a.m2mix_lambda(s) for s in range(50)]
    assert lams == [b.m2mix_lambda(s) for s in range(50)]
    assert len(set(lams)) == 50 and all(0 < v < 1 for v in lams)
    assert lams[0] == np.random.default_rng([0, 0, 0]).beta(0.5, 0.5)
    assert _mixup("mixup(seed=1)").m2mix_lambda(0) != lams[0]
    x, y = _unit(6, 4, 8), _unit(6, 4, 9)
    v = [a.terms(_features(x, y, step=s))["mixup"].item() for s in (4, 4, 5)]
    assert v[0] == v[1] != v[2]


def test_slerp_stays_on_the_sphere_with_the_authors_endpoints():
    a, b = _unit(5, 6, 10), _unit(5, 6, 11)
    for lam in (0.0, 0.3, 1.0):
        m = slerp(a, b, lam)
        assert torch.allclose(m.norm(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(slerp(a, b, 1.0), a, atol=1e-9)  # sph_inter(a, b, 1) = a
    assert torch.allclose(slerp(a, b, 0.0), b, atol=1e-9)
    # identical image and text embeddings: θ is clamped, no 0/0, finite gradients
    x = _unit(4, 3, 12).requires_grad_()
    loss = _mixup("mixup").terms(Features(x, x, x, x, 0, torch.tensor(T, dtype=torch.float64)))["mixup"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_mixup_is_listed_and_bad_params_are_one_line_errors():
    assert REGISTRY["mixup"].needs == frozenset({"pooled"})
    for spec, needle in [
        ("mixup(kind=cutmix)", "--objective mixup: kind must be one of m2mix, m3col"),
        ("mixup(mix=audio)", "--objective mixup: mix must be one of both, image, text"),
        ("mixup(alpha=-1)", "--objective mixup: alpha must be > 0"),
        ("mixup(tau=-0.1)", "--objective mixup: tau must be > 0"),
        ("mixup(p=1.5)", "--objective mixup: p must be in [0, 1]"),
        ("mixup(seed=-3)", "--objective mixup: seed must be >= 0"),
    ]:
        with pytest.raises(UserError) as e:
            Composite.from_config(spec)
        assert needle in str(e.value) and "\n" not in str(e.value), spec
