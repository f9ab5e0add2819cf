"""Training configuration: defaults < recipe < YAML file < command-line flags. The resolved config is
saved with the run (config.yaml) so that a run can be resumed, evaluated and exported from its folder
alone."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from xmodal.errors import UserError
from xmodal.fsutil import write_text_atomic
from xmodal.train.recipes import recipe_values


@dataclass
class TrainConfig:
    data: str = ""  # training manifest (JSONL, CSV/TSV, image folder, or webdataset shards)
    out: str = "runs/run"  # run directory
    val: str | None = None  # validation manifest, evaluated every `eval_every` steps
    replay: str | None = None  # old data (read like `data`): a share of every batch is drawn from it
    replay_fraction: float | None = None  # that share: round(f · batch_size) rows (0.2 when replay is set)
    recipe: str | None = None  # a paper's option values (xmodal.train.recipes); YAML and flags win over it
    # model
    model: str = "xm-tiny"
    pretrained: str | None = None
    init_from: str | None = None  # an xmodal run whose latest weights start this run (new heads start fresh)
    hf_text: str | None = None
    hf_pooler: str = "mean_pooler"  # how a Hugging Face text tower pools its tokens (open_clip's poolers)
    lock_image: bool = False
    lock_text: bool = False
    lock_image_unlocked_groups: int = 0  # LiT: the last N layer groups of a locked image tower still train
    lock_text_unlocked_layers: int = 0  # the last N layers of a locked text tower still train
    # objectives by name, composed by weight: "clip", "clip+uniformity:0.1(t=3)" (`xmodal objectives`);
    # in YAML also a list of {name, weight, params} (key `objectives`)
    objective: str | list = "clip"
    # distillation (`xmodal distill`): a frozen teacher for the objectives that need one (affinity, feature)
    teacher: str | None = (
        None  # an xmodal run, an open_clip export folder, or a config with teacher_pretrained
    )
    teacher_pretrained: str | None = None  # local weights for a teacher given as a config
    teacher_cache: str = (
        "auto"  # auto: cache its training-set features unless augmentation forbids | on | off
    )
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
    patch_dropout: float = 0.0  # FLIP: the share of image patches each training step drops (0 = off)
    unmasked_steps: int = 0  # FLIP's unmasked tuning: the run's last N steps see every patch
    tome: int = 0  # ToMe: image tokens merged in each image-tower block, in training and after (0 = off)
    seed: int = 0
    device: str = "auto"
    fsdp: bool = False  # shard parameters/gradients/optimizer state over ranks (torchrun)
    # augmentation
    aug_crop_scale: float = 1.0
    aug_flip: float = 0.0
    aug_color: float = 0.0
    aug_word_drop: float = 0.0
    aug_randaugment_n: int = 0  # RandAugment ops per image (torchvision's ops and magnitudes); 0 = off
    aug_randaugment_m: int = 9  # RandAugment magnitude bin, 0..30
    aug_text_eda: float = 0.0  # EDA's α on captions (synonym replacement, swap, deletion); 0 = off
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELD_NAMES = {f.name for f in fields(TrainConfig)}
FIELD_TYPES = typing.get_type_hints(TrainConfig)
PROBABILITIES = ("aug_flip", "aug_word_drop")
REPLAY_FRACTION = 0.2  # --replay without --replay-fraction
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEACHER_CACHE = ("auto", "on", "off")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def coerce(name: str, value: Any) -> Any:
    """`value` as the type of field `name`; UserError naming the key otherwise. YAML reads `lr: 1e-3` as
    the string '1e-3' (it wants `1.0e-3`), so numbers written as strings are converted."""
    typ = FIELD_TYPES[name]
    optional = isinstance(typ, types.UnionType) and type(None) in typing.get_args(typ)
    if optional:
        if value is None:
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if isinstance(typ, types.UnionType):  # str | list: a spec string, or a YAML list
        if isinstance(value, (str, list)):
            return value
        raise UserError(f"{name}: expected a string or a list, got {value!r}")
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[typ]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(value, str):
        return value
    raise UserError(f"{name}: expected {want}, got {value!r}")


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
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    if "objectives" in raw:  # the YAML list form of --objective
        if "objective" in raw:
            raise UserError(f"--config {path}: give objective or objectives, not both")
        raw["objective"] = raw.pop("objectives")
    unknown = sorted(set(raw) - FIELD_NAMES)
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    try:
        return {k: coerce(k, v) for k, v in raw.items()}
    except UserError as e:
        raise UserError(f"--config {path}: {e}") from None


def resolve_config(
    yaml_path: str | None, overrides: dict[str, Any], base: dict[str, Any] | None = None
) -> TrainConfig:
    """defaults < `base` (a resumed run's saved options) < recipe < YAML < flags (flags given as None are
    'not set'). The recipe is the one named by the flags, else by the YAML file; a recipe known only from
    `base` adds nothing, its values are in `base` already. Every value is converted to its field's type."""
    values: dict[str, Any] = {}
    if base:
        values.update({k: coerce(k, v) for k, v in base.items() if k in FIELD_NAMES})
    from_yaml = load_yaml(yaml_path) if yaml_path else {}
    flags = {k: coerce(k, v) for k, v in overrides.items() if v is not None}
    recipe = flags.get("recipe", from_yaml.get("recipe"))
    if recipe is not None:
        values.update({k: coerce(k, v) for k, v in recipe_values(recipe).items()})
        values["recipe"] = recipe
    values.update(from_yaml)
    values.update(flags)
    cfg = TrainConfig(**values)
    validate(cfg)
    if cfg.replay and cfg.replay_fraction is None:
        cfg.replay_fraction = REPLAY_FRACTION  # recorded in config.yaml as the value used
    return cfg


