"""Backward compatibility of a model upgrade (`xmodal eval --task compat --old OLD --new NEW`).

Retrieval (t2i and i2t, the same metrics and positives as the retrieval task) in four cells, named
queries_gallery: `old_old` (old-model queries, old-model gallery), `new_new`, `new_old` (new-model queries
against a gallery the old model embedded: what an index upgraded without re-embedding answers) and, with a
projection (`xmodal compat fit`), `proj_old` (projected new-model queries against the old gallery). The
upgrade is compatible in a direction when M(new, old) > M(old, old) on R@1, as BCT (Shen et al., CVPR 2020)
states the criterion; `compatible_projected` applies it to M(proj(new), old).

The task's encoder is the new model; the old one comes in `EvalOptions.compat_old` (a model source or an
Encoder) and the projection in `compat_projection` (a folder or any object with `apply(x, modality)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmodal.errors import UserError
from xmodal.eval.core import EvalContext
from xmodal.eval.metrics import retrieval_metrics

CELLS = ("old_old", "new_new", "new_old", "proj_old")
CRITERION = "M(new, old) > M(old, old) on R@1 (BCT)"


def _t(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _cell(
    q_text: torch.Tensor,
    g_image: torch.Tensor,
    q_image: torch.Tensor,
    g_text: torch.Tensor,
    positives: torch.Tensor,
    ks: Sequence[int],
    map_k: int,
    ties: str,
) -> dict[str, Any]:
    """t2i: text queries × image gallery; i2t: image queries × text gallery (images with a caption)."""
    has = positives.any(0)
    return {
        "t2i": retrieval_metrics(q_text @ g_image.T, positives, ks, map_k, ties),
        "i2t": retrieval_metrics((q_image @ g_text.T)[has], positives.T[has], ks, map_k, ties),
    }


def compat_cells(
    old_text: Any,
    old_image: Any,
    new_text: Any,
    new_image: Any,
    positives: Any,
    *,
    project: Callable[[np.ndarray, str], np.ndarray] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    ties: str = "topk",
) -> dict[str, Any]:
    """The compat metric on embeddings: T texts and N images under both models (L2-normalised rows),
    `positives` T×N bool (caption t is a positive of image i). `project(x, modality)` maps new-model
    embeddings into the old space (Projection.apply). New-model queries against the old gallery need equal
    dimensions; otherwise `new_old` is skipped (a projection bridges the dimensions)."""
    ot, oi, nt, ni = _t(old_text), _t(old_image), _t(new_text), _t(new_image)
    pos = torch.as_tensor(positives, dtype=torch.bool)
    if len(ot) != len(nt) or len(oi) != len(ni) or tuple(pos.shape) != (len(ot), len(oi)):
        raise ValueError(
            f"need the same {len(ot)} texts and {len(oi)} images under both models and a T×N positives "
            f"matrix; got {len(nt)} new texts, {len(ni)} new images, positives {tuple(pos.shape)}"
        )
    kw = {"ks": ks, "map_k": map_k, "ties": ties}
    cells: dict[str, Any] = {
        "old_old": _cell(ot, oi, oi, ot, pos, **kw),
        "new_new": _cell(nt, ni, ni, nt, pos, **kw),
    }
    if nt.shape[1] == ot.shape[1]:
        cells["new_old"] = _cell(nt, oi, ni, ot, pos, **kw)
    else:
        cells["new_old"] = {
            "skipped": f"the new model's vectors are {nt.shape[1]}-d and the old gallery's {ot.shape[1]}-d: "
            "not comparable without a projection (xmodal compat fit)"
        }
    if project is not None:
        pt = _t(project(nt.numpy(), "text"))
        pi = _t(project(ni.numpy(), "image"))
        if pt.shape != ot.shape or pi.shape != oi.shape:
            raise ValueError(
                f"the projection gives {tuple(pt.shape[1:])}-d rows, the old model {ot.shape[1]}-d"
            )
        cells["proj_old"] = _cell(pt, oi, pi, ot, pos, **kw)
    out: dict[str, Any] = {"cells": cells, "criterion": CRITERION}
    out["compatible"] = _compatible(cells["new_old"], cells["old_old"])
    if project is not None:
        out["compatible_projected"] = _compatible(cells["proj_old"], cells["old_old"])
    return out


def _compatible(cell: dict[str, Any], base: dict[str, Any]) -> dict[str, bool]:
    if "skipped" in cell:
        return {"t2i": False, "i2t": False}
    return {d: bool(cell[d]["R@1"] > base[d]["R@1"]) for d in ("t2i", "i2t")}


# -- the eval task ------------------------------------------------------------------------------------


def unavailable(ctx: EvalContext) -> str | None:
    if ctx.options.compat_old is None:
        return "needs the old model (--old OLD_RUN, the model that embedded the gallery)"
    if ctx.cache.n_images == 0 or ctx.cache.n_texts == 0:
        return "no image-caption pairs in the data"
    return None


def resolve_old(old: Any, device: Any = None) -> Any:
    """The old model as an Encoder (a model source is loaded the way `xmodal eval MODEL` loads one)."""
    if isinstance(old, str | Path):
        from xmodal.models import load_encoder

        return load_encoder(str(old), device=str(device) if device is not None else None)
    return old


def resolve_projection(proj: Any, d_new: int, d_old: int) -> Any:
    """A Projection (loaded from its folder when given as a path) whose dimensions fit both models."""
    if proj is None:
        return None
    if isinstance(proj, str | Path):
        from xmodal.compat.projection import load_projection  # the stage above eval: loaded on use only

        proj = load_projection(proj)
    dn, do = getattr(proj, "d_new", d_new), getattr(proj, "d_old", d_old)
    if (dn, do) != (d_new, d_old):
        raise UserError(
            f"--projection maps {dn}-d to {do}-d vectors, but the new model gives {d_new}-d and the old "
            f"{d_old}-d; fit one for these models with `xmodal compat fit --old OLD --new NEW`"
        )
    return proj


def old_data(ctx: EvalContext, old: Any) -> Any:
    """The evaluation data at the old model's input size (the same items, in the same order)."""
    data = ctx.data
    if int(getattr(data, "image_size", old.image_size)) == int(old.image_size):
        return data
    from xmodal.data import load_dataset

    ctx.log(f"compat: decoding the data again at the old model's {old.image_size}px")
    again = load_dataset(str(data.source), int(old.image_size), progress=False)
    if list(again.keys) != list(data.keys) or list(again.captions) != list(data.captions):
        raise UserError(
            f"--data {data.source}: read differently at {old.image_size}px; cannot pair the items"
        )
    return again


