"""Hash heads (linear, BEBR recurrent) and the dcmh/bebr objectives against brute-force float64 loops,
sharded exactly; codes, prefixes, packing against numpy and faiss, and two small fits."""

import math

import faiss
import numpy as np
import pytest
import torch

from tests.conftest import dot, unit_rows
from xmodal.errors import UserError
from xmodal.hashing.heads import HashHeads
from xmodal.objectives import REGISTRY, Composite
from xmodal.objectives.registry import Features

LABELS = [0, 1, 0, -1, 2, 1, -1, 0]  # −1: unlabelled, similar only to its own pair


def seeded_heads(*args, seed=0, **kw) -> HashHeads:
    torch.manual_seed(seed)
    return HashHeads(*args, **kw).double()


def features(x, y, heads, labels=None, s=slice(None)):
    lab = None if labels is None else torch.tensor(labels)
    return Features(
        x[s], y[s], x, y, s.start or 0, torch.tensor(1.0, dtype=torch.float64),
        labels=None if lab is None else lab[s], all_labels=lab, hash_heads=heads,
    )  # fmt: skip


def halves(comp, x, y, heads, labels=None):
    """Terms of two ranks (rows 0..n/2 and n/2..n against the whole batch), averaged over the ranks."""
    n = len(x) // 2
    parts = [comp.objectives_terms(features(x, y, heads, labels, s)) for s in (slice(0, n), slice(n, 2 * n))]
    return {k: sum(p[k].item() for p in parts) / 2 for k in parts[0]}


# -- dcmh ----------------------------------------------------------------------------------------------


def brute_linear(heads, x, modality):
    """tanh(W x + b), row by row, from the layer's weights."""
    lin = heads.heads[modality]
    w, b = lin.weight.tolist(), lin.bias.tolist()
    return [[math.tanh(dot(wk, row) + bk) for wk, bk in zip(w, b, strict=True)] for row in x.tolist()]


def brute_dcmh(F, G, labels, gamma, eta):
    """The paper's J over all n pairs, divided by n: (nll, γ·quantisation, η·balance)."""
    n, c = len(F), len(F[0])

    def similar(i, j):
        return i == j or (labels is not None and labels[i] >= 0 and labels[i] == labels[j])

    nll = 0.0
    for i in range(n):
        for j in range(n):
            theta = 0.5 * dot(F[i], G[j])
            nll += math.log1p(math.exp(theta)) - (theta if similar(i, j) else 0.0)
    quant = 0.0
    for i in range(n):
        for k in range(c):
            b = 1.0 if F[i][k] + G[i][k] >= 0 else -1.0
            quant += (b - F[i][k]) ** 2 + (b - G[i][k]) ** 2
    balance = sum(sum(F[i][k] for i in range(n)) ** 2 + sum(G[i][k] for i in range(n)) ** 2 for k in range(c))
    return nll / n, gamma * quant / n, eta * balance / n


@pytest.mark.parametrize("labels", [LABELS, None], ids=["labels", "no-labels"])
def test_dcmh_matches_brute_force_and_shards_exactly(labels):
    x, y = unit_rows(8, 6, 0), unit_rows(8, 6, 1)
    heads = seeded_heads(6, 16)
    comp = Composite.from_config("dcmh(gamma=0.5,eta=0.25)")
    whole = {k: v.item() for k, v in comp.objectives_terms(features(x, y, heads, labels)).items()}
    F, G = brute_linear(heads, x, "image"), brute_linear(heads, y, "text")
    want = dict(zip(("dcmh", "dcmh_quant", "dcmh_balance"), brute_dcmh(F, G, labels, 0.5, 0.25), strict=True))
    assert whole.keys() == want.keys()
    for k in want:
        assert abs(whole[k] - want[k]) < 1e-10, k
    for k, v in halves(comp, x, y, heads, labels).items():
        assert abs(v - whole[k]) < 1e-12, k


