"""Model layer: open_clip towers built from a config, local weights, HF text towers, and the Encoder
that every later stage (eval, index, serve) uses to embed images and texts."""

from xmodal.models.build import (
    ModelSpec,
    build_model,
    build_tokenizer,
    minilm_path,
    resolve_model_config,
)
from xmodal.models.encoder import Encoder, load_encoder

__all__ = [
    "Encoder",
    "ModelSpec",
    "build_model",
    "build_tokenizer",
    "load_encoder",
    "minilm_path",
    "resolve_model_config",
]
