"""`xmodal train` and `xmodal export`."""

import inspect
from pathlib import Path

import typer

from xmodal.errors import UserError
from xmodal.train.recipes import recipes_help


def train(
    data: str | None = typer.Option(
        None, help="Training manifest (JSONL/CSV/TSV), image folder or .tar shards."
    ),
    out: str | None = typer.Option(None, help="Run directory (checkpoints, metrics, config)."),
    config: str | None = typer.Option(None, help="YAML file of options; flags given here win."),
    recipe: str | None = typer.Option(
        None,
        help="A paper's option values; --config and flags given here win over them. " + recipes_help(),
    ),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints/latest.pt."),
    resume_override: bool = typer.Option(
        False, help="Resume even though --batch-size, --seed or the data differ from the run's."
    ),
    val: str | None = typer.Option(None, help="Validation manifest, evaluated every --eval-every steps."),
    replay: str | None = typer.Option(
        None, help="Old data (read like --data): a share of every batch is drawn from it (--replay-fraction)."
    ),
    replay_fraction: float | None = typer.Option(
        None, help="With --replay: the share of each batch from it, in (0, 1); round(f·batch) rows (0.2)."
    ),
    model: str | None = typer.Option(
        None, help="open_clip config name (e.g. xm-tiny, ViT-B-32) or JSON file."
    ),
    pretrained: str | None = typer.Option(None, help="Local checkpoint to start from."),
    init_from: str | None = typer.Option(
        None, help="An xmodal run whose latest weights start this one (--model must be its config)."
    ),
    hf_text: str | None = typer.Option(None, help="Local Hugging Face model dir used as the text tower."),
    hf_pooler: str | None = typer.Option(
        None, help="Pooling of a HF text tower: mean_pooler, cls_pooler, cls_last_hidden_state_pooler…"
    ),
    lock_image: bool | None = typer.Option(
        None, "--lock-image/--no-lock-image", help="Freeze the image tower (LiT)."
    ),
    lock_image_unlocked_groups: int | None = typer.Option(
        None, help="With --lock-image: the last N layer groups still train."
    ),
    lock_text: bool | None = typer.Option(None, "--lock-text/--no-lock-text", help="Freeze the text tower."),
    lock_text_unlocked_layers: int | None = typer.Option(
        None, help="With --lock-text: the last N transformer layers still train."
    ),
    objective: str | None = typer.Option(
        None,
        help="Objectives by name, joined by + with optional :WEIGHT and (KEY=VALUE,…): clip, siglip, "
        "clip+uniformity:0.1 … (`xmodal objectives` lists them).",
    ),
    batch_size: int | None = typer.Option(None, help="Global batch = the negatives each sample sees."),
    accum_steps: int | None = typer.Option(
        None, help="Micro-batches per step (cached features, full negatives)."
    ),
    steps: int | None = typer.Option(None, help="Optimiser steps (overrides --epochs)."),
    epochs: float | None = typer.Option(None),
    lr: float | None = typer.Option(None),
    min_lr: float | None = typer.Option(None),
    warmup: int | None = typer.Option(None, help="Linear warm-up steps before the cosine decay."),
    weight_decay: float | None = typer.Option(None),
    beta1: float | None = typer.Option(None, help="AdamW beta1 (default 0.9)."),
    beta2: float | None = typer.Option(None, help="AdamW beta2 (default 0.98)."),
    eps: float | None = typer.Option(None, help="AdamW epsilon (default 1e-6)."),
    grad_clip: float | None = typer.Option(None, help="Max gradient norm (0 = off)."),
    precision: str | None = typer.Option(None, help="auto | fp32 | bf16 | fp16 (CUDA only)."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the towers."),
    patch_dropout: float | None = typer.Option(
        None, help="FLIP: drop this share of the image patches in training, e.g. 0.5 (0 = off)."
    ),
    tome: int | None = typer.Option(
        None, help="ToMe: merge this many image tokens in each image-tower block (training and after)."
    ),
    unmasked_steps: int | None = typer.Option(
        None, help="FLIP's unmasked tuning: the last N steps train on every patch (with --patch-dropout)."
    ),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto | cpu | cuda"),
    fsdp: bool | None = typer.Option(None, "--fsdp/--no-fsdp", help="Shard the model over ranks (torchrun)."),
    aug_crop_scale: float | None = typer.Option(
        None, help="Random resized crop, min area fraction (1 = off)."
    ),
    aug_flip: float | None = typer.Option(None, help="Horizontal flip probability."),
    aug_color: float | None = typer.Option(None, help="Colour jitter strength."),
    aug_word_drop: float | None = typer.Option(None, help="Caption word-dropout probability."),
    aug_randaugment_n: int | None = typer.Option(
        None, help="RandAugment: ops per image, torchvision's op list (0 = off)."
    ),
    aug_randaugment_m: int | None = typer.Option(None, help="RandAugment magnitude, 0..30 (default 9)."),
    aug_text_eda: float | None = typer.Option(
        None, help="EDA on captions: α, the fraction of words replaced/swapped/deleted (0 = off)."
    ),
    image_key: str | None = typer.Option(None, help="CSV/TSV image column (default filepath)."),
    caption_key: str | None = typer.Option(None, help="CSV/TSV caption column (default title)."),
    label_key: str | None = typer.Option(None),
    cache_dir: str | None = typer.Option(None, help="Preprocessed image cache (default ~/.cache/xmodal)."),
    log_every: int | None = typer.Option(None),
    save_every: int | None = typer.Option(None, help="Checkpoint every N steps (and at the end)."),
    keep_checkpoints: int | None = typer.Option(None),
    eval_every: int | None = typer.Option(
        None, help="Validate every N steps (needs --val); with --val alone, once at the end."
    ),
    progress: bool | None = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """Train an image-text embedding model."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "resume", "resume_override")}
    run_training(config, resume, resume_override, overrides)


def option(name: str, default, annotation, help: str) -> inspect.Parameter:
    """A keyword-only typer option, for commands that extend `train`'s signature (`with_train_options`)."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, help=help), annotation=annotation
    )


def with_train_options(command, own: list[inspect.Parameter], replaced: tuple[str, ...]) -> None:
    """Give `command(**kw)` its own parameters followed by every `train` option except `replaced`; typer
    reads the options from the signature, so distill and hash train take all of train's flags."""
    rest = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(train).parameters.items()
        if name not in replaced
    ]
    command.__signature__ = inspect.Signature(own + rest)


