"""affinity (TinyCLIP) and feature (CLIP-KD) against brute-force float64 references, sharded exactly."""

import math

import pytest
import torch

from tests.conftest import dot, log_softmax, unit_rows
from xmodal.errors import UserError
from xmodal.objectives import Composite
from xmodal.objectives.registry import Features

S, ST = 7.0, 11.0  # student and teacher logit scales


def brute_kl(rows, cols, t_rows, t_cols, s, st):
    """(1/n) Σ_i KL(softmax_j(st <t_rows_i, t_cols_j>) ‖ softmax_j(s <rows_i, cols_j>))."""
    n, total = len(rows), 0.0
    for i in range(n):
        ls = log_softmax([s * dot(rows[i], c) for c in cols])
        lt = log_softmax([st * dot(t_rows[i], c) for c in t_cols])
        total += sum(math.exp(lt[j]) * (lt[j] - ls[j]) for j in range(len(cols))) / n
    return total


def brute_affinity(x, y, u, v, s, st):
    x, y, u, v = (a.tolist() for a in (x, y, u, v))
    return (brute_kl(x, y, u, v, s, st) + brute_kl(y, x, v, u, s, st)) / 2


def brute_feature(x, y, u, v, dist, w=None):
    def one(a, b):
        a, b = a.tolist(), b.tolist()
        if w is not None:
            a = [[dot(row, wk) for wk in w.tolist()] for row in a]  # P(x)_k = <w_k, x>
        if dist == "l2":
            return sum(
                sum((p - q) ** 2 for p, q in zip(r, t, strict=True)) for r, t in zip(a, b, strict=True)
            ) / len(a)
        cos = [dot(r, t) / math.sqrt(dot(r, r) * dot(t, t)) for r, t in zip(a, b, strict=True)]
        return sum(1 - c for c in cos) / len(a)

    return (one(x, u) + one(y, v)) / 2


def features(x, y, u, v, s=slice(None), proj=None):
    start = s.start or 0
    return Features(
        x[s], y[s], x, y, start, torch.tensor(S, dtype=torch.float64),
        teacher_image=u[s], teacher_text=v[s], all_teacher_image=u, all_teacher_text=v,
        teacher_logit_scale=torch.tensor(ST, dtype=torch.float64), feature_proj=proj,
    )  # fmt: skip


def halves(comp, name, x, y, u, v, proj=None):
    n = len(x) // 2
    parts = [
        comp.objectives_terms(features(x, y, u, v, s, proj))[name].item()
        for s in (slice(0, n), slice(n, 2 * n))
    ]
    return sum(parts) / 2


@pytest.mark.parametrize("t", [0.0, 0.2])
def test_affinity_matches_brute_force_and_shards_exactly(t):
    x, y = unit_rows(10, 5, 0), unit_rows(10, 5, 1)
    u, v = unit_rows(10, 8, 2), unit_rows(10, 8, 3)  # the teacher's space is wider
    comp = Composite.from_config(f"affinity(t={t})")
    whole = comp.objectives_terms(features(x, y, u, v))["affinity"].item()
    s, st = (S, ST) if t == 0 else (1 / t, 1 / t)
    assert abs(whole - brute_affinity(x, y, u, v, s, st)) < 1e-10
    assert abs(halves(comp, "affinity", x, y, u, v) - whole) < 1e-12


def test_affinity_is_zero_when_the_student_is_the_teacher_and_grows_otherwise():
    x, y = unit_rows(8, 4, 4), unit_rows(8, 4, 5)
    comp = Composite.from_config("affinity(t=0.1)")
    assert abs(comp.objectives_terms(features(x, y, x, y))["affinity"].item()) < 1e-12
    assert comp.objectives_terms(features(x, y, y, x))["affinity"].item() > 0.1


@pytest.mark.parametrize("dist", ["l2", "cos"])
@pytest.mark.parametrize("with_proj", [False, True])
def test_feature_matches_brute_force_and_shards_exactly(dist, with_proj):
    x, y = unit_rows(8, 4, 6), unit_rows(8, 4, 7)
    d_t = 6 if with_proj else 4
    u, v = unit_rows(8, d_t, 8), unit_rows(8, d_t, 9)
    proj = None
    if with_proj:
        proj = torch.nn.Linear(4, 6, bias=False).double()
        torch.nn.init.normal_(proj.weight, generator=torch.Generator().manual_seed(0))
    comp = Composite.from_config(f"feature(dist={dist})")
    whole = comp.objectives_terms(features(x, y, u, v, proj=proj))["feature"].item()
    w = proj.weight.detach() if with_proj else None
    assert abs(whole - brute_feature(x, y, u, v, dist, w)) < 1e-10
    assert abs(halves(comp, "feature", x, y, u, v, proj) - whole) < 1e-12


def test_feature_trains_its_projection_and_refuses_mismatched_widths():
    x, y = unit_rows(6, 4, 10), unit_rows(6, 4, 11)
    u, v = unit_rows(6, 6, 12), unit_rows(6, 6, 13)
    proj = torch.nn.Linear(4, 6, bias=False).double()
    loss = Composite.from_config("feature").objectives_terms(features(x, y, u, v, proj=proj))["feature"]
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no projection"):
        Composite.from_config("feature").objectives_terms(features(x, y, u, v))


@pytest.mark.parametrize(
    "spec, needle", [("affinity(t=-1)", "t=-1"), ("feature(dist=l1)", "dist must be one of")]
)
def test_bad_distillation_params_are_one_line_errors(spec, needle):
    with pytest.raises(UserError, match="--objective") as e:
        Composite.from_config(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_distillation_objectives_need_a_teacher():
    comp = Composite.from_config("clip+affinity+feature")
    assert "teacher" in comp.needs
    x = unit_rows(4, 3, 14)
    with pytest.raises(ValueError, match="teacher"):
        comp.objectives_terms(Features(x, x, x, x, 0, torch.tensor(S, dtype=torch.float64)))
