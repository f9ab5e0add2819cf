"""Encoder: a model plus its tokenizer and pixel normalisation, for embedding images and texts.

Every consumer (eval, index, serve, the trainer's validation) embeds through this class, so all of
them see identical preprocessing. Images arrive as uint8 tensors N×3×S×S already resized and centre-
cropped to the model's size (see `xmodal.data`), which equals open_clip's own transform after ToTensor.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
import yaml

from xmodal.errors import UserError
from xmodal.fsutil import load_torch_safe
from xmodal.models.build import ModelSpec, build_model, build_tokenizer, resolve_model_config
from xmodal.models.pooled import encode_image
from xmodal.models.text import encode_text

RANDOM_INIT_SEED = 0


def pick_device(device: str | None = None) -> torch.device:
    """auto (CUDA where there is one, else the CPU), cpu, cuda or cuda:N; UserError for anything else."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return dev


class Encoder:
    """Embeds images (uint8 N×3×S×S) and texts into L2-normalised float32 vectors on the CPU."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        model_cfg: dict[str, Any],
        device: torch.device | str = "cpu",
        name: str = "model",
        autocast_dtype: torch.dtype | None = None,
        random_init: bool = False,
    ) -> None:
        self.model = model
        self.random_init = random_init  # no weights were loaded: results from it mean nothing
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.name = name
        self.autocast_dtype = autocast_dtype
        size = model_cfg["vision_cfg"].get("image_size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        pp = model_cfg.get("preprocess_cfg", {})
        self.mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
        self.dim = int(model_cfg["embed_dim"])

    # -- pixels ---------------------------------------------------------------------------------
    def normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """float pixels in [0, 1] (N×3×S×S) → model input (mean/std normalised)."""
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def embed_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable: float pixels in [0, 1] on self.device → normalised features (for attacks)."""
        return F.normalize(encode_image(self.model, self.normalize_pixels(x)).float(), dim=-1)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 N×3×S×S → float32 N×D, L2-normalised, on the CPU."""
        if images.dtype != torch.uint8:
            raise TypeError("encode_images expects uint8 images; use embed_pixels for float pixels")
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device, non_blocking=True).float().div_(255)
            with self._autocast():
                f = encode_image(self.model, self.normalize_pixels(x))
            out.append(F.normalize(f.float(), dim=-1).cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """list of strings → float32 N×D, L2-normalised, on the CPU."""
        was_training = self.model.training
        self.model.eval()
        out = []
        texts = list(texts)
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size]).to(self.device)
            with self._autocast():
                f = encode_text(self.model, tok)
            out.append(F.normalize(f.float(), dim=-1).cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def load_encoder(
    source: str | Path,
    pretrained: str | None = None,
    device: str | None = None,
    checkpoint: str | None = None,
) -> Encoder:
    """Load an Encoder from an xmodal run directory, an exported open_clip directory (model.json +
    open_clip_model.pt), or an open_clip config name / JSON with `pretrained` local weights."""
    dev = pick_device(device)
    src = Path(source)
    random_init = False
    if src.is_dir() and (src / "config.yaml").is_file():  # xmodal run
        cfg = yaml.safe_load((src / "config.yaml").read_text())
        ckpt = Path(checkpoint) if checkpoint else src / "checkpoints" / "latest.pt"
        if not ckpt.is_file():
            raise UserError(f"{src}: run has no checkpoint at {ckpt}; train it first (xmodal train)")
        spec = ModelSpec(**{k: v for k, v in cfg["model"].items() if k in ModelSpec.__dataclass_fields__})
        spec.pretrained = None
        model = build_model(spec, cfg["model_config"], load_hf_weights=False)
        state = load_torch_safe(ckpt, "checkpoint")
        model.load_state_dict(state["model"])
        model_cfg, name = cfg["model_config"], src.name
    elif src.is_dir() and (src / "model.json").is_file():  # open_clip export
        model_cfg = json.loads((src / "model.json").read_text())
        weights = src / "open_clip_model.pt"
        if not weights.is_file():
            raise UserError(f"{src}: export has model.json but no open_clip_model.pt")
        model = build_model(
            ModelSpec(name=str(src / "model.json"), pretrained=str(weights)), model_cfg, load_hf_weights=False
        )
        if (src / "fusion.json").is_file():  # xmodal's fusion encoder, exported beside the towers
            from xmodal.models.fusion import load_exported_fusion

            model_cfg = {**model_cfg, "fusion": load_exported_fusion(model, src)}
        name = src.name
    elif src.is_dir():
        raise UserError(f"{src}: not an xmodal run (config.yaml) nor an open_clip export (model.json)")
    else:
        spec = ModelSpec(name=str(source), pretrained=pretrained)
        model_cfg = resolve_model_config(spec)
        # Without weights the model is a random init: seed it, so that one config name always means one
        # model (an index built from it in a test or demo can be searched by text later).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = build_model(spec, model_cfg)
        name = src.stem
        random_init = not pretrained
        if random_init:
            print(
                f"warning: {source} is a model config without weights (no --pretrained): a seeded random "
                "initialisation, whose results mean nothing",
                file=sys.stderr,
            )
    model.to(dev).eval()
    return Encoder(
        model, build_tokenizer(model_cfg), model_cfg, device=dev, name=name, random_init=random_init
    )
