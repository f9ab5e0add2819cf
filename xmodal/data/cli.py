"""`xmodal data …`: make the built-in datasets, check a dataset, build its preprocessed cache."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from xmodal.errors import UserError

_console = Console()

ImageKey = typer.Option(None, "--image-key", help="Manifest field/column holding the image path.")
CaptionKey = typer.Option(None, "--caption-key", help="Manifest field/column holding the caption(s).")
LabelKey = typer.Option(None, "--label-key", help="Manifest field/column holding the class label.")
Workers = typer.Option(0, "--workers", min=0, help="Decode with this many processes (0 = in-process).")


def _say(text: str, style: str | None = None) -> None:
    """One unwrapped line: paths stay copyable, and "[" in a path is never read as markup."""
    _console.print(text, style=style, soft_wrap=True, markup=False, highlight=False)


def _wrote(paths: dict[str, Path]) -> None:
    for split, path in paths.items():
        n = sum(1 for line in path.open(encoding="utf-8") if line.strip())
        _say(f"wrote {path} ({n} {split} lines)")


def shapes(
    out: Path = typer.Argument(..., help="Folder to write images/ and the .jsonl manifests into."),
    n_train: int = typer.Option(5000, "--n-train", min=0),
    n_val: int = typer.Option(500, "--n-val", min=0),
    n_test: int = typer.Option(1000, "--n-test", min=0),
    image_size: int = typer.Option(64, "--image-size", min=16),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Procedural coloured shapes with relation captions, plus probe.jsonl (hard negatives)."""
    from xmodal.data.shapes import make_shapes

    _wrote(make_shapes(out, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed))


