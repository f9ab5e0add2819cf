"""`xmodal caption RUN [IMAGE…] | --data MANIFEST --out F.jsonl`: captions from a CoCa run."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from xmodal.errors import UserError


def _decoding(max_len, min_len, beam, top_p, temperature, seed, length_penalty):
    """The options → a checked `Decoding` (all but the model's context length; that is checked later)."""
    from xmodal.models.captioner import Decoding

    if top_p is None:
        for flag, value in (("--temperature", temperature), ("--seed", seed)):
            if value is not None:
                raise UserError(f"{flag} {value}: applies to --top-p sampling only; add --top-p P or drop it")
    if length_penalty is not None and beam <= 1:
        raise UserError(f"--length-penalty {length_penalty}: applies to beam search only; add --beam K")
    d = Decoding(
        max_len=max_len,
        min_len=min_len,
        beam=beam,
        top_p=top_p,
        temperature=1.0 if temperature is None else temperature,
        seed=0 if seed is None else seed,
        length_penalty=1.0 if length_penalty is None else length_penalty,
    )
    if max_len < 2:
        raise UserError(f"--max-len {max_len}: give at least 2 (the start and end tokens count)")
    d.check(max_len)  # all but --max-len against the model's context length: that is checked once it loads
    return d


def register(app: typer.Typer) -> None:
    @app.command("caption")
    def caption_cmd(
        run: str = typer.Argument(..., help="CoCa run dir or open_clip export dir (xm-coca-tiny, …)."),
        images: list[str] = typer.Argument(None, help="Image files: prints IMAGE<TAB>caption per image."),
        data: str = typer.Option(None, "--data", help="Manifest (JSONL/CSV/folder/shards) to caption."),
        out: Path = typer.Option(None, "--out", help="With --data: the .jsonl manifest to write."),
        beam: int = typer.Option(1, "--beam", help="Beam search with K beams (1: greedy)."),
        top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling with this probability mass."),
        max_len: int = typer.Option(30, "--max-len", help="Longest caption, in tokens (start/end included)."),
        min_len: int = typer.Option(5, "--min-len", help="The end token is barred below this many tokens."),
        temperature: float = typer.Option(None, "--temperature", help="Softmax temperature (--top-p; 1)."),
        seed: int = typer.Option(None, "--seed", help="Sampling seed (--top-p; default 0)."),
        length_penalty: float = typer.Option(
            None, "--length-penalty", help="Beam score = log-prob / length**P (--beam; default 1)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON array of {image, caption}."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images decoded together."),
        chunk_size: int = typer.Option(256, "--chunk-size", help="With --data: images per saved chunk."),
        restart: bool = typer.Option(
            False, "--restart", help="With --data: discard finished chunks of an earlier, different run."
        ),
        image_key: str = typer.Option(None, "--image-key"),
        caption_key: str = typer.Option(None, "--caption-key"),
        label_key: str = typer.Option(None, "--label-key"),
        device: str = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default: cuda if any)."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Caption images with a CoCa run: IMAGE files to stdout, or a whole manifest into a new manifest
        (--data M --out F.jsonl; resumable: a rerun skips finished chunks)."""
        images = list(images or [])
        d = _decoding(max_len, min_len, beam, top_p, temperature, seed, length_penalty)
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be at least 1")
        if chunk_size < 1:
            raise UserError(f"--chunk-size {chunk_size}: must be at least 1")
        if out is not None and data is None:
            raise UserError("--out: needs --data MANIFEST (the images to caption)")
        if data is not None:
            if images:
                raise UserError(f"{images[0]}: give IMAGE files or --data MANIFEST, not both")
            if out is None:
                raise UserError("--data: needs --out F.jsonl (the manifest of captions to write)")
            if json_out:
                raise UserError("--json: prints captions of IMAGE files; with --data they go to --out")
            from xmodal.caption.manifest import check_out
            from xmodal.data.records import source_kind

            source_kind(data)  # a missing/unknown --data fails before the (slow) model load
            check_out(out, data)
        else:
            if not images:
                raise UserError("xmodal caption RUN: give IMAGE files, or --data MANIFEST --out F.jsonl")
            for flag, on in (("--chunk-size", chunk_size != 256), ("--restart", restart)):
                if on:
                    raise UserError(f"{flag}: applies to --data MANIFEST only")
            from xmodal.caption.images import read_image_files

            decoded = read_image_files(images)  # a bad file fails before the (slow) model load

        def encoder():
            from xmodal.models.captioner import check_coca
            from xmodal.models.encoder import load_encoder

            enc = load_encoder(run, device=device)
            check_coca(enc.model, run)
            d.check(int(enc.model.text.context_length))
            return enc

        if data is not None:
            from xmodal.caption.manifest import caption_manifest

            caption_manifest(
                encoder,  # loaded once the inputs and any earlier chunks are checked
                data,
                out,
                d,
                batch_size=batch_size,
                chunk_size=chunk_size,
                progress=progress,
                restart=restart,
                image_key=image_key,
                caption_key=caption_key,
                label_key=label_key,
            )
            return
        from xmodal.caption.images import caption_uint8, to_uint8

        enc = encoder()
        caps = caption_uint8(enc, to_uint8(decoded, images, enc.image_size), d, batch_size)
        if json_out:
            items = [{"image": p, "caption": c} for p, c in zip(images, caps, strict=True)]
            print(json.dumps(items, ensure_ascii=False, indent=2))
        else:
            for p, c in zip(images, caps, strict=True):
                print(f"{p}\t{c}")
