"""Index metadata: meta.parquet rows as pyarrow tables built from dict rows, and the index.json record."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT = 1


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """List of dict rows → pyarrow table; columns whose values mix types are stored as strings."""
    if not rows:
        return pa.table({"id": pa.array([], pa.string())})
    cols: dict[str, list] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, [])
    for k in cols:
        cols[k] = [r.get(k) for r in rows]
    arrays = {}
    for k, vals in cols.items():
        if k == "captions":
            arrays[k] = pa.array([list(v) if v is not None else [] for v in vals], pa.list_(pa.string()))
            continue
        try:
            arrays[k] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[k] = pa.array(
                [
                    None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                    for v in vals
                ],
                pa.string(),
            )
        if pa.types.is_null(arrays[k].type):
            arrays[k] = arrays[k].cast(pa.string())
    return pa.table(arrays)


def concat_meta(a: pa.Table, b: pa.Table) -> pa.Table:
    """Append table b to a, widening column types where they differ (else via Python rows)."""
    if a.num_rows == 0:
        return b
    try:
        return pa.concat_tables([a, b], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return rows_to_table(a.to_pylist() + b.to_pylist())


def jsonable(v: Any) -> Any:
    """A metadata value as JSON can hold it (numpy scalars → Python, NaN/inf → None)."""
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def row_dict(meta: pa.Table, row: int) -> dict[str, Any]:
    """One metadata row as a JSON-ready dict."""
    return {k: jsonable(v) for k, v in meta.slice(int(row), 1).to_pylist()[0].items()}


def new_info(
    kind: str,
    dim: int,
    options: dict[str, Any],
    *,
    image_size: int | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh index.json dict (params and counts are filled in when the ANN is built)."""
    opts = {
        "rerank": None,  # None: the depth grows with N (xmodal.index.ann.search_params)
        "bits": 256,
        "binary_method": "itq",
        "hnsw_m": 32,
        "ef_search": None,
        "nlist": None,
        "nprobe": None,
        "binary_index": None,  # flat | hnsw | ivf Hamming index (None: by N)
        "seed": 0,
    }
    unknown = set(options) - set(opts)
    if unknown:
        raise TypeError(f"unknown index option(s): {', '.join(sorted(unknown))}")
    opts.update({k: v for k, v in options.items() if v is not None or k in ("ef_search", "nlist", "nprobe")})
    return {
        "format": FORMAT,
        "created": now(),
        "updated": now(),
        "model": model or {"name": None, "source": None, "pretrained": None},
        "dim": int(dim),
        "image_size": image_size,
        "kind": kind,
        "effective_kind": kind,
        "normalisation": "l2",
        "metric": "inner_product",
        "count": 0,
        "options": opts,
        "caption_gallery": False,
        "thumb_size": 0,
        "banks": {},
        "invgc": None,
    }
