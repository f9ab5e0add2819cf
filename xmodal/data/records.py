"""Manifest readers: JSONL, CSV/TSV, an image folder with .txt captions, and webdataset tar shards.

Every reader yields the same `Record`s for the same data, so the rest of xmodal never cares where a
dataset came from. Bad rows are skipped and counted in `DataStats` (reason → count) instead of failing a
long run; a file that cannot be parsed at all is a `UserError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")  # webdataset reads compressed shards too
_BRACE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


@dataclass
class Record:
    """One image with its captions. `key` is the manifest-relative image path or the webdataset __key__."""

    key: str
    image: str | bytes
    captions: list[str]
    label: str | None = None
    lang: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class DataStats:
    """Counts every skipped or rejected thing by reason, so a run log says what the data lost and why."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n

    def update(self, other: DataStats | dict[str, int]) -> None:
        """Add another stats object's (or a plain dict's) counts to these."""
        for reason, n in (other.counts if isinstance(other, DataStats) else other).items():
            self.add(reason, n)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One human line, e.g. "skipped: 1 corrupt_image, 2 empty_caption"; "" when nothing was skipped."""
        if not self.total():
            return ""
        return "skipped: " + ", ".join(f"{n} {reason}" for reason, n in self.as_dict().items())


# -- shared helpers -----------------------------------------------------------------------------------


def clean_captions(value: Any, stats: DataStats) -> list[str]:
    """A caption field (string or list of strings) → the non-empty stripped strings; the rest is counted."""
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for c in items:
        if not isinstance(c, str):
            stats.add("non_text_caption")
        elif not c.strip():
            stats.add("empty_caption")
        else:
            out.append(c.strip())
    return out


def _opt_str(value: Any) -> str | None:
    """Labels and languages are strings; numbers (class ids) are kept as their text, empty means none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return json.dumps(value, sort_keys=True)
    return str(value).strip()


class _Collector:
    """Builds the record list: drops captionless records and merges rows that name the same image.

    Merging matters for CSV/JSONL files with one row per (image, caption) pair (COCO-style): retrieval
    ground truth needs one image with all its captions, and decoding the image once is cheaper.
    """

    def __init__(self, stats: DataStats, merge: bool = True, keep_uncaptioned: bool = False) -> None:
        self.stats = stats
        self.merge = merge
        self.keep_uncaptioned = keep_uncaptioned  # for captioning a collection: images without text stay
        self.by_key: dict[str, Record] = {}

    def add(self, rec: Record, captions_missing: bool = False) -> None:
        if self.keep_uncaptioned and not rec.captions:
            captions_missing = False
            if rec.key in self.by_key:
                return
            self.by_key[rec.key] = rec
            return
        if captions_missing:
            self.stats.add("missing_caption")
            return
        if not rec.captions:
            self.stats.add("no_valid_caption")
            return
        old = self.by_key.get(rec.key)
        if old is None:
            self.by_key[rec.key] = rec
        elif not self.merge:
            self.stats.add("duplicate_key")
        else:
            _merge_into(old, rec, self.stats)

    def records(self) -> list[Record]:
        return list(self.by_key.values())


def _merge_into(old: Record, new: Record, stats: DataStats) -> None:
    if new.label is not None and old.label is not None and new.label != old.label:
        stats.add("label_conflict")  # first label wins
    old.label = old.label if old.label is not None else new.label
    if new.lang != old.lang or "caption_langs" in old.extra:
        langs = old.extra.get("caption_langs") or [old.lang] * len(old.captions)
        old.extra["caption_langs"] = langs
        old.lang = None
    for c in new.captions:
        if c not in old.captions:
            old.captions.append(c)
            if "caption_langs" in old.extra:
                old.extra["caption_langs"].append(new.lang)
    for k, v in new.extra.items():
        old.extra.setdefault(k, v)


