"""`xmodal eval MODEL --data MANIFEST …`: evaluate a model, print a table, write JSON / HTML report."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import typer

from xmodal.errors import UserError


def parse_number(text: str, flag: str) -> float:
    """'4/255' or '0.0157' → float (pixel-unit flags are easier to read as fractions)."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as e:
        raise UserError(f"{flag} {text}: not a number (use e.g. 4/255 or 0.0157)") from e


def results_table(results: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"xmodal eval — {results.get('meta', {}).get('model', '')}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    from xmodal.eval.report import _fmt, _table

    for task, res in results.items():
        if task == "meta":
            continue
        first = True
        for k, v in _table(res):
            if k.startswith("settings.") or k.endswith(".kind") or k in ("ties", "positives"):
                continue
            table.add_row(task if first else "", k, _fmt(v))
            first = False
    meta = results.get("meta", {})
    table.caption = f"{meta.get('n_images')} images, {meta.get('n_texts')} texts, {meta.get('seconds')} s"
    return table


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        data: Annotated[Path, typer.Option("--data", help="manifest (JSONL/CSV/…) of the evaluation set")],
        model: Annotated[
            str | None,
            typer.Argument(
                help="xmodal run dir, exported open_clip dir, or open_clip config name/JSON "
                "(with --task compat: the new model, or give --new)"
            ),
        ] = None,
        task: Annotated[
            str,
            typer.Option(
                "--task",
                help="comma list of retrieval,zeroshot,probe,hubness,gap,robustness,captioning,hashing,"
                "compat or all (captioning: CoCa models only; compat: needs --old)",
            ),
        ] = "retrieval,zeroshot",
        json_out: Annotated[Path | None, typer.Option("--json", help="write results JSON here")] = None,
        report: Annotated[
            Path | None, typer.Option("--report", help="write results.json + self-contained index.html here")
        ] = None,
        positives: Annotated[
            str | None,
            typer.Option(
                "--positives",
                help="also count items with identical caption text (caption) or the same label (label)",
            ),
        ] = None,
        templates: Annotated[
            Path | None, typer.Option("--templates", help="zero-shot prompt templates, one per line with {}")
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
        device: Annotated[
            str | None, typer.Option("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
        ] = None,
        pretrained: Annotated[
            str | None, typer.Option("--pretrained", help="local weights for a config-name MODEL")
        ] = None,
        checkpoint: Annotated[
            str | None, typer.Option("--checkpoint", help="checkpoint of a run dir (default latest.pt)")
        ] = None,
        ties: Annotated[
            str, typer.Option("--ties", help="topk (as CLIP_benchmark), index, pessimistic, optimistic")
        ] = "topk",
        map_k: Annotated[int, typer.Option("--map-k")] = 10,
        hubness_k: Annotated[int, typer.Option("--hubness-k")] = 10,
        hash_k: Annotated[int, typer.Option("--hash-k", help="hashing: mAP@K")] = 100,
        hash_bits: Annotated[
            str, typer.Option("--hash-bits", help="hashing: ITQ/LSH baselines' code lengths, e.g. 32,64,128")
        ] = "32,64,128",
        seed: Annotated[int, typer.Option("--seed")] = 0,
        hubness_norm: Annotated[
            str | None,
            typer.Option(
                "--hubness-norm",
                help="also report retrieval corrected by qbnorm, qbnorm-dynamic, "
                "dbnorm, dbnorm-dynamic, invgc or localadj",
            ),
        ] = None,
        hubness_bank: Annotated[
            str | None,
            typer.Option("--hubness-bank", help="manifest for the correction's banks (e.g. train)"),
        ] = None,
        hubness_beta: Annotated[float, typer.Option("--hubness-beta", help="inverse temperature")] = 20.0,
        rerank: Annotated[
            str | None,
            typer.Option(
                "--rerank",
                help="also report retrieval re-ranked by the ITM head (itm) within the ITC top --rerank-k; "
                "needs a fusion head (--objective clip+itm)",
            ),
        ] = None,
        rerank_k: Annotated[
            int, typer.Option("--rerank-k", help="candidates per query re-scored by --rerank")
        ] = 16,
        score: Annotated[
            str,
            typer.Option("--score", help="probe pair score: cosine, or itm (the fusion encoder's ITM head)"),
        ] = "cosine",
        pgd_eps: Annotated[str, typer.Option("--pgd-eps", help="L∞ radius in [0,1] pixel units")] = "4/255",
        pgd_steps: Annotated[int, typer.Option("--pgd-steps")] = 10,
        pgd_step_size: Annotated[str, typer.Option("--pgd-step-size")] = "1/255",
        pgd_images: Annotated[
            int, typer.Option("--pgd-images", help="images attacked (seeded subset; 0 = no PGD)")
        ] = 100,
        noise_std: Annotated[float, typer.Option("--noise-std")] = 0.08,
        blur_sigma: Annotated[float, typer.Option("--blur-sigma")] = 1.0,
        jpeg_quality: Annotated[int, typer.Option("--jpeg-quality")] = 20,
        typo_rate: Annotated[float, typer.Option("--typo-rate")] = 0.3,
        beam: Annotated[
            int | None, typer.Option("--beam", help="captioning: beams (default 1 = greedy decoding)")
        ] = None,
        max_len: Annotated[
            int | None,
            typer.Option("--max-len", help="captioning: longest caption in tokens, start/end included (30)"),
        ] = None,
        caption_baseline: Annotated[
            Path | None,
            typer.Option(
                "--caption-baseline",
                help="captioning: also score each image's nearest caption (ITC) from this training manifest",
            ),
        ] = None,
        image_key: Annotated[str | None, typer.Option("--image-key")] = None,
        caption_key: Annotated[str | None, typer.Option("--caption-key")] = None,
        label_key: Annotated[str | None, typer.Option("--label-key")] = None,
        workers: Annotated[int, typer.Option("--workers")] = 0,
        old: Annotated[
            str | None,
            typer.Option("--old", help="compat: the old model, whose embeddings the gallery holds"),
        ] = None,
        new: Annotated[
            str | None, typer.Option("--new", help="compat: the new model (the same as giving MODEL)")
        ] = None,
        projection: Annotated[
            Path | None,
            typer.Option("--projection", help="compat: also score projected new queries (xmodal compat fit)"),
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    ) -> None:
        """Evaluate MODEL on --data: retrieval, zero-shot, probe, hubness, modality gap, robustness,
        captioning."""
        from rich.console import Console

        from xmodal.eval import evaluate, parse_tasks, read_templates, write_json

        names, is_all = parse_tasks(task)  # fail fast on a bad --task, before loading anything
        model = _compat_models(model, old, new, projection, names if not is_all or old else [])
        if not data.exists():
            raise UserError(f"--data {data}: file not found")
        tmpl = read_templates(templates) if templates is not None else None
        opts = dict(
            ties=ties,
            map_k=map_k,
            hubness_k=hubness_k,
            hash_k=hash_k,
            hash_bits=_bits_list(hash_bits),
            seed=seed,
            hubness_norm=hubness_norm,
            hubness_bank=hubness_bank,
            hubness_beta=hubness_beta,
            rerank=rerank,
            rerank_k=rerank_k,
            score=score,
            pgd_eps=parse_number(pgd_eps, "--pgd-eps"),
            pgd_steps=pgd_steps,
            pgd_step_size=parse_number(pgd_step_size, "--pgd-step-size"),
            pgd_images=pgd_images,
            noise_std=noise_std,
            blur_sigma=blur_sigma,
            jpeg_quality=jpeg_quality,
            typo_rate=typo_rate,
            caption_beam=beam,
            caption_max_len=max_len,
            caption_baseline=str(caption_baseline) if caption_baseline is not None else None,
        )
        from xmodal.eval.core import EvalOptions

        EvalOptions.from_kwargs(
            positives=positives, templates=tmpl, **opts
        )  # flag errors before the model loads
        from xmodal.eval.rerank import check_requests, require_fusion

        check_requests(names, rerank, score)
        from xmodal.eval import captioning

        captioning.check_requests(names, opts["caption_baseline"])

        from xmodal.data import load_dataset
        from xmodal.models import load_encoder

        encoder = load_encoder(model, pretrained=pretrained, device=device, checkpoint=checkpoint)
        if rerank is not None:
            require_fusion(encoder, f"--rerank {rerank}")  # before the data loads
        if score == "itm":
            require_fusion(encoder, "--score itm")
        if "captioning" in names and not (is_all and caption_baseline is None):
            captioning.require_decoder(encoder)  # before the data loads
        if old is not None:  # compat: both models and the projection load before the data
            from xmodal.eval.compat import resolve_old, resolve_projection

            opts["compat_old"] = resolve_old(old, device=device)
            opts["compat_projection"] = resolve_projection(projection, encoder.dim, opts["compat_old"].dim)
        ds = load_dataset(
            str(data),
            encoder.image_size,
            image_key=image_key,
            caption_key=caption_key,
            label_key=label_key,
            workers=workers,
            progress=not quiet,
        )
        results = evaluate(
            encoder,
            ds,
            task,
            positives=positives,
            templates=tmpl,
            batch_size=batch_size,
            report_dir=report,
            skip_unavailable=True if task.strip() in ("retrieval,zeroshot", "all") else None,
            progress=not quiet,
            **opts,
        )
        if json_out is not None:
            write_json(json_out, results)
        Console().print(results_table(results))
        if report is not None:
            Console(stderr=True).print(f"report: {report / 'index.html'}")


def _compat_models(
    model: str | None, old: str | None, new: str | None, projection: Path | None, names: list[str]
) -> str:
    """The model to evaluate (MODEL, or --new for compat), after checking the compat flags go together."""
    if model is not None and new is not None and model != new:
        raise UserError(f"MODEL {model} and --new {new}: give the new model once (MODEL or --new)")
    model = model if model is not None else new
    if "compat" in names:
        if old is None:
            raise UserError("--task compat needs --old OLD_RUN (the model that embedded the gallery)")
        if model is None:
            raise UserError("--task compat needs the new model: --new NEW_RUN (or MODEL)")
    elif old is not None or new is not None or projection is not None:
        flag = "--old" if old is not None else "--new" if new is not None else "--projection"
        raise UserError(f"{flag} is for --task compat; add compat to --task")
    if model is None:
        raise UserError("give the MODEL to evaluate (a run dir, an open_clip export or a config name)")
    if projection is not None and not projection.exists():
        raise UserError(f"--projection {projection}: no such folder; fit one with `xmodal compat fit`")
    return model


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(
            f"--hash-bits {text}: give code lengths separated by commas, e.g. 32,64,128"
        ) from None
    if not bits or any(b <= 0 or b % 8 for b in bits):
        raise UserError(f"--hash-bits {text}: each code length must be a positive multiple of 8")
    return bits
