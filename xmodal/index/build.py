"""Building and updating index directories: `build_index`, `add_to_index`, `delete_from_index`, `add_bank`."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xmodal import fsutil
from xmodal.errors import UserError
from xmodal.index import captions as gen_captions
from xmodal.index import scaleout
from xmodal.index.ann import BINARY_STRUCTURES, KINDS
from xmodal.index.binary import METHODS as BINARY_METHODS
from xmodal.index.embed import (
    MAX_PIXELS,
    Embedded,
    StaleWork,
    assemble_chunks,
    embed_chunks,
    embed_collection,
    plan_chunks,
    to_collection,
)
from xmodal.index.folding import DEFAULT_BETA
from xmodal.index.meta import new_info, rows_to_table
from xmodal.index.persist import open_index
from xmodal.index.store import SearchIndex
from xmodal.index.thumbs import Thumbs


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_kind(
    kind: str, bits: int, binary_method: str, rerank: int | None, binary_index: str | None = None
) -> None:
    if not kind or not kind.strip():
        raise UserError("--kind: empty; use flat, hnsw, ivfpq, binary or a FAISS factory string")
    if kind not in KINDS and not any(ch.isupper() for ch in kind):
        raise UserError(
            f"--kind {kind}: use one of {', '.join(KINDS)} or a FAISS factory string such as "
            "'IVF256,PQ32' or 'HNSW32'"
        )
    if kind == "binary":
        if bits <= 0 or bits % 8:
            raise UserError(f"--bits {bits}: must be a positive multiple of 8")
        if binary_method not in BINARY_METHODS:
            raise UserError(f"--binary-method {binary_method}: use one of {', '.join(BINARY_METHODS)}")
    if rerank is not None and rerank < 0:
        raise UserError(f"--rerank {rerank}: must be 0 (off) or more")
    if binary_index is not None and binary_index not in BINARY_STRUCTURES:
        raise UserError(f"--binary-index {binary_index}: use one of {', '.join(BINARY_STRUCTURES)}")


def build_index(
    encoder: Any,
    data: Any,
    out: str | Path,
    kind: str = "flat",
    *,
    model_source: str | None = None,
    pretrained: str | None = None,
    bits: int = 256,
    binary_method: str = "itq",
    rerank: int | None = None,
    binary_index: str | None = None,
    chunk_size: int = 4096,
    caption_gallery: bool = False,
    thumb_size: int = 128,
    hnsw_m: int = 32,
    ef_search: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    progress: bool = True,
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
    max_pixels: int = MAX_PIXELS,
    captions: str = "keep",
    decoding: Any = None,
    embed_missing: bool = True,
    log: Any = _log,
) -> SearchIndex | None:
    """Embed `data` with `encoder` and write the index directory `out` (atomically; a previous index at `out`
    stays usable until the new one replaces it). Returns the opened SearchIndex (encoder attached).

    data: a manifest path (JSONL/CSV/folder/shards), an `ImageTextData`, or a list of `Record`s.
    kind: flat | hnsw | ivfpq | binary | any FAISS factory string (inner-product metric).
    model_source/pretrained: recorded in index.json so `open_index(out).search_text(...)` can reload the
    model later; without them text/image search needs an encoder passed in.
    Embedding runs in chunks saved under `work_dir` (default OUT.work/) so a killed build resumes.
    captions: keep (the collection's captions) | generate (items without one get a caption from the
    model's caption decoder — a CoCa model — with `decoding`, in the same chunks; implies
    caption_gallery; see `xmodal.index.captions`).
    embed_missing=False: only assemble the chunks that `embed_chunk` left in `work_dir` (a Ray/Spark map
    step); a missing one is a UserError naming it. Under torchrun (WORLD_SIZE > 1) every rank embeds its
    share of the chunks and rank 0 alone writes `out`; the other ranks return None (see `_embed_ranks`)."""
    _check_kind(kind, bits, binary_method, rerank, binary_index)
    ranks = scaleout.current()
    say = ranks.tag(log)  # each rank reports its own chunks; everything else only from rank 0
    if not ranks.is_main:
        log = _quiet
    coder = _learned_coder(encoder) if kind == "learned-binary" else None
    generate = gen_captions.check_mode(captions) == "generate"
    if generate:
        gen_captions.check_captioner(encoder)  # before reading anything: one line naming --captions
        decoding = gen_captions.decoding_of(decoding)
        try:
            decoding.check(encoder.model.text.context_length)
        except UserError as e:  # name the index build flags
            msg = str(e).replace("--max-len", "--caption-max-len").replace("--beam", "--caption-beam")
            raise UserError(msg) from None
        if not caption_gallery:
            log("--captions generate: the caption gallery is on (generated captions are searched there)")
        caption_gallery = True
    out = Path(out).absolute()
    coll, read_skips = to_collection(
        data,
        image_key=image_key,
        caption_key=caption_key,
        label_key=label_key,
        max_pixels=max_pixels,
        captions=captions,
    )
    work = Path(work_dir) if work_dir else out.parent / f"{out.name}.work"
    with fsutil.locked(out) if ranks.is_main else contextlib.nullcontext():  # only rank 0 writes `out`
        emb = _embed_ranks(
            encoder,
            coll,
            work,
            ranks,
            embed_missing=embed_missing,
            progress=progress,
            log=log,
            say=say,
            chunk_size=chunk_size,
            caption_gallery=caption_gallery,
            thumb_size=thumb_size,
            captions=captions,
            decoding=decoding,
        )
        if emb is None:  # a torchrun rank other than 0: its chunks are in `work`, rank 0 writes the index
            return None
        skipped = {**read_skips}
        for k, v in emb.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        if not emb.rows:
            why = ", ".join(f"{v} {k}" for k, v in skipped.items()) or "no items"
            raise UserError(f"{coll.source}: no image could be indexed ({why})")
        if skipped:
            log("skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
        from xmodal.index.model import describe_source

        model: dict[str, Any] = {"name": getattr(encoder, "name", None), "source": None, "pretrained": None}
        if model_source:
            model |= describe_source(model_source, pretrained)
        elif getattr(encoder, "random_init", None) is not None:
            model["random_init"] = bool(encoder.random_init)
        info = new_info(
            kind,
            int(encoder.dim),
            {
                "rerank": rerank,
                "bits": bits,
                "binary_method": binary_method,
                "binary_index": binary_index,
                "hnsw_m": hnsw_m,
                "ef_search": ef_search,
                "nlist": nlist,
                "nprobe": nprobe,
                "seed": seed,
            },
            image_size=int(encoder.image_size),
            model=model,
        )
        info.update(
            count=len(emb.rows),
            source=coll.source,
            skipped=skipped,
            caption_gallery=bool(caption_gallery),
            thumb_size=thumb_size,
        )
        if generate:
            info["captions"] = {
                "mode": "generate",
                "generated": emb.generated,
                "decoding": gen_captions.decoding_dict(decoding),
            }
        thumbs = Thumbs()
        thumbs.extend(emb.thumbs)
        cap_v = cap_m = None
        if caption_gallery:
            cap_v = emb.caption_vectors
            cap_m = emb.caption_table()
        idx = SearchIndex(
            info,
            rows_to_table(emb.rows),
            emb.vectors,
            thumbs=thumbs,
            caption_vectors=cap_v,
            caption_meta=cap_m,
            encoder=encoder,
            coder=coder,
        )
        idx.rebuild_ann()
        idx.save(out)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    log(f"index written: {out} ({len(idx)} items, kind {idx.kind})")
    return idx


def _quiet(msg: str) -> None:
    pass


# Rank 0 waits this long for other ranks' chunks to show up: a shared filesystem (NFS) can list another
# node's new files late.
SHARED_FS_WAIT_S = 60.0


def _embed_ranks(
    encoder: Any,
    coll: Any,
    work: Path,
    ranks: scaleout.Ranks,
    *,
    embed_missing: bool,
    progress: bool,
    log: Any,
    say: Any,
    **settings: Any,
) -> Embedded | None:
    """The embedding of `build_index`. One process: embed every chunk (or only assemble them, without
    embed_missing). Under torchrun: rank 0 plans the work folder, a barrier, every rank embeds its share
    (chunk c → rank c % world; finished chunks are skipped), a barrier, and rank 0 alone assembles all
    chunks from the folder, never recomputing another rank's (a missing one is a UserError saying to
    rerun). Other ranks return None. The process group serves only the two barriers."""
    if not ranks.enabled:
        if embed_missing:
            return embed_collection(encoder, coll, work, progress=progress, log=log, **settings)
        plan = plan_chunks(encoder, coll, work, create=False, log=log, **settings)
        log(f"assembling {len(plan)} chunk(s) from {work}")
        return assemble_chunks(plan, embed_missing=False, log=log)
    r, w = ranks.rank, ranks.world
    with ranks.joined():
        if ranks.is_main:
            plan = plan_chunks(encoder, coll, work, replace_stale=True, log=say, **settings)
        planned = ranks.barrier()
        if not ranks.is_main:
            if not planned:
                raise UserError(f"rank {r}: lost contact with rank 0; rerun the same command")
            try:
                plan = plan_chunks(encoder, coll, work, create=False, log=say, **settings)
            except StaleWork as e:
                why = (
                    "not found: all nodes must see the same --out/--work-dir folder (a shared filesystem)"
                    if e.no_stamp
                    else "planned by rank 0 for another collection, model or settings: give every rank the "
                    "same MODEL, --data and flags"
                )
                raise UserError(f"rank {r}: {work / 'work.json'} {why}") from None
        mine = plan.share(r, w)
        say(
            f"embedding {len(coll)} items in {len(plan)} chunk(s) of {plan.chunk_size} over {w} ranks: "
            f"{len(mine)} chunk(s) here (chunk c goes to rank c % {w})"
        )
        computed, reused, _ = embed_chunks(plan, mine, progress=progress and ranks.is_main, log=say)
        say(f"embedding done: {computed} chunk(s) computed, {reused} reused")
        finished = ranks.barrier()
    if not ranks.is_main:
        if not finished:
            raise UserError(
                f"rank {r}: lost contact with rank 0 before it wrote the index; rerun the same command"
            )
        return None
    if not finished:
        log("some rank stopped before the end; assembling the chunks that are there")
    log(f"assembling {len(plan)} chunk(s) from {work}")
    return assemble_chunks(plan, embed_missing=False, wait_s=SHARED_FS_WAIT_S, log=log)


def _learned_coder(encoder: Any):
    """`--kind learned-binary`: the codes of the model's hash heads (a run of `xmodal hash train`)."""
    from xmodal.index.binary import LearnedCoder

    heads = getattr(getattr(encoder, "model", None), "hash_heads", None)
    if heads is None:
        raise UserError(
            "--kind learned-binary: the model has no hash heads; train them first "
            "(xmodal hash train RUN --bits 64 --data M --out HASHRUN) and index with HASHRUN"
        )
    return LearnedCoder.from_heads(heads)


