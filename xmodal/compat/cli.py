"""`xmodal compat fit --old OLD_RUN --new NEW_RUN --data M --out PROJ`: fit the projection that lets the new
model's queries search a gallery the old model embedded (text only first, then a few image-text pairs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from xmodal.errors import UserError

compat_app = typer.Typer(
    help="Backward-compatible upgrades: map a new model's embeddings into an old model's space.",
    no_args_is_help=True,
)


def model_record(source: str, encoder: object) -> dict:
    """What projection.json records about a model: index.json's record (describe_source) plus its name,
    dimension and a fingerprint of its weights (to tell whether an index's model is this one)."""
    from xmodal.index.embed import encoder_fingerprint
    from xmodal.index.model import describe_source

    return {
        "name": getattr(encoder, "name", None),
        **describe_source(source, None),
        "dim": int(encoder.dim),
        "weights": encoder_fingerprint(encoder),
    }


@compat_app.command("fit")
def fit_cmd(
    old: Annotated[str, typer.Option("--old", help="the old model (run dir, export): the gallery's space")],
    new: Annotated[str, typer.Option("--new", help="the new model (run dir, export): the queries' model")],
    data: Annotated[Path, typer.Option("--data", help="manifest whose captions (and a few images) fit it")],
    out: Annotated[Path, typer.Option("--out", help="folder for projection.json + projection.safetensors")],
    pairs: Annotated[
        int, typer.Option("--pairs", min=0, help="image-caption pairs for stage 2 (seeded random sample)")
    ] = 256,
    texts_only: Annotated[
        bool, typer.Option("--texts-only", help="fit on captions alone (no image is embedded)")
    ] = False,
    steps: Annotated[int, typer.Option("--steps", min=0, help="AdamW steps of the text stage")] = 300,
    pair_steps: Annotated[int, typer.Option("--pair-steps", min=0, help="steps of the pair stage")] = 100,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 3e-3,
    kind: Annotated[
        str, typer.Option("--kind", help="mlp (linear + a residual ReLU MLP), or linear")
    ] = "mlp",
    hidden: Annotated[int, typer.Option("--hidden", min=1, help="mlp: hidden width")] = 256,
    image_side: Annotated[
        str,
        typer.Option(
            "--image-side",
            help="pairs: shift (the text map + an image offset), own (a full image map) or shared",
        ),
    ] = "shift",
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="InfoNCE temperature")] = 0.1,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=2, help="InfoNCE batch (also embedding)")
    ] = 256,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 … (embedding)")] = None,
    image_key: Annotated[str | None, typer.Option("--image-key")] = None,
    caption_key: Annotated[str | None, typer.Option("--caption-key")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the summary here")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Fit a projection from NEW's embedding space into OLD's on --data: all captions first, then --pairs
    image-caption pairs (none with --texts-only); prints what it fitted on and what it embedded."""
    from xmodal.compat.data import embed_for_fit
    from xmodal.compat.fit import IMAGE_SIDES, fit_projection
    from xmodal.compat.projection import KINDS, check_out
    from xmodal.fsutil import write_text_atomic
    from xmodal.models import load_encoder

    if kind not in KINDS:
        raise UserError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    if image_side not in IMAGE_SIDES:
        raise UserError(f"--image-side {image_side}: choose one of {', '.join(IMAGE_SIDES)}")
    if temperature <= 0 or lr <= 0:
        raise UserError("--temperature and --lr must be > 0")
    if not data.exists():
        raise UserError(f"--data {data}: file not found")
    check_out(out)  # before any model loads
    enc_old = load_encoder(old, device=device)
    enc_new = load_encoder(new, device=device)

    def log(msg: str) -> None:
        if not quiet:
            typer.echo(f"[compat] {msg}", err=True)

    fd = embed_for_fit(
        enc_old,
        enc_new,
        data,
        pairs=0 if texts_only else pairs,
        seed=seed,
        batch_size=batch_size,
        image_key=image_key,
        caption_key=caption_key,
        log=log,
    )
    log(f"fitting a {kind} map {enc_new.dim}-d → {enc_old.dim}-d")
    proj = fit_projection(
        fd.new_text,
        fd.old_text,
        fd.new_image,
        fd.old_image,
        steps=steps,
        pair_steps=pair_steps,
        lr=lr,
        seed=seed,
        pair_text_index=fd.pair_text_index,
        kind=kind,
        hidden=hidden,
        image_side=image_side,
        temperature=temperature,
        batch_size=batch_size,
    )
    proj.old_model = model_record(old, enc_old)
    proj.new_model = model_record(new, enc_new)
    proj.embedded = fd.embedded
    if fd.skipped:
        proj.settings["skipped_images"] = fd.skipped
    proj.save(out)
    summary = {"projection": str(out), **proj.info, "embedded": proj.embedded, "losses": proj.losses}
    if fd.skipped:
        summary["skipped_images"] = fd.skipped
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(summary, indent=2) + "\n")
    e = proj.embedded
    typer.echo(
        f"projection {out}: {kind} {proj.d_new}-d → {proj.d_old}-d, fitted on {proj.fitted_on['text']} texts "
        f"and {proj.fitted_on['pairs']} image-text pairs; image side: {proj.info['image_map']}"
    )
    typer.echo(
        f"embedded: old model {e['old']['texts']} texts + {e['old']['images']} images, new model "
        f"{e['new']['texts']} texts + {e['new']['images']} images"
    )
    for stage, s in proj.losses.items():
        if s.get("steps"):
            typer.echo(f"loss ({stage}): {s['first']:.4f} → {s['last']:.4f} over {s['steps']} steps")
    typer.echo(f"fingerprint {proj.fingerprint}")


def register(app: typer.Typer) -> None:
    app.add_typer(compat_app, name="compat")