def test_dcmh_labels_change_the_likelihood_and_recurrent_heads_shard_too():
    x, y = unit_rows(8, 6, 2), unit_rows(8, 6, 3)
    comp = Composite.from_config("dcmh")
    lin = seeded_heads(6, 8)
    with_l = comp.objectives_terms(features(x, y, lin, LABELS))["dcmh"].item()
    assert abs(with_l - comp.objectives_terms(features(x, y, lin))["dcmh"].item()) > 1e-3
    rec = seeded_heads(6, 8, "recurrent", steps=2)  # relaxed codes are the straight-through ±1 codes
    whole = {k: v.item() for k, v in comp.objectives_terms(features(x, y, rec, LABELS)).items()}
    disagree = (rec.codes(x, "image") != rec.codes(y, "text")).sum().item()
    assert whole["dcmh_quant"] == 4 * disagree / 8  # ±1 codes: only a bit where F ≠ G costs (B = +1 there)
    for k, v in halves(comp, x, y, rec, LABELS).items():
        assert abs(v - whole[k]) < 1e-12, k


def test_dcmh_fit_balances_the_bits():
    """200 Adam steps of dcmh on 4 labelled clusters: the training codes' per-bit mean |mean_i B_ik|,
    averaged over bits, stays below 0.3 (balanced bits have mean 0; a constant bit has 1)."""
    g = torch.Generator().manual_seed(4)
    n, d, classes = 64, 16, 4
    labels = torch.arange(n) % classes
    centres_i, centres_t = torch.randn(classes, d, generator=g), torch.randn(classes, d, generator=g)
    x = torch.nn.functional.normalize(centres_i[labels] + 0.5 * torch.randn(n, d, generator=g), dim=1)
    y = torch.nn.functional.normalize(centres_t[labels] + 0.5 * torch.randn(n, d, generator=g), dim=1)
    torch.manual_seed(0)
    heads = HashHeads(d, 16)
    comp = Composite.from_config("dcmh")
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(200):
        f = Features(x, y, x, y, 0, torch.tensor(1.0), labels=labels, all_labels=labels, hash_heads=heads)
        loss = sum(comp.objectives_terms(f).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for modality, v in (("image", x), ("text", y)):
        codes = heads.codes(v, modality)
        assert codes.mean(0).abs().mean().item() < 0.3, modality
    same = (
        heads.codes(x, "image") @ heads.codes(y, "text").T
    )  # and it learned the task: same-class codes agree
    is_same = labels[:, None] == labels[None, :]
    assert same[is_same].mean() > same[~is_same].mean() + 4


# -- bebr ----------------------------------------------------------------------------------------------


def brute_reconstruct(heads, x, modality):
    """x̂_u row by row from the recurrence r_1 = x, b_u = sign(φ_u(r_u)), x̂_u = x̂_{u−1} + ψ_u(b_u)."""
    out = [[] for _ in range(heads.steps)]
    for row in x:
        recon = torch.zeros_like(row)
        for u, step in enumerate(heads.head(modality)):
            logits = step.encoder((row - recon)[None])[0]
            b = torch.tensor([1.0 if v >= 0 else -1.0 for v in logits.tolist()], dtype=row.dtype)
            recon = recon + step.decoder(b[None])[0]
            out[u].append(recon.tolist())
    return out


def brute_nce(recon, keys, t):
    total = 0.0
    for i, r in enumerate(recon):
        norm = math.sqrt(dot(r, r))
        logits = [dot(r, k) / norm / t for k in keys]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    return total / len(recon)


def brute_bebr(heads, x, y, t, mse, cross, prefixes):
    nce, reg, xm = [], [], []
    for modality, v, other in (("image", x, y), ("text", y, x)):
        recons = brute_reconstruct(heads, v, modality)
        recons = recons if prefixes else recons[-1:]
        for rec in recons:
            nce.append(brute_nce(rec, v.tolist(), t))
            xm.append(brute_nce(rec, other.tolist(), t))
            sq = [
                sum((p - q) ** 2 for p, q in zip(r, row, strict=True))
                for r, row in zip(rec, v.tolist(), strict=True)
            ]
            reg.append(sum(sq) / len(rec))
    out = {"bebr": sum(nce) / len(nce), "bebr_mse": mse * sum(reg) / len(reg)}
    if cross > 0:
        out["bebr_cross"] = cross * sum(xm) / len(xm)
    return out


@pytest.mark.parametrize("prefixes, cross", [(True, 0.0), (False, 0.5), (True, 0.3)])
def test_bebr_matches_brute_force_and_shards_exactly(prefixes, cross):
    x, y = unit_rows(8, 6, 5), unit_rows(8, 6, 6)
    heads = seeded_heads(6, 8, "recurrent", steps=3, hidden=10)
    for layer in heads.modules():  # the decoders start at 0; give them weights so the steps differ
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.3)
    comp = Composite.from_config(f"bebr(t=0.2,mse=0.7,cross={cross},prefixes={str(prefixes).lower()})")
    whole = {k: v.item() for k, v in comp.objectives_terms(features(x, y, heads)).items()}
    want = brute_bebr(heads, x, y, 0.2, 0.7, cross, prefixes)
    assert whole.keys() == want.keys()
    for k in want:
        assert abs(whole[k] - want[k]) < 1e-10, k
    for k, v in halves(comp, x, y, heads).items():
        assert abs(v - whole[k]) < 1e-12, k
    got = heads.reconstruct(x, "image")  # the module's batched recurrence is the row-by-row one
    for u, rows in enumerate(brute_reconstruct(heads, x, "image")):
        assert torch.allclose(got[u], torch.tensor(rows, dtype=torch.float64), atol=1e-12)


