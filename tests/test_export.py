"""Export → open_clip loads it and gives the same embeddings as xmodal; the fusion heads travel beside it."""

import open_clip
import torch
from PIL import Image

from tests.conftest import run_cli
from xmodal.data import load_image, resize_center_crop
from xmodal.models import load_encoder


def test_open_clip_loads_the_export_and_embeds_identically(tiny_manifest, tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    run_cli(
        "train",
        "--data",
        str(tiny_manifest),
        "--out",
        str(run),
        "--model",
        "xm-micro",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--no-progress",
        "--objective",
        "siglip+itm",  # a fusion encoder too: open_clip gets the towers only
    )
    run_cli("export", str(run), "--format", "open_clip", str(out))
    assert (out / "model.json").is_file() and (out / "open_clip_model.pt").is_file()
    assert (out / "fusion.safetensors").is_file() and "fusion" not in (out / "model.json").read_text()

    open_clip.add_model_config(out / "model.json")
    oc_model, _, preprocess = open_clip.create_model_and_transforms(
        "model", pretrained=str(out / "open_clip_model.pt")
    )
    oc_model.eval()
    tokenizer = open_clip.get_tokenizer("model")
    enc = load_encoder(run)

    paths = sorted(tiny_manifest.parent.glob("*.png"))[:4]
    # a non-square image too, so resizing and cropping are exercised
    wide = Image.open(paths[0]).convert("RGB").resize((57, 33))
    wide.save(tmp_path / "wide.png")
    paths.append(tmp_path / "wide.png")
    texts = ["a red circle", "blue square on white", "a shape"]
    with torch.no_grad():
        ref_img = oc_model.encode_image(
            torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True
        )
        ref_txt = oc_model.encode_text(tokenizer(texts), normalize=True)
    ours_img = enc.encode_images(
        torch.stack([resize_center_crop(load_image(str(p)), enc.image_size) for p in paths])
    )
    ours_txt = enc.encode_texts(texts)
    assert torch.allclose(ours_img, ref_img, atol=1e-5), (ours_img - ref_img).abs().max()
    assert torch.allclose(ours_txt, ref_txt, atol=1e-5)
    # the trained logit bias (SigLIP) travels too
    assert torch.allclose(oc_model.logit_bias, enc.model.logit_bias)
    # and open_clip's local-dir schema works on the same folder
    m2 = open_clip.create_model(f"local-dir:{out}")
    with torch.no_grad():
        assert torch.allclose(m2.encode_text(tokenizer(texts), normalize=True), ref_txt, atol=1e-6)
    # the export loads back with its fusion encoder, which scores every pair as the run does
    from xmodal.models.fusion import PairScorer

    images = torch.stack([resize_center_crop(load_image(str(p)), enc.image_size) for p in paths[:3]])
    scores = []
    for e in (enc, load_encoder(out)):
        s = PairScorer(e)
        scores.append(s.score(*s.text_states(texts), s.image_states(images)))
    assert torch.equal(scores[0], scores[1]) and scores[0].std() > 0


def test_trimmed_text_encoding_equals_open_clip_full_length():
    from xmodal.models.text import can_trim, encode_text

    enc = load_encoder("xm-tiny")
    assert can_trim(enc.model)
    tok = enc.tokenize(
        ["a red circle", "a much longer caption about a small blue square left of a green star", "x"]
    )
    with torch.no_grad():
        full = enc.model.encode_text(tok, normalize=True)
        trimmed = encode_text(enc.model, tok, normalize=True)
    assert torch.allclose(full, trimmed, atol=1e-5)
