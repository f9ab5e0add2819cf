"""`xmodal train --recipe`: the recipe table, its precedence (defaults < recipe < YAML < flags), the run's
saved config, and the pieces of the `improved` recipe (CLIP🚀, Fini et al. 2023) that live outside
augment.py: caption sampling and EDA in the batcher, label smoothing in the `clip` objective."""

import json
import math

import pytest
import torch
import yaml

from tests.conftest import MICRO_TRAIN, assert_one_line_error, run_cli, run_in_process
from tests.conftest import unit_rows as _unit
from xmodal.errors import UserError
from xmodal.objectives import Composite, clip_loss
from xmodal.objectives.registry import Features
from xmodal.train.batcher import Batcher
from xmodal.train.config import FIELD_NAMES, TrainConfig, resolve_config
from xmodal.train.distributed import DistInfo
from xmodal.train.recipes import RECIPES, recipe_values


# -- the table and its precedence ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_names_fields_resolves_and_says_where_it_comes_from(name):
    r = RECIPES[name]
    assert r.description and "\n" not in r.description and r.paper
    assert r.values and set(r.values) <= FIELD_NAMES - {"recipe", "data", "out"}
    cfg = resolve_config(None, {"data": "d.jsonl", "recipe": name})  # validates
    assert cfg.recipe == name
    for k, v in r.values.items():
        assert getattr(cfg, k) == v, k


def test_improved_recipe_values():
    assert recipe_values("improved") == {
        "objective": "clip(label_smoothing=0.1)",
        "aug_crop_scale": 0.08,
        "aug_color": 0.4,
        "aug_flip": 0.5,
        "aug_text_eda": 0.1,
    }
    assert "Fini" in RECIPES["improved"].paper


