"""The objective registry: names, parameters, composition by weight, the YAML and flag forms, the listing
command, and alignment/uniformity against brute-force references."""

import itertools
import json
import math

import pytest
import torch

from tests.conftest import MICRO_TRAIN, assert_one_line_error, run_cli, run_in_process
from tests.conftest import unit_rows as _unit
from xmodal.errors import UserError
from xmodal.objectives import REGISTRY, Composite
from xmodal.objectives.geometry import uniformity
from xmodal.objectives.registry import Features, parse_spec
from xmodal.train.config import resolve_config


def brute_alignment(x, y, alpha):
    return sum(math.dist(a, b) ** alpha for a, b in zip(x.tolist(), y.tolist(), strict=True)) / len(x)


def brute_uniformity(x, t):
    pairs = list(itertools.combinations(x.tolist(), 2))
    return math.log(sum(math.exp(-t * math.dist(a, b) ** 2) for a, b in pairs) / len(pairs))


def test_alignment_and_uniformity_match_brute_force():
    x, y = _unit(9, 5, 0), _unit(9, 5, 1)
    f = Features(x, y, x, y, 0, torch.tensor(10.0, dtype=torch.float64))
    for alpha in (2.0, 1.0):
        got = REGISTRY["alignment"](REGISTRY["alignment"].Params(alpha=alpha)).terms(f)["alignment"]
        assert abs(got.item() - brute_alignment(x, y, alpha)) < 1e-10
    for t in (2.0, 0.5):
        got = REGISTRY["uniformity"](REGISTRY["uniformity"].Params(t=t)).terms(f)["uniformity"]
        assert abs(got.item() - (brute_uniformity(x, t) + brute_uniformity(y, t)) / 2) < 1e-10
        # the authors' one-liner
        assert abs(uniformity(x, t).item() - torch.pdist(x).pow(2).mul(-t).exp().mean().log().item()) < 1e-10


def test_sharded_ranks_average_to_the_global_terms():
    """Each rank's terms (own rows, gathered columns) averaged over ranks equal the one-process terms."""
    x, y = _unit(8, 4, 2), _unit(8, 4, 3)
    t = torch.tensor(7.0, dtype=torch.float64)
    comp = Composite.from_config("clip+alignment+uniformity")
    whole = {k: v.item() for k, v in comp.objectives_terms(Features(x, y, x, y, 0, t)).items()}
    shards = [
        comp.objectives_terms(Features(x[s], y[s], x, y, s.start, t)) for s in (slice(0, 4), slice(4, 8))
    ]
    for name, value in whole.items():
        assert abs(sum(p[name].item() for p in shards) / 2 - value) < 1e-12, name


def test_composite_sums_terms_by_weight():
    x, y = _unit(6, 4, 4), _unit(6, 4, 5)
    t = torch.tensor(5.0, dtype=torch.float64)
    total, terms = Composite.from_config("clip+uniformity:0.25(t=3)+alignment:-0.5")(x, y, t)
    assert set(terms) == {"clip", "uniformity", "alignment"}
    expect = terms["clip"] + 0.25 * terms["uniformity"] - 0.5 * terms["alignment"]
    assert abs(total.item() - expect.item()) < 1e-6
    assert abs(terms["uniformity"].item() - (brute_uniformity(x, 3) + brute_uniformity(y, 3)) / 2) < 1e-5


