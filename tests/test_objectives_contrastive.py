"""CLIP and SigLIP losses against brute-force loops written from the papers' formulas."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from xmodal.objectives import Composite, clip_loss, siglip_loss


def _feats(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def brute_clip(img, txt, t):
    img, txt = img.numpy(), txt.numpy()
    n = len(img)
    total = 0.0
    for i in range(n):  # image i → texts
        s = [t * float(img[i] @ txt[j]) for j in range(n)]
        total += -(s[i] - math.log(sum(math.exp(v) for v in s)))
    for j in range(n):  # text j → images
        s = [t * float(txt[j] @ img[i]) for i in range(n)]
        total += -(s[j] - math.log(sum(math.exp(v) for v in s)))
    return total / (2 * n)


def brute_siglip(img, txt, t, b):
    img, txt = img.numpy(), txt.numpy()
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * (t * float(img[i] @ txt[j]) + b))))
    return total / n


def test_clip_loss_equals_brute_force():
    img, txt = _feats(7, 5, 0), _feats(7, 5, 1)
    t = torch.tensor(14.3, dtype=torch.float64)
    got = clip_loss(img, txt, t).item()
    assert abs(got - brute_clip(img, txt, 14.3)) < 1e-10


def test_siglip_loss_equals_brute_force():
    img, txt = _feats(6, 4, 2), _feats(6, 4, 3)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    got = siglip_loss(img, txt, t, b).item()
    assert abs(got - brute_siglip(img, txt, 10.0, -10.0)) < 1e-10


def test_sharded_rows_reassemble_the_global_loss():
    """What each rank computes (its rows vs gathered columns), averaged, equals the global loss."""
    img, txt = _feats(8, 5, 4), _feats(8, 5, 5)
    t, b = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    shards = [slice(0, 4), slice(4, 8)]
    clip_parts = [clip_loss(img[s], txt[s], t, img, txt, offset=s.start) for s in shards]
    sig_parts = [siglip_loss(img[s], txt[s], t, b, txt, offset=s.start) for s in shards]
    assert abs(np.mean([p.item() for p in clip_parts]) - clip_loss(img, txt, t).item()) < 1e-12
    assert abs(np.mean([p.item() for p in sig_parts]) - siglip_loss(img, txt, t, b).item()) < 1e-12


def test_clip_loss_prefers_matching_pairs():
    img = _feats(5, 8, 6)
    t = torch.tensor(20.0, dtype=torch.float64)
    assert clip_loss(img, img, t) < clip_loss(img, img.roll(1, 0), t)
    total, terms = Composite.from_config("clip")(img, img, t)
    assert total.item() == terms["clip"].item() == clip_loss(img.float(), img.float(), t).item()
