"""Export a trained run in open_clip's own format (DESIGN.md 'Export' contract)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from xmodal.errors import UserError
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
    _write_atomic(out / "open_clip_model.pt", lambda f: torch.save(enc.model.state_dict(), f))
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().clone() for k, v in enc.model.state_dict().items()}
    _write_atomic(out / "open_clip_model.safetensors", lambda f: f.write(st_save(tensors)))
    _write_atomic(out / "model.json", lambda f: f.write(json.dumps(model_cfg, indent=2).encode()))
    _write_atomic(
        out / "open_clip_config.json",
        lambda f: f.write(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2).encode()
        ),
    )
    return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
