"""`xmodal index build|add|delete|optimize|bank|info` and `xmodal search`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from xmodal.errors import UserError

index_app = typer.Typer(help="Build and maintain search indexes (FAISS + metadata).", no_args_is_help=True)


def _ids(value: str) -> list[str]:
    ids = [x.strip() for x in value.split(",") if x.strip()]
    if not ids:
        raise UserError("--ids: give one or more comma-separated item ids")
    return ids


@index_app.command("build")
def build_cmd(
    model: str = typer.Argument(..., help="Run dir, open_clip export dir, or model config name/JSON."),
    data: str = typer.Option(..., "--data", help="Manifest (JSONL/CSV), image folder or .tar shards."),
    out: Path = typer.Option(..., "--out", help="Index directory to write (replaced atomically)."),
    kind: str = typer.Option("flat", "--kind", help="flat | hnsw | ivfpq | binary | a FAISS factory string."),
    pretrained: str = typer.Option(None, "--pretrained", help="Local weights for a config-name MODEL."),
    bits: int = typer.Option(256, "--bits", help="Code length for --kind binary (multiple of 8)."),
    binary_method: str = typer.Option("itq", "--binary-method", help="itq | lsh (for --kind binary)."),
    rerank: int = typer.Option(
        None,
        "--rerank",
        help="Re-rank this many ANN candidates by float vectors (0: off; default: grows with N for the "
        "compressed kinds, 0 for flat and hnsw).",
    ),
    binary_index: str = typer.Option(
        None,
        "--binary-index",
        help="binary / learned-binary codes: flat Hamming scan | hnsw | ivf (default: flat up to 2M items).",
    ),
    chunk_size: int = typer.Option(4096, "--chunk-size", help="Items per saved embedding chunk."),
    caption_gallery: bool = typer.Option(
        False, "--caption-gallery", help="Also embed captions (image→text)."
    ),
    captions: str = typer.Option(
        "keep",
        "--captions",
        help="keep: the collection's captions | generate: items without one get a caption from the model "
        "(a CoCa run), stored in meta.parquet (caption_generated) and the caption gallery.",
    ),
    caption_max_len: int = typer.Option(
        30, "--caption-max-len", help="With --captions generate: longest caption in tokens (start/end incl.)."
    ),
    caption_beam: int = typer.Option(
        1, "--caption-beam", help="With --captions generate: beams (1: greedy decoding)."
    ),
    nprobe: int = typer.Option(
        None, "--nprobe", help="IVF lists probed per query (default: max(8, nlist/4))."
    ),
    nlist: int = typer.Option(None, "--nlist", help="IVF lists (default: √N, clamped)."),
    ef_search: int = typer.Option(
        None, "--ef-search", help="HNSW efSearch (default: 128 up to 100k items, then 128·√(N/100k))."
    ),
    hnsw_m: int = typer.Option(32, "--hnsw-m", help="HNSW neighbours per node."),
    thumb_size: int = typer.Option(128, "--thumb-size", help="Stored thumbnail size in px (0: none)."),
    image_key: str = typer.Option(None, "--image-key"),
    caption_key: str = typer.Option(None, "--caption-key"),
    label_key: str = typer.Option(None, "--label-key"),
    device: str = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)."),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep OUT.work/ chunks after success."),
    work_dir: Path = typer.Option(
        None,
        "--work-dir",
        help="Folder of the embedding chunks (default OUT.work/; shared by all torchrun nodes).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Embed a collection and write an index directory (resumable: a rerun reuses finished chunks). Under
    torchrun each rank embeds a share of the chunks and rank 0 writes the index."""
    from xmodal.data.records import source_kind
    from xmodal.index import captions as gen_captions
    from xmodal.index import scaleout
    from xmodal.index.build import _check_kind, build_index
    from xmodal.models import load_encoder

    _check_kind(kind, bits, binary_method, rerank, binary_index)
    decoding = None
    if gen_captions.check_mode(captions) == "generate":
        decoding = gen_captions.make_decoding(caption_max_len, caption_beam)
    source_kind(data)  # fail on a missing/unknown --data before the (slow) model load
    enc = load_encoder(model, pretrained, scaleout.rank_device(device))  # torchrun: cuda:LOCAL_RANK
    build_index(
        enc,
        data,
        out,
        kind=kind,
        model_source=model,
        pretrained=pretrained,
        bits=bits,
        binary_method=binary_method,
        rerank=rerank,
        binary_index=binary_index,
        chunk_size=chunk_size,
        caption_gallery=caption_gallery,
        thumb_size=thumb_size,
        hnsw_m=hnsw_m,
        ef_search=ef_search,
        nlist=nlist,
        nprobe=nprobe,
        progress=progress,
        work_dir=work_dir,
        keep_work=keep_work,
        image_key=image_key,
        caption_key=caption_key,
        label_key=label_key,
        captions=captions,
        decoding=decoding,
    )