def test_spec_grammar():
    specs = parse_spec("clip + uniformity:0.1(t=3) + alignment:2")
    assert [(s.name, s.weight, s.params) for s in specs] == [
        ("clip", 1.0, {}),
        ("uniformity", 0.1, {"t": "3"}),
        ("alignment", 2.0, {}),
    ]
    obj = Composite.from_config("uniformity(t=0.5)").objectives[0][0]
    assert obj.params.t == 0.5 and isinstance(obj.params.t, float)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("infonce", "unknown objective; use one of " + ", ".join(sorted(REGISTRY))),
        ("uniformity(tau=2)", "no parameter tau; it takes t"),
        ("multipos(t=2)", "no parameter t; it takes none"),
        ("uniformity(t=hot)", "bad parameter value"),
        ("clip:x", "is not NAME[:WEIGHT]"),
        ("uniformity(t)", "is not KEY=VALUE"),
        ("clip+clip:0.5", "names an objective twice"),
        ("clip+", "is not NAME"),
    ],
)
def test_bad_specs_are_one_line_errors_listing_what_exists(spec, needle):
    with pytest.raises(UserError, match=None) as e:
        Composite.from_config(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_objectives_list(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(
        "data: d.jsonl\nobjectives:\n  - name: clip\n  - {name: uniformity, weight: 0.1, params: {t: 2}}\n"
    )
    cfg = resolve_config(str(conf), {})
    objs = Composite.from_config(cfg.objective).objectives
    assert [(o.name, w) for o, w in objs] == [("clip", 1.0), ("uniformity", 0.1)] and objs[1][0].params.t == 2
    conf.write_text("data: d.jsonl\nobjectives:\n  - {name: uniformity, params: {tau: 2}}\n")
    with pytest.raises(UserError, match="no parameter tau"):
        resolve_config(str(conf), {})


def test_objectives_command_lists_every_registered_objective():
    p = run_cli("objectives", "--json")
    rows = json.loads(p.stdout)
    assert {r["name"] for r in rows} == set(REGISTRY) >= {"clip", "siglip", "alignment", "uniformity"}
    assert all(r["description"] and r["paper"] for r in rows)
    assert next(r for r in rows if r["name"] == "uniformity")["params"] == ["t=2.0"]
    assert "Wang & Isola" in run_cli("objectives").stdout


def test_train_logs_each_term(tiny_manifest, tmp_path):
    out = tmp_path / "r"
    run_in_process(
        "train",
        "--data",
        str(tiny_manifest),
        *MICRO_TRAIN,
        "--steps",
        "2",
        "--log-every",
        "1",
        "--objective",
        "clip+uniformity:0.1",
        "--out",
        str(out),
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r["losses"]) == {"clip", "uniformity"}
        assert abs(r["loss"] - (r["losses"]["clip"] + 0.1 * r["losses"]["uniformity"])) < 1e-5
    p = run_in_process(
        "train",
        "--data",
        str(tiny_manifest),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "bad"),
        "--objective",
        "clip+infonce",
        check=False,
    )
    assert_one_line_error(p, "unknown objective")


def _labelled(b, n_cls, seed):
    x, y = _unit(b, 4, seed), _unit(b, 4, seed + 1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, n_cls, (b,), generator=g)
    return x, y, labels


def brute_positives(labels, i, j):
    return i == j or (labels[i] >= 0 and labels[i] == labels[j])


def brute_multipos(x, y, labels, t):
    n, total = len(x), 0.0
    for a, b in ((x, y), (y, x)):
        for i in range(n):
            logits = [t * float(a[i] @ b[j]) for j in range(n)]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(n) if brute_positives(labels, i, j)]
            total += -sum(logits[j] - lse for j in pos) / len(pos) / n
    return total / 2


def brute_sdm(x, y, labels, t, eps=1e-8):
    n, total = len(x), 0.0
    for a, b in ((x, y), (y, x)):
        for i in range(n):
            logits = [t * float(a[i] @ b[j]) for j in range(n)]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(n) if brute_positives(labels, i, j)]
            for j in range(n):
                p = math.exp(logits[j] - lse)
                q = (1 / len(pos) if j in pos else 0.0) + eps
                total += p * (logits[j] - lse - math.log(q)) / n
    return total


def test_multipos_and_sdm_match_brute_force_and_shard_exactly():
    x, y, labels = _labelled(10, 3, 7)
    t = torch.tensor(6.0, dtype=torch.float64)
    comp = Composite.from_config("multipos+sdm")
    whole = comp.objectives_terms(Features(x, y, x, y, 0, t, labels=labels, all_labels=labels))
    assert abs(whole["multipos"].item() - brute_multipos(x, y, labels.tolist(), 6.0)) < 1e-10
    assert abs(whole["sdm"].item() - brute_sdm(x, y, labels.tolist(), 6.0)) < 1e-9
    halves = (slice(0, 5), slice(5, 10))
    parts = [
        comp.objectives_terms(Features(x[s], y[s], x, y, s.start, t, labels=labels[s], all_labels=labels))
        for s in halves
    ]
    for name in whole:
        assert abs(sum(p[name].item() for p in parts) / 2 - whole[name].item()) < 1e-12, name
    # no labels (or all unlabelled): multipos is CLIP
    none = torch.full((10,), -1)
    mp = comp.objectives_terms(Features(x, y, x, y, 0, t, labels=none, all_labels=none))["multipos"]
    clip = Composite.from_config("clip").objectives_terms(Features(x, y, x, y, 0, t))["clip"]
    assert abs(mp.item() - clip.item()) < 1e-12


def test_registering_the_objectives_does_not_import_the_model_layer():
    """Every `xmodal` command registers the objectives at start; open_clip must load only when used."""
    import subprocess
    import sys

    code = "import sys, xmodal.cli, xmodal.objectives; assert 'open_clip' not in sys.modules, 'open_clip'"
    subprocess.run([sys.executable, "-c", code], check=True)
