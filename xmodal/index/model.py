"""What an index records about its embedding model, and loading that model again safely.

index.json names its model by `source` (and `pretrained`). Only three kinds of source are accepted, each
of which ends in a loader that never unpickles code (`torch.load(weights_only=True)` through
`xmodal.fsutil.load_torch_safe` or `open_clip.load_checkpoint(weights_only=True)`):

- an xmodal run directory (config.yaml + checkpoints/latest.pt), no `pretrained`;
- an open_clip export directory (model.json + open_clip_model.pt), no `pretrained`;
- an open_clip config name or a config .json file, with an optional weights file (or open_clip hub tag).

Anything else in index.json is a one-line UserError before any file is read. A bare config name without
weights is a seeded random init in `load_encoder` (so a test or demo index can still be searched by text);
index.json records that as `"random_init": true`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from xmodal.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # an open_clip config name / hub tag: no paths


def has_weights(source: str | Path, pretrained: str | None) -> bool:
    return bool(pretrained) or Path(source).is_dir()


def describe_source(source: str | Path, pretrained: str | None) -> dict[str, Any]:
    """What index.json records so the model can be found again: absolute paths where they are paths."""
    src = Path(source)
    return {
        "source": str(src.absolute()) if src.exists() else str(source),
        "pretrained": str(Path(pretrained).absolute())
        if pretrained and Path(pretrained).exists()
        else pretrained,
        "random_init": not has_weights(source, pretrained),
    }


def check_model_record(model: Any, where: str | Path) -> tuple[str, str | None]:
    """(source, pretrained) from index.json's model record, if it is one of the accepted kinds (see the
    module docstring); otherwise a one-line UserError naming `where` (the index.json file)."""
    fix = "rebuild the index with `xmodal index build`, or pass --model to search"
    if not isinstance(model, dict) or not model.get("source"):
        raise UserError(f"{where}: records no model; {fix}")
    src, pre = model.get("source"), model.get("pretrained")
    if not isinstance(src, str) or (pre is not None and not isinstance(pre, str)):
        raise UserError(f"{where}: model source/pretrained must be strings; {fix}")
    path = Path(src)
    if path.is_dir():
        if pre:
            raise UserError(f"{where}: model {src} is a directory, which carries its own weights; {fix}")
        if (path / "config.yaml").is_file():
            if not (path / "checkpoints" / "latest.pt").is_file():
                raise UserError(f"{where}: model run {src} has no checkpoints/latest.pt; {fix}")
        elif not ((path / "model.json").is_file() and (path / "open_clip_model.pt").is_file()):
            raise UserError(
                f"{where}: model {src} is neither an xmodal run (config.yaml) nor an open_clip export "
                f"(model.json + open_clip_model.pt); {fix}"
            )
        return src, None
    if src.endswith(".json"):
        if not path.is_file():
            raise UserError(f"{where}: model config {src} not found; {fix}")
    elif path.exists() or not _NAME.fullmatch(src):
        raise UserError(
            f"{where}: model source {src!r} is not an xmodal run, an open_clip export directory, a config "
            f"name or a config .json; {fix}"
        )
    if pre:
        ppath = Path(pre)
        if ppath.exists():
            if not ppath.is_file():
                raise UserError(f"{where}: model weights {pre} is not a file; {fix}")
        elif src.endswith(".json") or not _NAME.fullmatch(pre):
            raise UserError(f"{where}: model weights {pre} not found; {fix}")
    return src, pre


def load_recorded_encoder(info: dict[str, Any], where: str | Path) -> Any:
    """The Encoder that index.json names, loaded through the safe loaders only; any failure is one line
    naming index.json (torch and open_clip are imported here, not by the storage layer)."""
    src, pre = check_model_record(info.get("model"), where)
    from xmodal.models import load_encoder

    try:
        enc = load_encoder(src, pre)
    except UserError as e:
        raise UserError(f"{where}: cannot load its model ({e}); rebuild the index or pass --model") from e
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as e:  # e.g. a hand-edited config.yaml
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"{where}: cannot load its model {src} ({type(e).__name__}: {first}); rebuild the index or "
            "pass --model"
        ) from e
    if int(enc.dim) != int(info["dim"]):
        raise UserError(
            f"{where}: model {src} gives {enc.dim}-d vectors but the index holds {info['dim']}-d ones; "
            "rebuild the index or pass --model"
        )
    return enc