def _image_path(base: Path, value: str) -> tuple[str, str]:
    """Manifest image field → (key, absolute path). Keys are normalised relative paths (posix)."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return p.as_posix(), str(p)
    key = posixpath.normpath(value.replace("\\", "/"))
    return key, str(base / key)


# -- JSONL ----------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, image_key: str | None, caption_key: str | None, label_key: str | None,
                stats: DataStats, keep_uncaptioned: bool = False) -> list[Record]:
    ikey, lkey = image_key or "image", label_key or "label"
    base = path.parent
    col = _Collector(stats, keep_uncaptioned=keep_uncaptioned)
    n_lines = n_no_caption = 0
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save it as UTF-8") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON "
                                "object") from e
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; each "
                                'line must look like {"image": ..., "caption": ...}')
            if ikey not in obj:
                raise UserError(f"{path}:{lineno}: no {ikey!r} field (fields: {', '.join(obj) or 'none'}); "
                                "name the image field with --image-key")
            if not isinstance(obj[ikey], str) or not obj[ikey].strip():
                raise UserError(f"{path}:{lineno}: {ikey!r} must be a non-empty path string")
            n_lines += 1
            ckey = caption_key or ("caption" if "caption" in obj or "captions" not in obj else "captions")
            missing = ckey not in obj
            n_no_caption += missing
            captions = [] if missing else clean_captions(obj[ckey], stats)
            key, abspath = _image_path(base, obj[ikey])
            extra = {k: v for k, v in obj.items() if k not in (ikey, ckey, lkey, "lang")}
            rec = Record(key, abspath, captions, _opt_str(obj.get(lkey)), _opt_str(obj.get("lang")), extra)
            col.add(rec, captions_missing=missing)
    if n_lines and n_no_caption == n_lines and not keep_uncaptioned:
        raise UserError(f"{path}: no line has a {caption_key or 'caption'!r} field; name the caption field "
                        "with --caption-key")
    return _drop_missing_files(col.records(), stats)


# -- CSV / TSV ----------------------------------------------------------------------------------------


def _read_csv(path: Path, image_key: str | None, caption_key: str | None, label_key: str | None,
              stats: DataStats, keep_uncaptioned: bool = False) -> list[Record]:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    ikey, ckey = image_key or "filepath", caption_key or "title"
    col = _Collector(stats, keep_uncaptioned=keep_uncaptioned)
    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    with f:
        reader = csv.DictReader(f, delimiter=sep, strict=True)
        header = next(_csv_rows(path, reader, header=True))[1]
        if keep_uncaptioned and caption_key is None and ckey not in header:
            ckey = None  # no caption column at all: every image is uncaptioned
        _check_columns(path, header, ikey, ckey, label_key)
        for lineno, row in _csv_rows(path, reader):
            if None in row or any(v is None for v in row.values()):
                raise UserError(f"{path}:{lineno}: expected {len(reader.fieldnames or [])} "
                                f"{'tab' if sep == chr(9) else 'comma'}-separated fields; quote fields that "
                                "contain the separator")
            if not row[ikey].strip():
                raise UserError(f"{path}:{lineno}: empty {ikey!r}; every row needs an image path")
            lkey = label_key or "label"
            key, abspath = _image_path(path.parent, row[ikey].strip())
            extra = {k: v for k, v in row.items() if k not in (ikey, ckey, lkey, "lang")}
            caps = clean_captions(row[ckey], stats) if ckey is not None else []
            col.add(Record(key, abspath, caps, _opt_str(row.get(lkey)),
                           _opt_str(row.get("lang")), extra))
    return _drop_missing_files(col.records(), stats)


def _csv_rows(path: Path, reader: csv.DictReader, header: bool = False) -> Iterator[tuple[int, Any]]:
    """(line where the row starts, row), or with header=True just (1, column names). Errors name the line."""
    start = 1
    try:
        if header:
            yield 1, list(reader.fieldnames or [])
            return
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            yield start, row
    except csv.Error as e:
        raise UserError(f"{path}:{start}: cannot parse ({e}); check the quoting") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from e


def _check_columns(path: Path, header: list[str], ikey: str, ckey: str, label_key: str | None) -> None:
    for name, flag in ((ikey, "--image-key"), (ckey, "--caption-key"), (label_key, "--label-key")):
        if name is not None and name not in header:
            raise UserError(f"{path}: no {name!r} column (columns: {', '.join(header) or 'none'}); "
                            f"name it with {flag}")


def _drop_missing_files(records: list[Record], stats: DataStats) -> list[Record]:
    kept = [r for r in records if isinstance(r.image, bytes) or os.path.isfile(r.image)]
    stats.add("missing_image", len(records) - len(kept))
    return kept


# -- image folder + .txt ----------------------------------------------------------------------------------


def folder_files(root: Path) -> list[Path]:
    """Every file under root (sorted, hidden ones skipped): what the folder reader and the cache key see."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _read_folder(
    root: Path, label_key: str | None, stats: DataStats, keep_uncaptioned: bool = False
) -> list[Record]:
    """image.ext + image.txt (one caption per line) + optional image.json (label, lang, other fields)."""
    lkey = label_key or "label"
    images = [p for p in folder_files(root) if p.suffix.lower() in IMAGE_EXTS]
    if not images:
        raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) found; give a manifest, a folder of "
                        "images with .txt captions, or .tar shards")
    col = _Collector(stats, keep_uncaptioned=keep_uncaptioned)
    for img in images:
        key = img.relative_to(root).as_posix()
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            col.add(Record(key, str(img), []), captions_missing=True)
            continue
        try:
            text = txt.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            stats.add("bad_caption_file")
            col.add(Record(key, str(img), []))
            continue
        meta = _read_sidecar(img.with_suffix(".json"), stats)
        captions = clean_captions([ln for ln in text.splitlines() if ln.strip()] or [""], stats)
        extra = {k: v for k, v in meta.items() if k not in (lkey, "lang")}
        col.add(Record(key, str(img), captions, _opt_str(meta.get(lkey)), _opt_str(meta.get("lang")), extra))
    return col.records()


def _read_sidecar(path: Path, stats: DataStats) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or delete it") from e
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object with e.g. a 'label' field")
    return meta