def test_precedence_defaults_recipe_yaml_flags(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("data: d.jsonl\nrecipe: improved\naug_flip: 0.25\n")
    cfg = resolve_config(str(conf), {})
    assert (cfg.recipe, cfg.aug_flip, cfg.aug_color) == ("improved", 0.25, 0.4)  # YAML > recipe
    cfg = resolve_config(str(conf), {"aug_flip": 0.0, "aug_color": None})
    assert (cfg.aug_flip, cfg.aug_color) == (0.0, 0.4)  # flags > YAML; None = not given
    conf.write_text("data: d.jsonl\naug_color: 0.1\n")
    cfg = resolve_config(str(conf), {"recipe": "improved"})
    assert (cfg.aug_color, cfg.aug_crop_scale) == (0.1, 0.08)  # the flag's recipe, below the YAML
    plain = resolve_config(None, {"data": "d.jsonl"})
    assert plain.recipe is None and plain.to_dict() == TrainConfig(data="d.jsonl").to_dict()


def test_resume_keeps_the_saved_values_unless_a_recipe_is_named_again():
    saved = resolve_config(None, {"data": "d.jsonl", "recipe": "improved", "aug_flip": 0.0}).to_dict()
    again = resolve_config(None, {"data": "d.jsonl"}, base=saved)
    assert again.to_dict() == saved  # the folder alone: the resolved values, not the recipe's
    assert resolve_config(None, {"recipe": "improved"}, base=saved).aug_flip == 0.5
    gone = {**saved, "recipe": "retired"}  # a recipe this version no longer has: its values are saved
    assert resolve_config(None, {}, base=gone).aug_crop_scale == 0.08


def test_unknown_recipe_is_a_one_line_error_listing_the_recipes(tiny_manifest, tmp_path):
    with pytest.raises(UserError, match="unknown recipe; use one of improved"):
        resolve_config(None, {"data": "d.jsonl", "recipe": "best-ever"})
    p = run_cli(
        "train", "--data", str(tiny_manifest), "--out", str(tmp_path / "r"), "--recipe", "nope", check=False
    )
    assert_one_line_error(p, "--recipe nope: unknown recipe; use one of improved")


def test_train_help_lists_the_recipes():
    out = run_cli("train", "--help", env={"COLUMNS": "400"}).stdout
    for name, r in RECIPES.items():
        assert f"{name}: " in out and r.paper.split(",")[0] in out


def test_train_with_the_recipe_saves_its_values_and_a_flag_wins(tiny_manifest, tmp_path):
    out = tmp_path / "r"
    base = ["train", "--data", str(tiny_manifest), "--out", str(out)]
    flags = ["--aug-flip", "0", "--aug-randaugment-n", "2"]  # one overrides the recipe, one adds to it
    run_in_process(*base, *MICRO_TRAIN, "--steps", "2", "--log-every", "1", "--recipe", "improved", *flags)
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["recipe"] == "improved" and saved["aug_flip"] == 0.0 and saved["aug_randaugment_n"] == 2
    want = {**recipe_values("improved"), "aug_flip": 0.0}
    assert {k: saved[k] for k in want} == want
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    run_in_process(*base, "--steps", "3", "--resume")  # from the folder alone: the saved, resolved values
    again = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert {**again, "steps": 2} == saved


# -- caption sampling and EDA in the batcher --------------------------------------------------------------
class _Data:
    def __init__(self, captions):
        self.captions = captions
        self.keys = [f"k{i}" for i in range(len(captions))]
        self.labels = [None] * len(captions)
        self.images = torch.zeros(len(captions), 3, 2, 2, dtype=torch.uint8)

    def __len__(self):
        return len(self.keys)


def _tokenizer(texts):
    """Text → its characters' code points, padded: decodable back with `_texts`."""
    out = torch.zeros(len(texts), 96, dtype=torch.long)
    for i, t in enumerate(texts):
        out[i, : len(t)] = torch.tensor([ord(c) for c in t][:96])
    return out


def _texts(tokens):
    return ["".join(chr(c) for c in row.tolist() if c) for row in tokens]


def _batcher(data, rank=0, world=1, **kw):
    cfg = TrainConfig(data="d", batch_size=kw.pop("batch_size", 4), **kw)
    return Batcher(data, _tokenizer, cfg, DistInfo(rank=rank, world_size=world))


CAPTIONS = [[f"item {i} caption {c}" for c in range(i % 3 + 1)] for i in range(8)]


def test_each_caption_of_an_image_gets_picked_over_steps_deterministically_per_seed():
    b = _batcher(_Data(CAPTIONS))

    def picks(batcher, steps=60):
        seen: dict[int, list[int]] = {}
        for step in range(steps):
            for i, c in zip(
                batcher.indices(step).tolist(), batcher.caption_index(step).tolist(), strict=True
            ):
                seen.setdefault(i, []).append(c - int(batcher.cap_start[i]))
        return seen

    seen = picks(b)
    for i, caps in enumerate(CAPTIONS):
        assert set(seen[i]) == set(range(len(caps))), i  # every caption, and only the image's own
    assert picks(_batcher(_Data(CAPTIONS))) == seen  # the same seed: the same choices
    assert picks(_batcher(_Data(CAPTIONS), seed=1)) != seen
    _, tokens, _ = b.get(5)
    want = [b.flat_captions[c] for c in b.caption_index(5).tolist()]
    assert _texts(tokens) == want  # what get() hands out is the chosen caption


def test_eda_in_the_batcher_is_seeded_per_step_and_global_position():
    data = _Data([["a man walking his big dog on the beach", "a small cat sitting on a couch"]] * 8)
    whole = _batcher(data, batch_size=8, aug_text_eda=0.3)
    assert whole.tokens is None  # captions are tokenised per step when augmented
    texts = _texts(whole.get(3)[1])
    assert texts == _texts(_batcher(data, batch_size=8, aug_text_eda=0.3).get(3)[1])
    assert texts != _texts(whole.get(4)[1])
    originals = [whole.flat_captions[c] for c in whole.caption_index(3).tolist()]
    assert texts != originals and len(set(texts)) > 2
    halves = [_texts(_batcher(data, r, 2, batch_size=8, aug_text_eda=0.3).get(3)[1]) for r in (0, 1)]
    assert halves[0] + halves[1] == texts  # each rank: exactly its slice of the global batch
    off = _batcher(data, batch_size=8)
    assert off.tokens is not None and _texts(off.get(3)[1]) == originals


# -- label smoothing on the clip objective ----------------------------------------------------------------
def brute_smoothed_clip(x, y, t, eps):
    """Each row's target: 1−ε on its positive, plus ε/B on each of the B columns."""
    n, total = len(x), 0.0
    for a, b in ((x, y), (y, x)):
        for i in range(n):
            logits = [t * float(a[i] @ b[j]) for j in range(n)]
            lse = math.log(sum(math.exp(v) for v in logits))
            q = [(1 - eps) * (i == j) + eps / n for j in range(n)]
            total += -sum(q[j] * (logits[j] - lse) for j in range(n)) / n
    return total / 2


def test_label_smoothing_matches_brute_force_and_shards_exactly():
    x, y = _unit(8, 5, 0), _unit(8, 5, 1)
    t = torch.tensor(9.0, dtype=torch.float64)
    for eps in (0.0, 0.1, 0.5):
        got = clip_loss(x, y, t, label_smoothing=eps).item()
        assert abs(got - brute_smoothed_clip(x, y, 9.0, eps)) < 1e-10, eps
    assert clip_loss(x, y, t).item() == clip_loss(x, y, t, label_smoothing=0.0).item()
    comp = Composite.from_config("clip(label_smoothing=0.1)")
    whole = comp.objectives_terms(Features(x, y, x, y, 0, t))["clip"].item()
    assert abs(whole - brute_smoothed_clip(x, y, 9.0, 0.1)) < 1e-10
    halves = [
        comp.objectives_terms(Features(x[s], y[s], x, y, s.start, t))["clip"]
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert abs(sum(h.item() for h in halves) / 2 - whole) < 1e-12  # smoothing spreads over all B columns
    with pytest.raises(UserError, match="label_smoothing"):
        Composite.from_config("clip(label_smoothing=1.5)")
