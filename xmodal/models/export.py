"""Export a trained run in open_clip's own format (DESIGN.md 'Export' contract)."""

from __future__ import annotations

import json
from pathlib import Path

from xmodal.errors import UserError
from xmodal.fsutil import save_torch_atomic, write_bytes_atomic, write_text_atomic
from xmodal.models.build import EXTRA_HEADS
from xmodal.models.encoder import load_encoder


def export_open_clip(run: str | Path, out_dir: str | Path, checkpoint: str | None = None) -> Path:
    """Write OUT/model.json (open_clip model config) and OUT/open_clip_model.pt (state dict), plus
    OUT/open_clip_config.json + open_clip_model.safetensors so that open_clip's `local-dir:OUT` schema
    (which looks for those names) works as well. A fusion encoder (ITM/MLM heads) is not part of
    open_clip's model: it goes to OUT/fusion.safetensors + OUT/fusion.json beside the towers, and
    `load_encoder(OUT)` attaches it again. SyCoCa's TG-MIM image decoder, `feature` distillation's
    projection and hash heads are not part of open_clip's model: they are left out."""
    enc = load_encoder(run, device="cpu", checkpoint=checkpoint)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = dict(enc.model_cfg)
    fusion_cfg = model_cfg.get("fusion")
    for name in (*EXTRA_HEADS, "tome"):  # (open_clip's towers run without ToMe's merging)
        model_cfg.pop(name, None)
    preprocess = {
        "size": enc.image_size,
        "mean": enc.mean.flatten().tolist(),
        "std": enc.std.flatten().tolist(),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    state = enc.model.state_dict()
    towers = {k: v for k, v in state.items() if not k.startswith(tuple(f"{h}." for h in EXTRA_HEADS))}
    save_torch_atomic(towers, out / "open_clip_model.pt")
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().clone() for k, v in towers.items()}
    write_bytes_atomic(out / "open_clip_model.safetensors", st_save(tensors))
    if fusion_cfg is not None:
        fusion = {
            k[len("fusion.") :]: v.detach().contiguous().clone()
            for k, v in state.items()
            if k.startswith("fusion.")
        }
        write_bytes_atomic(out / "fusion.safetensors", st_save(fusion))
        write_text_atomic(out / "fusion.json", json.dumps(fusion_cfg, indent=2))
    else:  # a re-export into the same folder must not leave an old run's heads beside new towers
        for stale in ("fusion.safetensors", "fusion.json"):
            (out / stale).unlink(missing_ok=True)
    write_text_atomic(out / "model.json", json.dumps(model_cfg, indent=2))
    write_text_atomic(
        out / "open_clip_config.json",
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2),
    )
    return out