# -- webdataset shards --------------------------------------------------------------------------------


def is_shard_source(source: str | Path) -> bool:
    s = str(source)
    return _is_tar(s) or (bool(_BRACE.search(s)) and (".tar" in s or ".tgz" in s))


def _is_tar(name: str) -> bool:
    return name.endswith(TAR_EXTS)


def expand_shards(source: str | Path) -> list[Path]:
    """A .tar, a brace pattern (shards-{000..003}.tar) or a folder of .tar files → existing shard paths."""
    import braceexpand

    s = str(source)
    p = Path(s)
    if p.is_dir():
        shards = sorted(x for x in p.iterdir() if _is_tar(x.name))
    else:
        shards = [Path(x) for x in braceexpand.braceexpand(s)]
    if not shards:
        raise UserError(f"{source}: no .tar shards found")
    missing = [x for x in shards if not x.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: shard not found ({len(missing)} of {len(shards)} missing); check the "
                        "path or brace pattern")
    return shards


def _read_shards(shards: list[Path], image_key: str | None, caption_key: str | None, label_key: str | None,
                 stats: DataStats, keep_uncaptioned: bool = False) -> list[Record]:
    """Samples (grouped by __key__ with the webdataset library): image under jpg/png/webp/jpeg, one caption
    per line in txt (or the json's caption field), label from json (or a .cls file)."""
    import webdataset as wds

    ikeys = (image_key,) if image_key else WDS_IMAGE_KEYS
    ckey, lkey = caption_key or "caption", label_key or "label"
    # keys identify samples here; a repeated key is a second sample
    col = _Collector(stats, merge=False, keep_uncaptioned=keep_uncaptioned)
    for shard in shards:
        try:
            for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()):
                got = _wds_record(sample, ikeys, ckey, lkey, shard, stats)
                if got is not None:
                    col.add(*got)
        except (tarfile.TarError, OSError, ValueError) as e:
            raise UserError(f"{shard}: not a readable tar shard ({e}); re-create or remove it") from e
    return col.records()


def _wds_record(sample: dict, ikeys: Iterable[str], ckey: str, lkey: str, shard: Path,
                stats: DataStats) -> tuple[Record, bool] | None:
    key = sample["__key__"]
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{shard}: {key}.json is not valid JSON ({e}); fix the shard") from e
        meta = meta if isinstance(meta, dict) else {}
    image = next((sample[k] for k in ikeys if k in sample), None)
    if image is None:
        stats.add("missing_image")
        return None
    if "txt" in sample:
        try:
            lines = [ln for ln in sample["txt"].decode("utf-8").splitlines() if ln.strip()]
            captions = clean_captions(lines or [""], stats)
        except UnicodeDecodeError:
            stats.add("non_text_caption")
            captions = []
        missing = False
    else:
        missing = ckey not in meta
        captions = [] if missing else clean_captions(meta[ckey], stats)
    label = meta.get(lkey)
    if label is None and "cls" in sample:
        label = sample["cls"].decode("utf-8", "replace").strip()
    extra = {k: v for k, v in meta.items() if k not in (ckey, lkey, "lang")}
    return Record(key, bytes(image), captions, _opt_str(label), _opt_str(meta.get("lang")), extra), missing


# -- dispatch -----------------------------------------------------------------------------------------


def source_kind(source: str | Path) -> str:
    """'jsonl' | 'csv' | 'folder' | 'shards' for a source path; UserError when it is none of them."""
    p = Path(source)
    if is_shard_source(source) and not p.is_dir():
        return "shards"
    if p.is_dir():
        entries = [x for x in p.iterdir() if not x.name.startswith(".")]
        if entries and all(_is_tar(x.name) and x.is_file() for x in entries):
            return "shards"
        return "folder"
    if not p.exists():
        raise UserError(f"{source}: not found; give a .jsonl/.csv/.tsv manifest, an image folder or .tar "
                        "shards")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise UserError(f"{source}: unknown manifest type {suffix or '(no extension)'!r}; use .jsonl, .csv or "
                    ".tsv, an image folder, or .tar shards")


def read_records(source: str | Path, *, image_key: str | None = None, caption_key: str | None = None,
                 label_key: str | None = None, stats: DataStats | None = None,
                 keep_uncaptioned: bool = False) -> list[Record]:
    """Read any supported source into Records (images not decoded). Skips are counted in `stats`.
    `keep_uncaptioned`: images without a caption are kept (with none) instead of skipped, for captioning
    a collection (`xmodal caption`, `index build --captions generate`)."""
    stats = stats if stats is not None else DataStats()
    kind = source_kind(source)
    p = Path(source)
    if kind == "jsonl":
        return _read_jsonl(p, image_key, caption_key, label_key, stats, keep_uncaptioned)
    if kind == "csv":
        return _read_csv(p, image_key, caption_key, label_key, stats, keep_uncaptioned)
    if kind == "folder":
        return _read_folder(p, label_key, stats, keep_uncaptioned)
    return _read_shards(expand_shards(source), image_key, caption_key, label_key, stats, keep_uncaptioned)