def test_objectives_need_hash_heads_of_the_right_kind():
    x, y = unit_rows(4, 6, 7), unit_rows(4, 6, 8)
    for name in ("dcmh", "bebr"):
        with pytest.raises(ValueError, match="hash heads"):
            Composite.from_config(name).objectives_terms(features(x, y, None))
    with pytest.raises(ValueError, match="recurrent"):
        Composite.from_config("bebr").objectives_terms(features(x, y, seeded_heads(6, 8)))
    assert REGISTRY["dcmh"].needs == {"pooled", "labels"} and REGISTRY["bebr"].needs == {"pooled"}


@pytest.mark.parametrize("spec", ["dcmh(gamma=-1)", "bebr(t=0)", "bebr(mse=-0.5)"])
def test_bad_hashing_params_are_one_line_errors(spec):
    with pytest.raises(UserError, match="--objective") as e:
        Composite.from_config(spec)
    assert "\n" not in str(e.value)


# -- heads ---------------------------------------------------------------------------------------------


def test_codes_are_exactly_pm1_and_recurrent_prefixes_are_the_shorter_codes():
    x = torch.cat([unit_rows(15, 32, 9), torch.zeros(1, 32, dtype=torch.float64)])
    lin = seeded_heads(32, 16)
    rec = seeded_heads(32, 8, "recurrent", steps=3)
    for heads in (lin, rec):
        for modality in ("image", "text"):
            c = heads.codes(x, modality)
            assert c.shape == (16, heads.total_bits) and set(c.unique().tolist()) <= {-1.0, 1.0}
            assert not c.requires_grad
    torch.nn.init.zeros_(lin.heads["image"].weight)
    torch.nn.init.zeros_(lin.heads["image"].bias)
    assert (lin.codes(x, "image") == 1).all()  # sign(0) = +1
    full = rec.codes(x, "text")
    for u in (1, 2):
        assert torch.equal(rec.codes(x, "text", steps=u), full[:, : 8 * u])
    assert torch.equal(rec.relaxed(x, "text"), full)  # the straight-through codes are the codes
    torch.testing.assert_close(  # (not bit-equal: addmm and matmul + add round differently on some CPUs)
        torch.tanh(x @ lin.heads["text"].weight.T + lin.heads["text"].bias),
        lin.relaxed(x, "text"),
        rtol=0,
        atol=1e-12,
    )
    for heads in (lin, rec):  # the relaxed codes carry gradients into the heads
        w = torch.randn(heads.total_bits, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
        (heads.relaxed(x, "text") * w).sum().backward()
        first = heads.head("text") if heads.kind == "linear" else heads.head("text")[0].encoder
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())