@index_app.command("add")
def add_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    data: str = typer.Option(..., "--data", help="Manifest with the items to add."),
    chunk_size: int = typer.Option(4096, "--chunk-size"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Embed more items with the index's model and append them (generating captions for those without
    one when the index was built with --captions generate)."""
    from xmodal.index.build import add_to_index

    add_to_index(index, data, chunk_size=chunk_size, progress=progress)


@index_app.command("delete")
def delete_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    ids: str = typer.Option(..., "--ids", help="Comma-separated item ids."),
) -> None:
    """Remove items by id."""
    from xmodal.index.build import delete_from_index

    delete_from_index(index, _ids(ids))


@index_app.command("optimize")
def optimize_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    force: bool = typer.Option(
        False, "--force", help="Retrain even when the ANN was trained on the current item count."
    ),
) -> None:
    """Retrain the ANN's fitted parts (IVF centroids, PQ codebooks, ITQ rotation / LSH mean) and its
    size-dependent settings on the current items, e.g. after `index add` grew the collection; ids, metadata
    and vectors stay. flat, hnsw and learned-binary have nothing to retrain (a one-line note)."""
    from xmodal.index.mutation import optimize_index

    optimize_index(index, force=force)


@index_app.command("bank")
def bank_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    texts: str = typer.Option(None, "--texts", help="Text file, one sample query per line (text bank)."),
    data: str = typer.Option(None, "--data", help="Manifest: its images → image bank, captions → text bank."),
    beta: float = typer.Option(20.0, "--beta", help="Inverted-softmax temperature β for the banks."),
    invgc: str = typer.Option(None, "--invgc", help="none | invgc | localadj: adjust gallery vectors."),
    r_q: float = typer.Option(0.1, "--invgc-rq", help="InvGC rate for the query (text) bank."),
    r_g: float = typer.Option(0.1, "--invgc-rg", help="InvGC rate for the gallery (image) bank."),
    pool_rate: float = typer.Option(0.01, "--invgc-pool", help="LocalAdj: fraction of bank neighbours used."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Store query/gallery banks for hubness correction (QB-Norm, DBNorm) and optionally InvGC."""
    from xmodal.index.build import add_bank, read_text_lines

    add_bank(
        index,
        texts=read_text_lines(texts) if texts else None,
        data=data,
        beta=beta,
        invgc=invgc,
        r_q=r_q,
        r_g=r_g,
        pool_rate=pool_rate,
        progress=progress,
    )


@index_app.command("upgrade")
def upgrade_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    model: str = typer.Option(
        ..., "--model", help="The new model: an xmodal run, open_clip export or config."
    ),
    pretrained: str = typer.Option(
        None, "--pretrained", help="Weights file for a --model given as a config."
    ),
    projection: Path = typer.Option(
        None, "--projection", help="A map from the new model's space to the index's (xmodal compat fit)."
    ),
) -> None:
    """Answer the new model's queries from the gallery as it is (a compatible model, e.g. trained with
    clip+bct, or through --projection); nothing is re-embedded. Only index.json changes (atomically);
    `index rollback` undoes it, `index backfill` re-embeds the gallery and then drops the layer."""
    from xmodal.index.upgrade import upgrade_index

    upgrade_index(index, model, pretrained=pretrained, projection=projection)


@index_app.command("rollback")
def rollback_cmd(index: Path = typer.Argument(..., help="Index directory.")) -> None:
    """Undo the last `index upgrade` (and a backfill still in progress): the folder is restored byte for
    byte when nothing else changed since."""
    from xmodal.index.upgrade import rollback_index

    rollback_index(index)


