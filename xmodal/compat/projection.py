"""A fitted map from a new model's embedding space into an old model's, applied with numpy only.

One map per modality: y = normalise(x W + b) ("linear"), or that plus a residual ReLU MLP
(x W + b + relu(x W1 + b1) W2, "mlp"). A projection fitted on text alone has only a text map, which the image
side then shares (`info["image_map"]` says which). On disk a projection is a folder:

- `projection.json`: kind, d_new, d_old, fitted_on {"text": n_texts, "pairs": n_pairs}, the old and new model
  records (`xmodal.index.model.describe_source` plus name, dim and a weights fingerprint), the fit's settings
  and losses, what the fit embedded, and `fingerprint`, the content hash of the weights;
- `projection.safetensors`: the arrays, named `text.W`, `text.b` (and `text.W1`, `text.b1`, `text.W2` for
  "mlp"), the same under `image.` when the image side has its own map.

The folder is written whole into a temp folder beside it and swapped in (`xmodal.fsutil.replace_dir`), so a
reader sees the previous projection or the new one, never a mix; loading checks the hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.errors import UserError

KINDS = ("linear", "mlp")
MODALITIES = ("text", "image")
JSON_NAME = "projection.json"
WEIGHTS_NAME = "projection.safetensors"
FORMAT = 1
_PARAMS = {"linear": ("W", "b"), "mlp": ("W", "b", "W1", "b1", "W2")}
_FIX = "re-run `xmodal compat fit` to write it again"


def params_of(kind: str) -> tuple[str, ...]:
    if kind not in _PARAMS:
        raise ValueError(f"projection kind {kind!r}: choose one of {', '.join(KINDS)}")
    return _PARAMS[kind]


def content_hash(weights: dict[str, np.ndarray]) -> str:
    """sha256 (24 hex digits) of every array's name, dtype, shape and bytes, in name order: the same arrays
    give the same hash whatever file they were read from."""
    h = hashlib.sha256()
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@dataclass
class Projection:
    """new-model embeddings [n, d_new] → old-model space [n, d_old], L2-normalised, per modality."""

    kind: str
    d_new: int
    d_old: int
    weights: dict[str, np.ndarray]  # "<modality>.<param>" → float32 array
    fitted_on: dict[str, int] = field(default_factory=lambda: {"text": 0, "pairs": 0})
    old_model: dict[str, Any] | None = None
    new_model: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the fit's steps, lr, seed, temperature, …
    losses: dict[str, Any] = field(default_factory=dict)  # first/last loss of each stage
    embedded: dict[str, Any] = field(default_factory=dict)  # the fit's cost: images/texts each model embedded

    def __post_init__(self) -> None:
        self.weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.weights.items()}
        self.check()

    # -- structure --------------------------------------------------------------------------------------
    def check(self) -> None:
        """ValueError unless the arrays are exactly one text map (and optionally one image map) of `kind`
        with the shapes d_new → d_old."""
        names = params_of(self.kind)
        hidden = None
        for mod in MODALITIES:
            have = {k.split(".", 1)[1] for k in self.weights if k.startswith(f"{mod}.")}
            if not have and mod == "image":
                continue
            if have != set(names):
                raise ValueError(f"{mod} map has arrays {sorted(have)}; a {self.kind} map has {list(names)}")
            w = {p: self.weights[f"{mod}.{p}"] for p in names}
            want = {"W": (self.d_new, self.d_old), "b": (self.d_old,)}
            if self.kind == "mlp":
                hidden = w["W1"].shape[1] if w["W1"].ndim == 2 else -1
                want |= {"W1": (self.d_new, hidden), "b1": (hidden,), "W2": (hidden, self.d_old)}
            for p, shape in want.items():
                if tuple(w[p].shape) != shape:
                    raise ValueError(f"{mod}.{p} has shape {tuple(w[p].shape)}, expected {shape}")
        extra = [k for k in self.weights if k.split(".", 1)[0] not in MODALITIES]
        if extra:
            raise ValueError(f"unexpected arrays {extra}")

    @property
    def has_image_map(self) -> bool:
        return "image.W" in self.weights

    @property
    def fingerprint(self) -> str:
        return content_hash(self.weights)

    @property
    def info(self) -> dict[str, Any]:
        """What a log line or index.json says about this projection."""
        return {
            "kind": self.kind,
            "d_new": self.d_new,
            "d_old": self.d_old,
            "fitted_on": dict(self.fitted_on),
            "image_map": self._image_map_note(),
            "fingerprint": self.fingerprint,
        }

    def _image_map_note(self) -> str:
        pairs = int(self.fitted_on.get("pairs", 0))
        if self.has_image_map:
            how = {"shift": "the text map plus an image offset"}.get(self.settings.get("image_side"), "")
            return f"own, fitted on {pairs} pairs" + (f" ({how})" if how else "")
        if pairs:
            return f"shared with the text map (one map fitted on text and {pairs} pairs)"
        return "shared with the text map (fitted on text only)"

    # -- inference ---------------------------------------------------------------------------------------
    def apply(self, x: np.ndarray, modality: str) -> np.ndarray:
        """float32 [n, d_new] new-model embeddings of `modality` ("text" | "image") → float32 [n, d_old],
        L2-normalised rows in the old model's space."""
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r}: use 'text' or 'image'")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_new:
            raise ValueError(f"expected [n, {self.d_new}] new-model embeddings, got shape {x.shape}")
        mod = modality if modality == "text" or self.has_image_map else "text"
        w = {p: self.weights[f"{mod}.{p}"] for p in params_of(self.kind)}
        x = _unit(x)
        y = x @ w["W"] + w["b"]
        if self.kind == "mlp":
            y = y + np.maximum(x @ w["W1"] + w["b1"], 0.0) @ w["W2"]
        return _unit(y).astype(np.float32, copy=False)

    # -- persistence -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "d_new": self.d_new,
            "d_old": self.d_old,
            "fitted_on": {
                "text": int(self.fitted_on.get("text", 0)),
                "pairs": int(self.fitted_on.get("pairs", 0)),
            },
            "image_map": "own" if self.has_image_map else "text",
            "old_model": self.old_model,
            "new_model": self.new_model,
            "settings": self.settings,
            "losses": self.losses,
            "embedded": self.embedded,
            "weights": WEIGHTS_NAME,
            "fingerprint": self.fingerprint,
        }

    def save(self, folder: str | Path) -> Path:
        """Write `folder/projection.json` + `folder/projection.safetensors`, swapped in as one folder. A
        folder holding anything else is refused (the swap would replace it)."""
        from safetensors.numpy import save as st_save

        from xmodal.fsutil import locked, recover_dir, replace_dir, temp_dir_for, write_bytes_atomic

        final = Path(folder)
        check_out(final)
        with locked(final):
            recover_dir(final)
            check_out(final)
            tmp = temp_dir_for(final)
            try:
                meta = {"format": str(FORMAT), "kind": self.kind, "fingerprint": self.fingerprint}
                write_bytes_atomic(tmp / WEIGHTS_NAME, st_save(self.weights, metadata=meta))
                write_bytes_atomic(tmp / JSON_NAME, (json.dumps(self.to_json(), indent=2) + "\n").encode())
                replace_dir(tmp, final)
            finally:
                if tmp.exists():
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)
        return final


