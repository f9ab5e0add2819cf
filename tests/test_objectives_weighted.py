"""cwcl (continuously weighted contrast) against a brute-force float64 reference, sharded exactly; its
teacher need follows its parameter; bad parameters are one-line errors."""

import math

import pytest
import torch

from tests.conftest import dot as _dot
from tests.conftest import unit_rows as _unit
from xmodal.errors import UserError
from xmodal.objectives import REGISTRY, Composite
from xmodal.objectives.registry import Features

T = 6.0


def brute_direction(rows, cols, src, t, weighted):
    """−(1/n) Σ_i Σ_j w̄_ij log softmax_j(t <rows_i, cols_j>), w_ij = (1 + <src_i, src_j>)/2 or one-hot."""
    rows, cols, src = rows.tolist(), cols.tolist(), src.tolist()
    n, total = len(rows), 0.0
    for i in range(n):
        logits = [t * _dot(rows[i], c) for c in cols]
        lse = math.log(sum(math.exp(v) for v in logits))
        w = [(1 + _dot(src[i], src[j])) / 2 if weighted else float(i == j) for j in range(n)]
        total += -sum(w[j] / sum(w) * (logits[j] - lse) for j in range(n)) / n
    return total


def brute_cwcl(x, y, u, v, t, directions="both"):
    i2t = brute_direction(x, y, u, t, directions in ("both", "i2t"))
    t2i = brute_direction(y, x, v, t, directions in ("both", "t2i"))
    return (i2t + t2i) / 2


def _features(x, y, s=slice(None), teacher=None):
    t = torch.tensor(T, dtype=torch.float64)
    start = s.start or 0
    extra = {}
    if teacher is not None:
        tx, ty = teacher
        extra = dict(teacher_image=tx[s], teacher_text=ty[s], all_teacher_image=tx, all_teacher_text=ty)
    return Features(x[s], y[s], x, y, start, t, **extra)


@pytest.mark.parametrize("directions", ["both", "i2t", "t2i"])
def test_cwcl_self_matches_brute_force_and_shards_exactly(directions):
    x, y = _unit(10, 5, 0), _unit(10, 5, 1)
    comp = Composite.from_config(f"cwcl(directions={directions})")
    whole = comp.objectives_terms(_features(x, y))["cwcl"].item()
    assert abs(whole - brute_cwcl(x, y, x, y, T, directions)) < 1e-10
    halves = [comp.objectives_terms(_features(x, y, s))["cwcl"].item() for s in (slice(0, 5), slice(5, 10))]
    assert abs(sum(halves) / 2 - whole) < 1e-12


@pytest.mark.parametrize("directions", ["both", "i2t"])
def test_cwcl_teacher_matches_brute_force_and_shards_exactly(directions):
    x, y = _unit(8, 4, 2), _unit(8, 4, 3)
    tx, ty = _unit(8, 6, 4), _unit(8, 6, 5)  # the teacher's space may differ in width
    comp = Composite.from_config(f"cwcl(targets=teacher,directions={directions})")
    whole = comp.objectives_terms(_features(x, y, teacher=(tx, ty)))["cwcl"].item()
    assert abs(whole - brute_cwcl(x, y, tx, ty, T, directions)) < 1e-10
    halves = [
        comp.objectives_terms(_features(x, y, s, teacher=(tx, ty)))["cwcl"].item()
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert abs(sum(halves) / 2 - whole) < 1e-12


def test_cwcl_with_antipodal_sources_is_clip():
    """(1 + cos)/2 is 0 only for antipodal sources: two of them make the weights one-hot, i.e. CLIP."""
    x, y = _unit(2, 4, 6), _unit(2, 4, 7)
    e = _unit(1, 3, 8)
    teacher = (torch.cat([e, -e]), torch.cat([-e, e]))
    cwcl = Composite.from_config("cwcl(targets=teacher)").objectives_terms(_features(x, y, teacher=teacher))
    clip = Composite.from_config("clip").objectives_terms(_features(x, y))
    assert abs(cwcl["cwcl"].item() - clip["clip"].item()) < 1e-12


def test_cwcl_self_targets_carry_no_gradient():
    """targets=self equals targets=teacher with the model's own features as a detached copy, in value and
    in gradient: no gradient flows through the weights."""
    x0, y0 = _unit(6, 4, 8), _unit(6, 4, 9)
    grads = []
    for spec in ("cwcl", "cwcl(targets=teacher)"):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        teacher = (x0.clone(), y0.clone()) if "teacher" in spec else None
        loss = Composite.from_config(spec).objectives_terms(_features(x, y, teacher=teacher))["cwcl"]
        loss.backward()
        grads.append((loss.item(), x.grad, y.grad))
    (l1, gx1, gy1), (l2, gx2, gy2) = grads
    assert abs(l1 - l2) < 1e-12
    assert torch.allclose(gx1, gx2, atol=1e-12) and torch.allclose(gy1, gy2, atol=1e-12)


def test_cwcl_needs_follow_targets():
    cls = REGISTRY["cwcl"]
    assert cls.needs == frozenset({"pooled"})  # what `xmodal objectives` lists
    assert cls().needs == frozenset({"pooled"})
    assert cls(cls.Params(targets="teacher")).needs == frozenset({"pooled", "teacher"})
    assert "teacher" in Composite.from_config("clip+cwcl:0.5(targets=teacher)").needs
    assert "teacher" not in Composite.from_config("clip+cwcl:0.5").needs
    with pytest.raises(ValueError, match="teacher"):
        x, y = _unit(4, 3, 10), _unit(4, 3, 11)
        Composite.from_config("cwcl(targets=teacher)").objectives_terms(_features(x, y))


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("cwcl(targets=momentum)", "--objective cwcl: targets must be one of self, teacher"),
        ("cwcl(directions=up)", "--objective cwcl: directions must be one of both, i2t, t2i"),
    ],
)
def test_cwcl_bad_params_are_one_line_errors(spec, needle):
    with pytest.raises(UserError) as e:
        Composite.from_config(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)
