"""TinyCLIP-style weight inheritance (xmodal.distill.inherit): exact copies, slices, parsing, refusals."""

import copy
import json

import pytest
import torch

from xmodal.distill.inherit import (
    InheritSpec,
    inherit_from_model,
    inherit_student,
    parse_inherit,
    write_student,
)
from xmodal.errors import UserError
from xmodal.models.build import ModelSpec, build_model, resolve_model_config

# 4 layers, width 128, 4 heads of 32 in both towers: small, but with room to drop layers and heads
CUSTOM4 = {
    "embed_dim": 48,
    "vision_cfg": {
        "image_size": 32,
        "layers": 4,
        "width": 128,
        "head_width": 32,
        "patch_size": 8,
        "mlp_ratio": 2,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 128, "heads": 4, "layers": 4},
}


def _teacher(cfg, seed=0):
    cfg = copy.deepcopy(cfg)
    model = build_model(ModelSpec(name="teacher"), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # so that the magnitudes differ (open_clip zero-inits biases)
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval(), cfg


def _configs():
    return {
        "micro": resolve_model_config(ModelSpec(name="xm-micro")),
        "custom4": CUSTOM4,
        "custom4-customtext": {**CUSTOM4, "custom_text": True},
    }


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    vocab = cfg["text_cfg"]["vocab_size"]
    return torch.randn(3, 3, size, size, generator=g), torch.randint(1, vocab, (3, ctx), generator=g)


def _student(cfg, state):
    model = build_model(ModelSpec(name="student"), cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _block_map(key, layers):
    """Student key → teacher key, given the kept teacher layers of the key's tower."""
    if ".resblocks." not in key:
        return key
    head, rest = key.split(".resblocks.", 1)
    i, tail = rest.split(".", 1)
    return f"{head}.resblocks.{layers[int(i)]}.{tail}"


@pytest.mark.parametrize("select", ["magnitude", "front"])
@pytest.mark.parametrize("name", ["micro", "custom4", "custom4-customtext"])
def test_full_inheritance_is_the_teacher(name, select):
    teacher, cfg = _teacher(_configs()[name])
    s_cfg, state, _ = inherit_from_model(teacher, cfg, InheritSpec(teacher="t", select=select))
    assert s_cfg == cfg
    t_state = teacher.state_dict()
    assert state.keys() == t_state.keys()
    assert all(torch.equal(state[k], t_state[k]) for k in state)
    student = _student(s_cfg, state)
    image, text = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(student.encode_image(image), teacher.encode_image(image))
        assert torch.equal(student.encode_text(text), teacher.encode_text(text))


@pytest.mark.parametrize(
    "params, image_layers, text_layers",
    [
        ("layers=2", [0, 2], [0, 2]),  # TinyCLIP interval_front
        ("layers=1/3", [1, 3], [1, 3]),
        ("every=2", [0, 2], [0, 2]),
        ("layers=3,text_layers=0/3", [0, 1, 2], [0, 3]),
        ("image_every=3,text_layers=1", [0, 3], [0]),
    ],
)
def test_dropped_layers_copy_the_kept_blocks(params, image_layers, text_layers):
    teacher, cfg = _teacher(CUSTOM4)
    spec = parse_inherit(f"inherit:/runs/t:{params}")
    s_cfg, state, record = inherit_from_model(teacher, cfg, spec)
    assert record["image"]["layers"] == image_layers and record["text"]["layers"] == text_layers
    assert s_cfg["vision_cfg"]["layers"] == len(image_layers) and s_cfg["text_cfg"]["layers"] == len(
        text_layers
    )
    t_state = teacher.state_dict()
    for key, value in state.items():
        layers = image_layers if key.startswith("visual.") else text_layers
        assert torch.equal(value, t_state[_block_map(key, layers)]), key
    student = _student(s_cfg, state)
    image, text = _inputs(cfg)
    with torch.no_grad():
        assert student.encode_image(image).shape == (3, cfg["embed_dim"])


def test_half_width_front_is_tinyclip_front_slices():
    teacher, cfg = _teacher(CUSTOM4)
    spec = parse_inherit("inherit:/runs/t:layers=2,width=0.5,select=front")
    s_cfg, state, record = inherit_from_model(teacher, cfg, spec)
    assert s_cfg["vision_cfg"]["width"] == 64 and s_cfg["text_cfg"]["width"] == 64
    assert s_cfg["text_cfg"]["heads"] == 2 and s_cfg["embed_dim"] == cfg["embed_dim"]
    assert record["image"]["heads"] == [[0, 1], [0, 1]] and record["image"]["residual"] == list(range(64))
    t_state = teacher.state_dict()
    for key, value in state.items():
        ref = t_state[_block_map(key, [0, 2])]
        if key.endswith("attn.in_proj_weight"):  # TinyCLIP: view (3, heads, head_dim, W), keep front heads
            ref = ref.view(3, 4, 32, 128)[:, :2, :, :64].reshape(3 * 2 * 32, 64)
        elif key.endswith("attn.in_proj_bias"):
            ref = ref.view(3, 4, 32)[:, :2].reshape(-1)
        else:
            ref = ref[tuple(slice(0, s) for s in value.shape)]
        assert torch.equal(value, ref), key
    _student(s_cfg, state)


def test_half_width_magnitude_keeps_the_strongest_head():
    teacher, cfg = _teacher(CUSTOM4)
    with torch.no_grad():  # make heads and residual channels beyond the front ones stand out
        teacher.visual.transformer.resblocks[1].attn.in_proj_weight.view(3, 4, 32, 128)[:, 2] *= 10
        teacher.transformer.resblocks[0].attn.in_proj_weight.view(3, 4, 32, 128)[:, 3] *= 10
        teacher.ln_final.weight[100] *= 1000  # a 1-D tensor's channel counts on its own
        teacher.visual.conv1.weight[90] *= 100
    spec = parse_inherit("inherit:/runs/t:width=0.5")
    s_cfg, state, record = inherit_from_model(teacher, cfg, spec)
    assert 2 in record["image"]["heads"][1] and 3 in record["text"]["heads"][0]
    assert 90 in record["image"]["residual"] and 100 in record["text"]["residual"]
    for tower in ("image", "text"):
        assert all(h == sorted(h) and len(h) == 2 for h in record[tower]["heads"])
        res = record[tower]["residual"]
        assert res == sorted(res) and len(res) == 64
    # the kept head's q rows are the teacher's, on the kept residual columns
    res = torch.tensor(record["image"]["residual"])
    slot = record["image"]["heads"][1].index(2)
    t_q = teacher.visual.transformer.resblocks[1].attn.in_proj_weight.view(3, 4, 32, 128)[0, 2][:, res]
    s_q = state["visual.transformer.resblocks.1.attn.in_proj_weight"].view(3, 2, 32, 64)[0, slot]
    assert torch.equal(s_q, t_q)
    student = _student(s_cfg, state)
    image, text = _inputs(cfg)
    with torch.no_grad():
        fi, ft = student.encode_image(image), student.encode_text(text)
    assert fi.shape == ft.shape == (3, cfg["embed_dim"])
    assert torch.isfinite(fi).all() and torch.isfinite(ft).all()


def test_parse_good_specs():
    spec = parse_inherit("inherit:/runs/a:layers=2")
    assert (spec.teacher, spec.image_layers, spec.text_layers, spec.select) == ("/runs/a", 2, 2, "magnitude")
    spec = parse_inherit("inherit:C:/x:y/run:layers=0/2/5,width=0.5,text_width=0.25,select=front")
    assert spec.teacher == "C:/x:y/run" and spec.image_layers == spec.text_layers == [0, 2, 5]
    assert (spec.image_width, spec.text_width, spec.select) == (0.5, 0.25, "front")
    spec = parse_inherit("inherit:r:every=2,text_layers=3")
    assert (spec.image_every, spec.text_every, spec.image_layers, spec.text_layers) == (2, None, None, 3)


@pytest.mark.parametrize(
    "text",
    [
        "inherit:/runs/a",  # no reduction asked
        "inherit::layers=2",  # no teacher
        "teacher:/runs/a:layers=2",
        "inherit:/runs/a:depth=2",
        "inherit:/runs/a:layers=2/1",
        "inherit:/runs/a:layers=1/1",
        "inherit:/runs/a:layers=x",
        "inherit:/runs/a:width=0",
        "inherit:/runs/a:width=1.5",
        "inherit:/runs/a:select=random",
        "inherit:/runs/a:layers=2,every=2",
        "inherit:/runs/a:layers=2,layers=3",
        "inherit:/runs/a:layers",
    ],
)
def test_parse_bad_specs(text):
    with pytest.raises(UserError, match=r"^--student ") as e:
        parse_inherit(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "params, match",
    [
        (
            "width=0.3",
            r"keeps 1\.2 of 4 heads; give a fraction that keeps whole heads \(0\.25, 0\.5, 0\.75, 1\)",
        ),
        ("layers=5", "has 4 layers"),
        ("layers=0/7", "out of range"),
    ],
)
def test_bad_values_for_this_teacher(params, match):
    teacher, cfg = _teacher(CUSTOM4)
    with pytest.raises(UserError, match=r"^--student inherit:/runs/t:.*" + match):
        inherit_from_model(teacher, cfg, parse_inherit(f"inherit:/runs/t:{params}"))


def test_refused_teachers():
    spec = parse_inherit("inherit:/runs/t:layers=1")
    coca_cfg = resolve_model_config(ModelSpec(name="xm-coca-tiny"))
    coca = build_model(ModelSpec(name="xm-coca-tiny"), coca_cfg)
    with pytest.raises(UserError, match=r"^--student .*CoCa"):
        inherit_from_model(coca, coca_cfg, spec)
    micro_cfg = resolve_model_config(ModelSpec(name="xm-micro"))
    micro = build_model(ModelSpec(name="xm-micro"), micro_cfg)
    with pytest.raises(UserError, match=r"^--student .*fusion"):
        inherit_from_model(micro, {**micro_cfg, "fusion": {"layers": 1}}, spec)
    hf_cfg = {**micro_cfg, "text_cfg": {"hf_model_name": "/models/minilm", "context_length": 16}}
    with pytest.raises(UserError, match=r"^--student .*Hugging Face"):
        inherit_from_model(micro, hf_cfg, spec)
    ls_cfg = copy.deepcopy(micro_cfg)
    ls_cfg["vision_cfg"]["ls_init_value"] = 1e-5
    ls = build_model(ModelSpec(name="ls"), ls_cfg)
    with pytest.raises(UserError, match=r"^--student .*layer scale"):
        inherit_from_model(ls, ls_cfg, spec)
    micro.visual.register_buffer("extra", torch.zeros(1))  # a tensor the slicer has no rule for
    with pytest.raises(UserError, match=r"^--student .*cannot slice \(visual\.extra\)"):
        inherit_from_model(micro, micro_cfg, spec)
    with pytest.raises(UserError, match=r"^--student .*not found"):
        inherit_student(parse_inherit("inherit:/no/such/run:layers=1"))


def test_write_student_from_an_export_dir(tmp_path):
    teacher, cfg = _teacher(CUSTOM4)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.json").write_text(json.dumps(cfg))
    torch.save(teacher.state_dict(), export / "open_clip_model.pt")
    spec = parse_inherit(f"inherit:{export}:layers=2,width=0.5")
    s_cfg, state = inherit_student(spec)
    model_json, weights = write_student(spec, tmp_path / "student")
    assert json.loads(model_json.read_text()) == s_cfg
    record = json.loads((tmp_path / "student" / "inherit.json").read_text())
    assert record["teacher"] == str(export.resolve()) and record["select"] == "magnitude"
    assert record["image"]["layers"] == [0, 2] and len(record["text"]["residual"]) == 64
    loaded = build_model(ModelSpec(name=str(model_json), pretrained=str(weights))).eval()
    in_memory = _student(s_cfg, state)
    image, text = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(image), in_memory.encode_image(image))
        assert torch.equal(loaded.encode_text(text), in_memory.encode_text(text))