def emoji(
    out: Path = typer.Argument(..., help="Folder to write images/ and the .jsonl manifests into."),
    langs: str = typer.Option("", "--langs", help="Extra caption languages from CLDR, e.g. de,fr."),
    image_size: int = typer.Option(64, "--image-size", min=8),
    seed: int = typer.Option(0, "--seed"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Render only this many (spread) emoji."),
    font: Path | None = typer.Option(None, "--font", help="Emoji font (default: Noto Color Emoji)."),
) -> None:
    """Every emoji rendered with Noto Color Emoji; captions = CLDR names and keywords; label = group."""
    from xmodal.data.emoji import make_emoji
    from xmodal.data.records import DataStats

    stats = DataStats()
    lang_list = [x.strip() for x in langs.split(",") if x.strip()]
    paths = make_emoji(out, image_size=image_size, langs=lang_list, seed=seed, limit=limit, font=font,
                       stats=stats)
    _wrote(paths)
    if stats.total():
        _say(stats.summary(), "yellow")


def digits(
    out: Path = typer.Argument(..., help="Folder to write images/ and the .jsonl manifests into."),
    image_size: int = typer.Option(64, "--image-size", min=8),
    seed: int = typer.Option(0, "--seed"),
    val_frac: float = typer.Option(0.1, "--val-frac"),
    test_frac: float = typer.Option(0.2, "--test-frac"),
) -> None:
    """scikit-learn's 1,797 8x8 handwritten digits (bundled, no download), upsampled; label = digit."""
    from xmodal.data.digits import make_digits

    _wrote(make_digits(out, image_size=image_size, seed=seed, val_frac=val_frac, test_frac=test_frac))


def noisy(
    manifest: str = typer.Argument(..., help="The manifest to corrupt (usually a training split)."),
    out: Path = typer.Option(..., "--out", help="The noisy manifest to write (.jsonl)."),
    fraction: float = typer.Option(0.3, "--fraction", help="Share of the items whose captions are shuffled."),
    seed: int = typer.Option(0, "--seed"),
    image_key: str | None = ImageKey,
    caption_key: str | None = CaptionKey,
    label_key: str | None = LabelKey,
) -> None:
    """Shuffle the captions of a fraction of the items among them (noisy pairs, keys recorded)."""
    from xmodal.data.noisy import make_noisy

    res = make_noisy(manifest, out, fraction, seed, image_key=image_key, caption_key=caption_key,
                     label_key=label_key)
    _say(f"wrote {res['manifest']} ({res['n_items']} lines, {res['n_shuffled']} with shuffled captions, "
         f"{res['n_changed']} of them now wrong)")
    _say(f"wrote {res['side_file']} (the shuffled keys)")
    if res["skipped"]:
        _say("skipped: " + ", ".join(f"{n} {k}" for k, n in res["skipped"].items()), "yellow")


def check(
    source: str = typer.Argument(..., help="A .jsonl/.csv/.tsv manifest, an image folder, or .tar shards."),
    image_key: str | None = ImageKey,
    caption_key: str | None = CaptionKey,
    label_key: str | None = LabelKey,
    workers: int = Workers,
) -> None:
    """Read a dataset and decode every image; print what is usable and what is skipped, and why."""
    from xmodal.data.dataset import check_images
    from xmodal.data.records import DataStats, read_records, source_kind

    kind = source_kind(source)
    stats = DataStats()
    records = read_records(source, image_key=image_key, caption_key=caption_key, label_key=label_key,
                           stats=stats)
    ok = check_images(records, stats, workers=workers, label=source)
    labels = {r.label for r in records if r.label is not None}
    table = Table(title=escape(f"{source} ({kind})"), show_header=True)
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("records read", str(len(records)))
    table.add_row("usable samples", f"[green]{ok}[/]")
    table.add_row("captions", str(sum(len(r.captions) for r in records)))
    table.add_row("distinct labels", str(len(labels)))
    for reason, n in stats.as_dict().items():
        table.add_row(f"skipped: {escape(reason)}", f"[yellow]{n}[/]")
    _console.print(table)
    _say(stats.summary() or "nothing skipped")
    if not ok:
        raise UserError(f"{source}: no usable samples; check the image paths and captions")


def cache(
    source: str = typer.Argument(..., help="A .jsonl/.csv/.tsv manifest, an image folder, or .tar shards."),
    image_size: int = typer.Option(..., "--image-size", min=1, help="The model's input size, e.g. 224."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir",
                                          help="Default: $XMODAL_CACHE or ~/.cache/xmodal."),
    image_key: str | None = ImageKey,
    caption_key: str | None = CaptionKey,
    label_key: str | None = LabelKey,
    workers: int = Workers,
) -> None:
    """Build (or confirm) the preprocessed tensor cache of a dataset and print where it is."""
    from xmodal.data.dataset import load_dataset

    data = load_dataset(source, image_size, cache_dir=cache_dir, image_key=image_key, caption_key=caption_key,
                        label_key=label_key, workers=workers)
    state = "up to date" if data.from_cache else "built"
    _say(f"cache {state}: {data.cache_path} ({len(data)} images, {image_size}px)")
    if data.stats.total():
        _say(data.stats.summary(), "yellow")


def reduce_cmd(
    manifest: Path = typer.Argument(..., help="The .jsonl manifest to reduce."),
    model: str = typer.Option(
        ..., "--model", help="Trained xmodal run (or exported open_clip folder) that embeds the images."
    ),
    out: Path = typer.Option(..., "--out", help="The reduced manifest to write (.jsonl)."),
    keep: str = typer.Option(
        ..., "--keep", help="Fraction to keep, in (0, 1] (0.5 or 50%), or an integer count (2500)."
    ),
    clusters: int | None = typer.Option(None, "--clusters", help="k-means clusters K (default: round(√N))."),
    pick: str = typer.Option(
        "nearest",
        "--pick",
        help="Inside a cluster: nearest (closest to the centroid first) or uniform (evenly spaced from "
        "core to edge, as the paper samples).",
    ),
    drop_misaligned: float = typer.Option(
        0.0,
        "--drop-misaligned",
        help="First drop this fraction of pairs with the lowest image-text cosine (0 = off; the paper "
        "keeps the better-matching half: 0.5).",
    ),
    seed: int = typer.Option(0, "--seed", help="k-means seed."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per embedding batch."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Default: $XMODAL_CACHE or ~/.cache/xmodal."
    ),
    image_key: str | None = ImageKey,
    caption_key: str | None = CaptionKey,
    label_key: str | None = LabelKey,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress on stderr."),
) -> None:
    """Keep a representative part of a dataset (TL;DR data reduction, Wang et al.
    ICCV 2023), as a new manifest that xmodal train --data reads.

    Selection rule:

    1. With --drop-misaligned Q: drop the fraction Q of pairs whose image-text
    cosine (mean over the image's captions) is lowest.

    2. Cluster the image embeddings from --model with seeded FAISS spherical
    k-means into K clusters (--clusters, default round(sqrt(N))).

    3. Each cluster keeps its share of the kept items, n_keep x size / N,
    rounded by largest remainder so that the shares sum to n_keep.

    4. Inside a cluster keep the members closest to the centroid (--pick
    nearest), or evenly spaced ones from core to edge (--pick uniform, the
    paper's uniform per-cluster sample).

    Every field of the kept rows is kept; relative image paths are re-based to
    the folder of --out.
    """
    from xmodal.data.reduce import parse_keep, reduce_manifest

    res = reduce_manifest(
        manifest,
        model,
        out,
        parse_keep(keep),
        clusters=clusters,
        seed=seed,
        device=device,
        batch_size=batch_size,
        pick=pick,
        drop_misaligned=drop_misaligned,
        image_key=image_key,
        caption_key=caption_key,
        label_key=label_key,
        cache_dir=cache_dir,
        progress=progress,
    )
    if res.skipped:
        Console(stderr=True).print(res.skipped, style="yellow", soft_wrap=True, markup=False, highlight=False)
    _say(res.summary())


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(no_args_is_help=True,
                           help="Datasets: built-in sets, checks, the preprocessed cache.")
    data_app.command("shapes")(shapes)
    data_app.command("emoji")(emoji)
    data_app.command("digits")(digits)
    data_app.command("noisy")(noisy)
    data_app.command("check")(check)
    data_app.command("cache")(cache)
    data_app.command("reduce")(reduce_cmd)
    app.add_typer(data_app, name="data")
