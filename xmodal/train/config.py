"""Training configuration: defaults < YAML file < command-line flags. The resolved config is saved
with the run (config.yaml) so that a run can be resumed, evaluated and exported from its folder alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from xmodal.errors import UserError
from xmodal.fsutil import write_text_atomic


@dataclass
class TrainConfig:
    data: str = ""  # training manifest (JSONL, CSV/TSV, image folder, or webdataset shards)
    out: str = "runs/run"  # run directory
    val: str | None = None  # validation manifest, evaluated every `eval_every` steps
    # model
    model: str = "xm-tiny"
    pretrained: str | None = None
    hf_text: str | None = None
    lock_image: bool = False
    lock_text: bool = False
    objective: str = "clip"  # clip | siglip
    # optimisation
    batch_size: int = 128  # global batch (all ranks, all accumulation steps): the set of negatives
    accum_steps: int = 1  # micro-batches per step; features are cached so negatives stay the full batch
    steps: int | None = None  # total optimiser steps (overrides epochs)
    epochs: float = 10.0
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: int = 100
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA)
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    fsdp: bool = False  # shard parameters/gradients/optimizer state over ranks (torchrun)
    # augmentation
    aug_crop_scale: float = 1.0
    aug_flip: float = 0.0
    aug_color: float = 0.0
    aug_word_drop: float = 0.0
    # data
    image_key: str | None = None
    caption_key: str | None = None
    label_key: str | None = None
    cache_dir: str | None = None
    # bookkeeping
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELD_NAMES = {f.name for f in fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value")
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(raw) - FIELD_NAMES)
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return raw


def resolve_config(yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """defaults < YAML < flags (flags given as None are 'not set')."""
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(load_yaml(yaml_path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise UserError("--data is required: a manifest (JSONL/CSV/TSV), image folder or .tar shards")
    if cfg.objective not in ("clip", "siglip"):
        raise UserError(f"--objective {cfg.objective}: use clip or siglip")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision {cfg.precision}: use auto, fp32, bf16 or fp16")
    if cfg.batch_size < 2:
        raise UserError("--batch-size must be at least 2 (contrastive losses need negatives)")
    if cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
        raise UserError(f"--accum-steps {cfg.accum_steps} must divide --batch-size {cfg.batch_size}")
    if cfg.steps is not None and cfg.steps < 1:
        raise UserError("--steps must be positive")
    if cfg.lr <= 0:
        raise UserError("--lr must be positive")
    if not 0 < cfg.aug_crop_scale <= 1:
        raise UserError("--aug-crop-scale must be in (0, 1]")


def save_config(
    cfg: TrainConfig, model_spec: dict[str, Any], model_config: dict[str, Any], path: Path
) -> None:
    """config.yaml = train options + the model spec + the exact open_clip model config."""
    doc = {"train": cfg.to_dict(), "model": model_spec, "model_config": model_config}
    write_text_atomic(path, yaml.safe_dump(doc, sort_keys=False))


def load_run_config(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "config.yaml"
    if not p.is_file():
        raise UserError(f"{run_dir}: not an xmodal run (no config.yaml)")
    return yaml.safe_load(p.read_text())
