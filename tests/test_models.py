"""Model layer: configs by name or JSON file, local pretrained weights, clear errors."""

import json

import open_clip
import pytest
import torch

from xmodal.errors import UserError
from xmodal.models import ModelSpec, build_model, load_encoder, resolve_model_config


def test_json_config_and_local_weights(tmp_path):
    cfg_path = tmp_path / "my-model.json"
    cfg_path.write_text(json.dumps(open_clip.get_model_config("xm-micro")))
    torch.manual_seed(3)
    source = build_model(ModelSpec(name=str(cfg_path)))
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": source.state_dict()}, weights)  # open_clip checkpoint layout
    enc = load_encoder(str(cfg_path), pretrained=str(weights))
    for k, v in source.state_dict().items():
        assert torch.equal(v, enc.model.state_dict()[k]), k
    assert enc.image_size == 32 and enc.dim == 32


def test_errors_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="--model no-such"):
        resolve_model_config(ModelSpec(name="no-such"))
    with pytest.raises(UserError, match="--pretrained"):
        build_model(ModelSpec(name="xm-micro", pretrained=str(tmp_path / "missing.pt")))
    wrong = tmp_path / "wrong.pt"
    torch.save(build_model(ModelSpec(name="xm-tiny")).state_dict(), wrong)
    with pytest.raises(UserError, match="does not fit"):
        build_model(ModelSpec(name="xm-micro", pretrained=str(wrong)))
    with pytest.raises(UserError, match="--hf-text"):
        resolve_model_config(ModelSpec(hf_text=str(tmp_path)))