@index_app.command("backfill")
def backfill_cmd(
    index: Path = typer.Argument(..., help="Index directory (upgraded with `index upgrade`)."),
    chunk_size: int = typer.Option(4096, "--chunk-size", help="Items per crash-safe chunk."),
    max_chunks: int = typer.Option(
        None, "--max-chunks", help="Stop after computing this many chunks (run again to go on)."
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per model call."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Re-embed the gallery with the upgrade's new model chunk by chunk (a killed run keeps every finished
    chunk); searches meanwhile merge re-embedded and old items. When all chunks are done the index becomes
    a plain index of the new model."""
    from xmodal.index.upgrade import backfill_index

    backfill_index(
        index, chunk_size=chunk_size, max_chunks=max_chunks, batch_size=batch_size, progress=progress
    )


@index_app.command("info")
def info_cmd(index: Path = typer.Argument(..., help="Index directory.")) -> None:
    """Print index.json (an upgrade's stored previous index.json is shortened), and a backfill's progress."""
    from xmodal.index.persist import open_index

    idx = open_index(index)
    info = dict(idx.info)
    if isinstance(info.get("upgrade"), dict):
        info["upgrade"] = {**info["upgrade"], "previous_index_json": "… (kept for `xmodal index rollback`)"}
    if (view := idx.backfill_view()) is not None:
        info["backfill"] = {**info["backfill"], "re_embedded": view.count}
    print(json.dumps(info, indent=2, ensure_ascii=False))


def search_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    query: str = typer.Argument(None, help="Text query (text → image)."),
    image: Path = typer.Option(
        None, "--image", help="Image query (image → image, or → text with --captions)."
    ),
    k: int = typer.Option(10, "--k", "-k", help="Number of results."),
    norm: str = typer.Option(
        "none", "--norm", help="none | qbnorm | qbnorm-dynamic | dbnorm | dbnorm-dynamic."
    ),
    captions: bool = typer.Option(False, "--captions", help="With --image: search the caption gallery."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    model: str = typer.Option(None, "--model", help="Override the model recorded in the index."),
    pretrained: str = typer.Option(None, "--pretrained"),
    rerank: int = typer.Option(
        0,
        "--rerank",
        help="Re-score the top N candidates with the model's ITM (fusion) head and order them by it; "
        "text → images and --image --captions (0: off). Not `index build --rerank` (float vectors).",
    ),
) -> None:
    """Search an index by text or by image."""
    from xmodal.index.persist import open_index
    from xmodal.index.search import IMAGE_TO_IMAGE_RERANK

    if (query is None) == (image is None):
        raise UserError("give either a text QUERY or --image PATH")
    if k < 1 or k > 10000:
        raise UserError(f"--k {k}: must be between 1 and 10000")
    if rerank < 0 or rerank > 10000:
        raise UserError(f"--rerank {rerank}: must be between 0 (off) and 10000")
    if rerank and image is not None and not captions:
        raise UserError(IMAGE_TO_IMAGE_RERANK)
    idx = open_index(index)
    if model:
        from xmodal.models import load_encoder

        idx.encoder = load_encoder(model, pretrained)
    if query is not None:
        if captions:
            raise UserError("--captions searches captions by an image: use it with --image")
        if not query.strip():
            raise UserError("empty query")
        hits = idx.search_text(query, k=k, norm=norm, rerank=rerank)
    else:
        from xmodal.data import load_image
        from xmodal.data.records import DataStats

        stats = DataStats()
        img = load_image(str(image), stats)
        if img is None:
            raise UserError(f"--image {image}: cannot read the image ({stats.summary() or 'unreadable'})")
        hits = (
            idx.search_captions(img, k=k, rerank=rerank)
            if captions
            else idx.search_image(img, k=k, norm=norm)
        )
    if as_json:
        print(json.dumps(hits, ensure_ascii=False, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    title = f"{len(hits)} result(s)" + (f" · {norm}" if norm and norm != "none" and not captions else "")
    if rerank:
        title += f" · re-ranked by ITM (top {rerank}; itm = match log-odds, score = retrieval score)"
    table = Table(title=title)
    cols = ("#", "itm", "score", "was", "id", "caption") if rerank else ("#", "score", "id", "caption")
    for col in cols:
        table.add_column(col, justify="left" if col in ("id", "caption") else "right")
    for h in hits:
        row = [str(h["rank"]), f"{h['score']:.4f}", str(h["id"]), str(h.get("caption") or "")]
        if rerank:
            itm = "—" if h.get("itm") is None else f"{h['itm']:.4f}"
            row[1:2] = [itm, f"{h['score']:.4f}", str(h.get("retrieval_rank", ""))]
        table.add_row(*row)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.command("search")(search_cmd)
