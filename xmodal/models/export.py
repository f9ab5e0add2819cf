"""Export a trained run in open_clip's own format (DESIGN.md 'Export' contract)."""

from __future__ import annotations

import json
from pathlib import Path

from xmodal.errors import UserError
from xmodal.fsutil import save_torch_atomic, write_bytes_atomic, write_text_atomic
from xmodal.models.encoder import load_encoder


def export_open_clip(run: str | Path, out_dir: str | Path, checkpoint: str | None = None) -> Path:
    """Write OUT/model.json (open_clip model config) and OUT/open_clip_model.pt (state dict), plus
    OUT/open_clip_config.json + open_clip_model.safetensors so that open_clip's `local-dir:OUT` schema
    (which looks for those names) works as well."""
    enc = load_encoder(run, device="cpu", checkpoint=checkpoint)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = dict(enc.model_cfg)
    preprocess = {
        "size": enc.image_size,
        "mean": enc.mean.flatten().tolist(),
        "std": enc.std.flatten().tolist(),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    save_torch_atomic(enc.model.state_dict(), out / "open_clip_model.pt")
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().clone() for k, v in enc.model.state_dict().items()}
    write_bytes_atomic(out / "open_clip_model.safetensors", st_save(tensors))
    write_text_atomic(out / "model.json", json.dumps(model_cfg, indent=2))
    write_text_atomic(
        out / "open_clip_config.json",
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2),
    )
    return out