def run(ctx: EvalContext) -> dict[str, Any]:
    from xmodal.eval.cache import EmbeddingCache
    from xmodal.eval.retrieval import positives_for

    o, c = ctx.options, ctx.cache
    old = resolve_old(o.compat_old, getattr(ctx.encoder, "device", None))
    proj = resolve_projection(o.compat_projection, int(c.caption_embs.shape[1]), int(old.dim))
    old_cache = EmbeddingCache(old, old_data(ctx, old), c.batch_size)
    if old_cache.captions != c.captions:
        raise UserError("--old: the old model's view of --data has other captions; cannot pair the items")
    out = compat_cells(
        old_cache.caption_embs,
        old_cache.images,
        c.caption_embs,
        c.images,
        positives_for(ctx),
        project=proj.apply if proj is not None else None,
        ks=o.ks,
        map_k=o.map_k,
        ties=o.ties,
    )
    out["old"] = str(getattr(old, "name", type(old).__name__))
    out["new"] = str(getattr(ctx.encoder, "name", type(ctx.encoder).__name__))
    if proj is not None:
        info = getattr(proj, "info", None)
        out["projection"] = dict(info) if isinstance(info, dict) else {"kind": type(proj).__name__}
    out["embedded"] = {  # what this evaluation computed (cost), per model
        "old": {"images": old_cache.n_images, "texts": old_cache.n_texts_encoded},
        "new": {"images": c.n_images, "texts": c.n_texts_encoded},
    }
    out["positives"] = o.positives or "pair"
    out["ties"] = o.ties
    return out
