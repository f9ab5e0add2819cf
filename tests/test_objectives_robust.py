"""noisy (noise-robust contrast) against brute-force float64 references, sharded exactly; on a batch with 30 %
shuffled captions its weights single out the shuffled pairs; bad parameters are one-line errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import dot as _dot
from tests.conftest import log_softmax as _log_softmax
from tests.conftest import unit_rows as _unit
from xmodal.errors import UserError
from xmodal.objectives import REGISTRY, Composite
from xmodal.objectives.registry import Features

T = 6.0


def brute_pair_losses(x, y, t):
    x, y = x.tolist(), y.tolist()
    n = len(x)
    s = [[t * _dot(x[i], y[j]) for j in range(n)] for i in range(n)]
    out = []
    for k in range(n):
        row = _log_softmax(s[k])[k]
        col = _log_softmax([s[j][k] for j in range(n)])[k]
        out.append(-(row + col) / 2)
    return out


def _gauss_log(v, mean, var, prior):
    return -0.5 * math.log(2 * math.pi * var) - (v - mean) ** 2 / (2 * var) + math.log(prior)


def brute_noise_probability(losses, iters=10, reg=5e-4):
    """NCR's 2-component GMM on min–max scaled losses, EM in plain python; ε = P(high-mean component)."""
    lo, hi = min(losses), max(losses)
    x = [(v - lo) / (hi - lo) for v in losses]
    n = len(x)
    mu = [0.0, 1.0]
    m = sum(x) / n
    var = [sum((v - m) ** 2 for v in x) / n + reg] * 2
    pi = [0.5, 0.5]

    def responsibilities():
        out = []
        for v in x:
            a = [math.exp(_gauss_log(v, mu[c], var[c], pi[c])) for c in range(2)]
            out.append([a[0] / sum(a), a[1] / sum(a)])
        return out

    for _ in range(iters):
        r = responsibilities()
        for c in range(2):
            nk = sum(row[c] for row in r)
            pi[c] = nk / n
            mu[c] = sum(row[c] * v for row, v in zip(r, x, strict=True)) / nk
            var[c] = sum(row[c] * (v - mu[c]) ** 2 for row, v in zip(r, x, strict=True)) / nk + reg
    high = 0 if mu[0] > mu[1] else 1
    return [row[high] for row in responsibilities()]


def brute_weighted(x, y, t, strength):
    losses = brute_pair_losses(x, y, t)
    w = [1 - strength * e for e in brute_noise_probability(losses)]
    return sum(a * b for a, b in zip(w, losses, strict=True)) / sum(w), w


def brute_bootstrap(x, y, t, mode, beta):
    x, y = x.tolist(), y.tolist()
    n, total = len(x), 0.0
    for rows, cols in ((x, y), (y, x)):
        for i in range(n):
            log_q = _log_softmax([t * _dot(rows[i], c) for c in cols])
            if mode == "soft":
                own = -sum(math.exp(v) * v for v in log_q)
            else:
                own = -max(log_q)
            total += (-beta * log_q[i] + (1 - beta) * own) / n
    return total / 2


def _features(x, y, s=slice(None), step=0, t=T):
    return Features(x[s], y[s], x, y, s.start or 0, torch.tensor(t, dtype=torch.float64), step=step)


def _check_shards(comp, x, y, name="noisy", n_parts=2):
    whole = comp.objectives_terms(_features(x, y))[name].item()
    size = len(x) // n_parts
    parts = [
        comp.objectives_terms(_features(x, y, slice(k * size, (k + 1) * size)))[name].item()
        for k in range(n_parts)
    ]
    assert abs(sum(parts) / n_parts - whole) < 1e-12
    return whole


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_weight_mode_matches_brute_force_and_shards_exactly(strength):
    x, y = _unit(12, 5, 0), _unit(12, 5, 1)
    comp = Composite.from_config(f"noisy(mode=weight,strength={strength})")
    whole = _check_shards(comp, x, y)
    expect, w = brute_weighted(x, y, T, strength)
    assert abs(whole - expect) < 1e-10
    got_w = comp.objectives[0][0].pair_weights(_features(x, y))
    assert max(abs(a - b) for a, b in zip(got_w.tolist(), w, strict=True)) < 1e-10
    assert 1 - strength - 1e-12 <= got_w.min() and got_w.max() <= 1 + 1e-12


@pytest.mark.parametrize("mode, beta", [("soft", 0.0), ("soft", 0.7), ("hard", 0.0), ("hard", 0.5)])
def test_bootstrap_modes_match_brute_force_and_shard_exactly(mode, beta):
    x, y = _unit(10, 5, 2), _unit(10, 5, 3)
    comp = Composite.from_config(f"noisy(mode={mode},beta={beta})")
    whole = _check_shards(comp, x, y)
    expect_beta = beta or {"soft": 0.95, "hard": 0.8}[mode]
    assert abs(whole - brute_bootstrap(x, y, T, mode, expect_beta)) < 1e-10


def _noisy_batch(n=64, d=32, shuffled=0.3, seed=4):
    """70 % aligned pairs (caption = image + small noise), 30 % with captions shuffled among themselves."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    bad = torch.randperm(n, generator=g)[: round(shuffled * n)]
    y[bad] = y[bad.roll(1)]  # a cyclic shift: no shuffled caption stays with its image
    clean = torch.ones(n, dtype=torch.bool)
    clean[bad] = False
    return x, y, clean


def test_weights_single_out_shuffled_captions():
    x, y, clean = _noisy_batch()
    assert (~clean).sum() == 19
    obj = REGISTRY["noisy"]()
    f = _features(x, y, t=10.0)
    w = obj.pair_weights(f)
    # plain CLIP weighs every pair 1: this separation is what the mixture adds
    assert w[~clean].max() < 0.5 < w[clean].min()
    assert w[clean].mean() - w[~clean].mean() > 0.8
    # and the loss it gives is the clean pairs' loss, nearly: the shuffled pairs barely count
    per_pair = torch.tensor(brute_pair_losses(x, y, 10.0), dtype=torch.float64)
    loss = obj.terms(f)["noisy"].item()
    assert abs(loss - per_pair[clean].mean().item()) < 0.1 * per_pair[~clean].mean().item()
    # warm-up: plain weights until the model has had time to fit the clean pairs
    warm = REGISTRY["noisy"](REGISTRY["noisy"].Params(warmup=10))
    assert torch.equal(warm.pair_weights(f), torch.ones(64, dtype=torch.float64))
    assert (warm.pair_weights(_features(x, y, step=10, t=10.0)) < 1).any()


def test_equal_losses_give_plain_weights():
    e = torch.eye(5, dtype=torch.float64)  # every pair has the same loss: no mixture to fit
    w = REGISTRY["noisy"]().pair_weights(Features(e, e, e, e, 0, torch.tensor(T, dtype=torch.float64)))
    assert torch.equal(w, torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("noisy(mode=drop)", "--objective noisy: mode must be one of weight, soft, hard"),
        ("noisy(strength=2)", "--objective noisy: strength must be in [0, 1]"),
        ("noisy(beta=1.5)", "--objective noisy: beta must be in (0, 1]"),
        ("noisy(warmup=-1)", "--objective noisy: warmup must be >= 0"),
    ],
)
def test_noisy_bad_params_are_one_line_errors(spec, needle):
    with pytest.raises(UserError) as e:
        Composite.from_config(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)