def replay_rows(cfg: TrainConfig) -> int:
    """Rows of each global batch drawn from `--replay`: round(fraction · batch size); 0 without replay."""
    if not cfg.replay:
        return 0
    f = cfg.replay_fraction if cfg.replay_fraction is not None else REPLAY_FRACTION
    return round(f * cfg.batch_size)


def _validate_replay(cfg: TrainConfig) -> None:
    f = cfg.replay_fraction
    if not cfg.replay:
        if f is not None:
            raise UserError(
                f"--replay-fraction {f} needs --replay OLD_MANIFEST (the old data the share is drawn from)"
            )
        return
    if f is not None and not 0 < f < 1:
        raise UserError(f"--replay-fraction {f}: the share of each batch drawn from --replay, in (0, 1)")
    if "{" not in cfg.replay and not Path(cfg.replay).exists():  # (a brace pattern: shards, checked on read)
        raise UserError(
            f"--replay {cfg.replay}: not found; give the old data's manifest (JSONL/CSV/TSV), image folder "
            "or .tar shards"
        )
    rows, f = replay_rows(cfg), f if f is not None else REPLAY_FRACTION
    if rows == 0:
        raise UserError(
            f"--replay-fraction {f} of --batch-size {cfg.batch_size} rounds to no replayed row; raise it to "
            f"at least {1 / cfg.batch_size:.3g} (or raise --batch-size)"
        )
    if rows == cfg.batch_size:
        raise UserError(
            f"--replay-fraction {f} of --batch-size {cfg.batch_size} leaves no row for --data; lower it"
        )


def validate(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise UserError("--data is required: a manifest (JSONL/CSV/TSV), image folder or .tar shards")
    from xmodal.data.augment import RANDAUGMENT_BINS
    from xmodal.objectives import Composite

    Composite.from_config(cfg.objective)  # unknown names or parameters: a one-line error listing them
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision {cfg.precision}: use {', '.join(PRECISIONS)}")
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
    if not 0 <= cfg.aug_randaugment_m <= RANDAUGMENT_BINS - 1:
        raise UserError(
            f"--aug-randaugment-m {cfg.aug_randaugment_m}: a magnitude bin, in [0, {RANDAUGMENT_BINS - 1}]"
        )
    if not 0 <= cfg.aug_text_eda <= 1:
        raise UserError(f"--aug-text-eda {cfg.aug_text_eda}: EDA's α, a fraction of the words, in [0, 1]")
    for name in PROBABILITIES:
        if not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"{_flag(name)} {getattr(cfg, name)}: a probability, in [0, 1]")
    at_least = {
        "log_every": 1,
        "save_every": 1,
        **dict.fromkeys(
            ("keep_checkpoints", "eval_every", "warmup", "aug_randaugment_n", "unmasked_steps", "tome"), 0
        ),
        **dict.fromkeys(("lock_image_unlocked_groups", "lock_text_unlocked_layers"), 0),
        **dict.fromkeys(("aug_color", "weight_decay", "grad_clip", "min_lr"), 0.0),
    }
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            raise UserError(f"{_flag(name)} {getattr(cfg, name)}: must be ≥ {low}")
    for name in ("epochs", "eps"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"{_flag(name)} {getattr(cfg, name)}: must be positive")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"{_flag(name)} {getattr(cfg, name)}: Adam's betas are in [0, 1)")
    if not 0 <= cfg.patch_dropout < 1:
        raise UserError(f"--patch-dropout {cfg.patch_dropout}: the share of patches dropped, in [0, 1)")
    if cfg.unmasked_steps and not cfg.patch_dropout:
        raise UserError(
            "--unmasked-steps tunes without patch dropout after it; add --patch-dropout (e.g. 0.5)"
        )
    if cfg.teacher_cache not in TEACHER_CACHE:
        raise UserError(f"--teacher-cache {cfg.teacher_cache}: use {', '.join(TEACHER_CACHE)}")
    if cfg.teacher_pretrained and not cfg.teacher:
        raise UserError("--teacher-pretrained needs --teacher (the config those weights belong to)")
    if cfg.eval_every and not cfg.val:
        raise UserError("--eval-every needs --val (a validation manifest)")
    _validate_replay(cfg)


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