def test_recurrent_reconstruction_improves_with_steps():
    """A recurrent head fit for 200 Adam steps on 256 random unit vectors in 32-d (8 bits × 3 steps)."""
    x = torch.nn.functional.normalize(
        torch.randn(256, 32, generator=torch.Generator().manual_seed(10)), dim=1
    )
    torch.manual_seed(0)
    heads = HashHeads(32, 8, "recurrent", steps=3)
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    for _ in range(200):
        loss = sum((r - x).pow(2).sum(1).mean() for r in heads.reconstruct(x, "image"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = [(r - x).pow(2).sum(1).mean().item() for r in heads.reconstruct(x, "image")]
    assert err[0] >= err[1] >= err[2] and err[2] < err[0] - 0.1, err
    assert err[0] < 1.0  # better than reconstructing nothing (‖x‖² = 1)


def test_pack_agrees_with_numpy_and_faiss_hamming():
    heads = seeded_heads(12, 24, "recurrent", steps=2)  # 48 bits: 6 bytes
    a, b = heads.codes(unit_rows(5, 12, 11), "text"), heads.codes(unit_rows(7, 12, 12), "image")
    pa, pb = HashHeads.pack(a), HashHeads.pack(b)
    assert pa.dtype == np.uint8 and pa.shape == (5, 6)
    assert np.array_equal(pa, np.packbits(a.numpy() > 0, axis=1, bitorder="little"))
    assert np.array_equal(HashHeads.pack(a.numpy()), pa)
    index = faiss.IndexBinaryFlat(48)
    index.add(pb)
    dist, idx = index.search(pa, len(pb))
    want = (48 - a @ b.T) / 2
    for q in range(len(pa)):
        assert [int(want[q, j]) for j in idx[q]] == dist[q].tolist()
    assert sorted(dist[0].tolist()) == sorted(int(v) for v in want[0])


def test_config_round_trip_rebuilds_the_same_codes():
    heads = seeded_heads(10, 16, "recurrent", steps=2, hidden=12)
    again = HashHeads.from_config(heads.config()).double()
    again.load_state_dict(heads.state_dict())
    x = unit_rows(6, 10, 13)
    assert torch.equal(again.codes(x, "image"), heads.codes(x, "image"))
    cfg = {"dim": 10, "bits": 16, "kind": "recurrent", "steps": 2, "hidden": 12, "shared": True}
    assert heads.config() == cfg
    with pytest.raises(ValueError, match="expected keys"):
        HashHeads.from_config({"dim": 10, "bits": 16, "depth": 3})
    old = {k: v for k, v in cfg.items() if k != "shared"}  # configs from before `shared`: per modality
    assert HashHeads.from_config(old).shared is False


def test_recurrent_heads_share_one_network_so_both_modalities_code_alike():
    """BEBR's training has no cross-modal term: only one shared network puts image and text codes in one
    bit space (the same vector gets the same code from either side); linear DCMH heads stay separate."""
    x = unit_rows(9, 12, 14)
    rec = seeded_heads(12, 16, "recurrent", steps=2)
    assert rec.shared and set(rec.heads) == {"shared"}
    assert torch.equal(rec.codes(x, "image"), rec.codes(x, "text"))
    sep = seeded_heads(12, 16, "recurrent", steps=2, shared=False)
    assert set(sep.heads) == {"image", "text"} and not torch.equal(
        sep.codes(x, "image"), sep.codes(x, "text")
    )
    lin = seeded_heads(12, 16)
    assert not lin.shared and not torch.equal(lin.codes(x, "image"), lin.codes(x, "text"))
    assert sum(p.numel() for p in rec.parameters()) * 2 == sum(p.numel() for p in sep.parameters())


@pytest.mark.parametrize("bits", [0, 12, -8, 4])
def test_bad_bits_is_a_one_line_user_error(bits):
    with pytest.raises(UserError, match="--bits") as e:
        HashHeads(16, bits)
    assert str(bits) in str(e.value) and "\n" not in str(e.value)


def test_bad_kind_and_steps_are_user_errors():
    with pytest.raises(UserError, match="--kind"):
        HashHeads(16, 8, kind="pq")
    with pytest.raises(UserError, match="--steps"):
        HashHeads(16, 8, steps=2)  # linear heads have one step
    with pytest.raises(UserError, match="--steps"):
        HashHeads(16, 8, kind="recurrent", steps=0)