def check_out(folder: str | Path) -> None:
    """UserError unless `folder` can take a projection: new, empty, or holding only a previous one (the
    save swaps the whole folder, so anything else in it would be lost)."""
    final = Path(folder)
    if final.exists() and not final.is_dir():
        raise UserError(f"--out {final}: is a file; give a folder for the projection")
    if final.is_dir():
        other = sorted(p.name for p in final.iterdir() if p.name not in (JSON_NAME, WEIGHTS_NAME))
        if other:
            raise UserError(
                f"--out {final}: holds other files ({', '.join(other[:3])}); give a new or empty folder for "
                "the projection"
            )


def load_projection(folder: str | Path) -> Projection:
    """Read a projection folder written by `Projection.save`; any missing, damaged or mismatched file is a
    one-line UserError naming it and the fix."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a projection folder" if folder.exists() else "no such projection folder"
        raise UserError(
            f"{folder}: {what}; fit one with `xmodal compat fit --old OLD --new NEW --out {folder}`"
        )
    jpath, wpath = folder / JSON_NAME, folder / WEIGHTS_NAME
    if not jpath.is_file():
        raise UserError(f"{jpath}: not found; {folder} is not a projection folder ({_FIX})")
    try:
        meta = json.loads(jpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{jpath}: not valid JSON ({type(e).__name__}); {_FIX}") from e
    if not isinstance(meta, dict):
        raise UserError(f"{jpath}: not a projection record (a JSON object); {_FIX}")
    try:
        kind, d_new, d_old = meta["kind"], int(meta["d_new"]), int(meta["d_old"])
        fitted = {k: int(v) for k, v in dict(meta.get("fitted_on") or {}).items()}
        want = str(meta["fingerprint"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{jpath}: missing or bad field ({type(e).__name__}: {e}); {_FIX}") from e
    if kind not in KINDS:
        raise UserError(f"{jpath}: kind {kind!r} is not one of {', '.join(KINDS)}; {_FIX}")
    if meta.get("format", FORMAT) != FORMAT:
        raise UserError(f"{jpath}: format {meta.get('format')!r}, this xmodal reads format {FORMAT}; {_FIX}")
    if not wpath.is_file():
        raise UserError(f"{wpath}: not found (projection.json needs it); {_FIX}")
    try:
        weights = st_load(wpath.read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{wpath}: not a readable safetensors file ({first}); {_FIX}") from e
    got = content_hash({k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    if got != want:
        raise UserError(
            f"{wpath}: content hash {got} does not match the fingerprint {want} in projection.json (damaged, "
            f"or the two files come from different fits); {_FIX}"
        )
    try:
        return Projection(
            kind=kind,
            d_new=d_new,
            d_old=d_old,
            weights=weights,
            fitted_on=fitted,
            old_model=meta.get("old_model"),
            new_model=meta.get("new_model"),
            settings=dict(meta.get("settings") or {}),
            losses=dict(meta.get("losses") or {}),
            embedded=dict(meta.get("embedded") or {}),
        )
    except ValueError as e:
        raise UserError(f"{wpath}: arrays do not fit projection.json ({e}); {_FIX}") from e
