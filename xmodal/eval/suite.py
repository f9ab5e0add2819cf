"""`evaluate()`: run the requested tasks on one (model, data) pair with one shared embedding cache."""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.errors import UserError
from xmodal.eval.cache import EmbeddingCache
from xmodal.eval.core import TASKS, EvalContext, EvalOptions, read_templates
from xmodal.fsutil import write_text_atomic

DEFAULT_TASKS = ("retrieval", "zeroshot")


def parse_tasks(tasks: str | Sequence[str]) -> tuple[list[str], bool]:
    """'all' | 'a,b' | ['a', 'b'] → (task names in canonical order, whether 'all' was asked)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    items = [t.strip().lower() for t in items if t and t.strip()]
    if not items:
        raise UserError(f"--task: no task given; choose from {', '.join(TASKS)} or all")
    if "all" in items:
        return list(TASKS), True
    unknown = [t for t in items if t not in TASKS]
    if unknown:
        raise UserError(f"--task {unknown[0]}: unknown task; choose from {', '.join(TASKS)} or all")
    return [t for t in TASKS if t in items], False


def captioning_requests(encoder: Any, names: list[str], is_all: bool, baseline: str | None) -> list[str]:
    """Captioning needs a caption decoder (CoCa): asked for by name on another model it is an error;
    "all" means every task the model can do, so there it is left out (unless --caption-baseline asks)."""
    from xmodal.eval import captioning

    if "captioning" in names:
        if is_all and baseline is None and not captioning.has_decoder(encoder):
            names = [n for n in names if n != "captioning"]
        else:
            captioning.require_decoder(encoder)
    captioning.check_requests(names, baseline)
    return names


def jsonable(x: Any) -> Any:
    """Plain JSON types: numpy scalars → Python, NaN/inf → null, tuples → lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def evaluate(
    encoder: Any,
    data: Any,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    positives: str | None = None,
    templates: Sequence[str] | str | Path | None = None,
    batch_size: int = 256,
    report_dir: str | Path | None = None,
    skip_unavailable: bool | None = None,
    cache: EmbeddingCache | None = None,
    **task_options: Any,
) -> dict:
    """Evaluate `encoder` on `data` (an ImageTextData) and return the JSON-able results dict.

    tasks: names from TASKS, a comma string, or "all". A task that cannot run on this data (no labels,
    no negatives) is an error when asked for by name, and a `{"skipped": reason}` entry under "all"
    or the default tasks (or when `skip_unavailable=True`). templates: list of prompt templates or a
    path to a template file. task_options: any EvalOptions field (ties, hubness_k, pgd_eps, …).
    """
    t0 = time.perf_counter()
    names, is_all = parse_tasks(tasks)
    if skip_unavailable is None:
        skip_unavailable = is_all or (not isinstance(tasks, str) and tuple(tasks) == DEFAULT_TASKS)
    if isinstance(templates, str | Path):
        templates = read_templates(templates)
    opts = EvalOptions.from_kwargs(
        positives=positives, templates=list(templates) if templates is not None else None, **task_options
    )
    from xmodal.eval.rerank import check_requests, require_fusion

    check_requests(names, opts.rerank, opts.score)
    names = captioning_requests(encoder, names, is_all, opts.caption_baseline)
    if is_all and getattr(getattr(encoder, "model", None), "hash_heads", None) is None:
        names = [n for n in names if n != "hashing"]  # "all": hash codes for hash runs (by name: ITQ/LSH too)
    if is_all and opts.compat_old is None:
        names = [n for n in names if n != "compat"]  # "all": compat only when an old model is given
    if opts.rerank is not None:
        require_fusion(encoder, f"--rerank {opts.rerank}")
    if opts.score == "itm":
        require_fusion(encoder, "--score itm")
    cache = cache or EmbeddingCache(encoder, data, batch_size)
    ctx = EvalContext(encoder=encoder, data=data, cache=cache, options=opts)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in names:
        mod = importlib.import_module(f"xmodal.eval.{name}")
        why = mod.unavailable(ctx)
        if why is not None:
            if not skip_unavailable:
                raise UserError(f"--task {name}: {why}")
            results[name] = {"skipped": why}
            ctx.log(f"{name}: skipped ({why})")
            continue
        ctx.log(f"{name} …")
        t = time.perf_counter()
        results[name] = mod.run(ctx)
        timings[name] = round(time.perf_counter() - t, 3)
        ctx.log(f"{name} done in {timings[name]:.2f}s")
    results["meta"] = {
        "model": str(getattr(encoder, "name", type(encoder).__name__)),
        "random_init": bool(getattr(encoder, "random_init", False)),
        "data": str(getattr(data, "source", "") or ""),
        "n_images": cache.n_images,
        "n_texts": cache.n_texts,
        "n_unique_texts": len(cache.unique_captions),
        "tasks": names,
        "positives": opts.positives or "pair",
        "ties": opts.ties,
        "seed": opts.seed,
        "device": str(getattr(encoder, "device", "cpu")),
        "task_seconds": timings,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    results = jsonable(results)
    if report_dir is not None:
        from xmodal.eval.report import write_report

        write_report(report_dir, results, ctx)
        results["meta"]["seconds"] = round(time.perf_counter() - t0, 3)
        Path(report_dir, "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def write_json(path: str | Path, results: dict) -> None:
    """Write results atomically (a crash never leaves half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(p, json.dumps(results, indent=2) + "\n")