def run_training(config: str | None, resume: bool, resume_override: bool, overrides: dict) -> None:
    """`train`'s body, shared with `distill`: options resolved (a resumed run's own first), then fit."""
    from xmodal.train.config import load_run_config, resolve_config
    from xmodal.train.trainer import Trainer

    out = overrides.get("out")
    saved = None
    if resume and out and config is None and (Path(out) / "config.yaml").is_file():
        saved = load_run_config(Path(out))["train"]  # the run's own options; flags given now win
    cfg = resolve_config(config, overrides, base=saved)
    trainer = Trainer(cfg, resume=resume, resume_override=resume_override)
    run = trainer.fit()
    if trainer.dist.is_main:
        typer.echo(f"run: {run}")
    from xmodal.train.distributed import cleanup

    cleanup()


def export(
    run: str = typer.Argument(..., help="xmodal run directory."),
    out_dir: str = typer.Argument(..., help="Folder to write."),
    format: str = typer.Option("open_clip", "--format", help="Export format (open_clip)."),
    checkpoint: str | None = typer.Option(None, help="A specific checkpoint file (default latest.pt)."),
) -> None:
    """Export a run for other tools: open_clip's model.json + open_clip_model.pt."""
    from xmodal.models.export import export_open_clip

    if format != "open_clip":
        raise UserError(f"--format {format}: only open_clip is supported")
    out = export_open_clip(run, out_dir, checkpoint)
    typer.echo(
        f"exported to {out} (open_clip.add_model_config('{out}/model.json'), then "
        f"create_model_and_transforms('model', pretrained='{out}/open_clip_model.pt'))"
    )


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("export")(export)