def _encoder_for(idx: SearchIndex, encoder: Any) -> Any:
    if encoder is not None:
        idx.encoder = encoder
    return idx.encoder


def add_to_index(
    path: str | Path,
    data: Any,
    *,
    encoder: Any = None,
    chunk_size: int = 4096,
    progress: bool = True,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
    max_pixels: int = MAX_PIXELS,
    log: Any = _log,
) -> int:
    """Embed `data` with the index's model and append it to the index at `path`. Returns the count added."""
    path = Path(path).absolute()
    with fsutil.locked(path):
        idx = open_index(path, mmap=False)
        idx.refuse_during_backfill()
        mode, decoding = gen_captions.recorded(idx.info)  # an index built with generated captions goes on
        coll, read_skips = to_collection(
            data,
            image_key=image_key,
            caption_key=caption_key,
            label_key=label_key,
            max_pixels=max_pixels,
            captions=mode,
        )
        dup = [i for i in coll.ids if idx.row_of(i) is not None]
        if dup:
            raise UserError(
                f"{len(dup)} item id(s) are already in {path} (e.g. {dup[0]!r}); remove them with "
                "`xmodal index delete` first"
            )
        enc = _encoder_for(idx, encoder)
        work = path.parent / f"{path.name}.work-add"
        emb = embed_collection(
            enc,
            coll,
            work,
            chunk_size=chunk_size,
            caption_gallery=bool(idx.info.get("caption_gallery")),
            thumb_size=int(idx.info.get("thumb_size", 128)),
            progress=progress,
            log=log,
            captions=mode,
            decoding=decoding,
        )
        skipped = {**read_skips, **emb.skipped}
        if skipped:
            log("skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
        n = idx.add_embedded(emb)
        idx.save(path)
        shutil.rmtree(work, ignore_errors=True)
    log(f"added {n} item(s); {path} now holds {len(idx)}")
    if hint := idx.training_hint():  # IVF/PQ/ITQ fitted to a much smaller collection
        log(hint)
    return n


def delete_from_index(path: str | Path, ids: Sequence[str], log: Any = _log) -> int:
    """Remove items by id from the index at `path`; returns how many were removed (unknown ids are
    reported and ignored)."""
    path = Path(path).absolute()
    with fsutil.locked(path):
        idx = open_index(path, mmap=False)
        unknown = [i for i in ids if idx.row_of(i) is None]
        if unknown:
            log(f"not in the index (ignored): {', '.join(unknown[:10])}{' …' if len(unknown) > 10 else ''}")
        n = idx.delete(ids)
        if n:
            idx.save(path)
    log(f"deleted {n} item(s); {path} now holds {len(idx)}")
    return n


def read_text_lines(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--texts {path}: file not found")
    try:
        lines = [x.strip() for x in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(f"--texts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    lines = [x for x in lines if x]
    if not lines:
        raise UserError(f"--texts {path}: no non-empty lines")
    return lines


def add_bank(
    path: str | Path,
    *,
    texts: Sequence[str] | None = None,
    data: Any = None,
    encoder: Any = None,
    beta: float = DEFAULT_BETA,
    image_beta: float | None = None,
    invgc: str | None = None,
    r_q: float = 0.1,
    r_g: float = 0.1,
    pool_rate: float = 0.01,
    chunk_size: int = 4096,
    progress: bool = True,
    source: str = "",
    log: Any = _log,
) -> SearchIndex:
    """Embed query/gallery banks and store them in the index (hubness offsets, activation sets, folded ANN).

    texts → the text bank (queries for text→image); data (a manifest/dataset) → its images become the image
    bank and its captions join the text bank. invgc: none | invgc | localadj applied to the gallery
    vectors. Each call replaces the banks it gives and keeps the others."""
    path = Path(path).absolute()
    if texts is None and data is None and invgc is None:
        raise UserError("xmodal index bank: give --texts FILE and/or --data MANIFEST (or --invgc)")
    with fsutil.locked(path):
        idx = open_index(path, mmap=False)
        idx.refuse_during_backfill()
        text_bank: list[str] = list(texts or [])
        if data is not None or text_bank:
            enc = _encoder_for(idx, encoder)
        if data is not None:
            coll, _ = to_collection(data)
            work = path.parent / f"{path.name}.work-bank"
            emb = embed_collection(
                enc, coll, work, chunk_size=chunk_size, thumb_size=0, progress=progress, log=log
            )
            shutil.rmtree(work, ignore_errors=True)
            if len(emb.vectors):
                idx.set_bank(
                    "image", emb.vectors, beta=image_beta or beta, source=source or coll.source, refresh=False
                )
            text_bank += [c for r in emb.rows for c in r["captions"]]
        if text_bank:
            vecs = np.concatenate(
                [enc.encode_texts(text_bank[i : i + 4096]).numpy() for i in range(0, len(text_bank), 4096)]
            )
            idx.set_bank(
                "text", vecs, beta=beta, source=source or ("texts" if texts else "captions"), refresh=False
            )
        if invgc is not None:
            idx.set_invgc(invgc, r_q=r_q, r_g=r_g, pool_rate=pool_rate, refresh=False)
        idx.refresh_hubness()
        idx.save(path)
    log(
        f"banks in {path}: "
        + (", ".join(f"{b} ({idx.info['banks'][b]['count']})" for b in idx.bank_names) or "none")
        + (f"; InvGC {idx.info['invgc']['method']}" if idx.info.get("invgc") else "")
    )
    return idx
