"""Every manifest format yields the same samples; bad captions and bad manifests are handled."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from xmodal.data import DataStats, load_dataset, read_records
from xmodal.errors import UserError

# (name, size, captions, label): non-square sizes so resizing and cropping matter
SAMPLES = [
    ("a", (40, 30), ["a red thing", "red, on the left"], "thing"),
    ("b", (30, 44), ["a blue box"], "box"),
    ("c", (50, 50), ["green", "a green ball", "ball, green"], "ball"),
    ("d", (37, 21), ["a \"quoted\" caption\twith a tab"], None),
]


def _image(i: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write_all_formats(root: Path) -> dict[str, str]:
    """One tiny set written as JSONL, CSV, TSV, an image folder with .txt, and webdataset shards."""
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    blobs = {}
    for i, (name, size, _, _) in enumerate(SAMPLES):
        _image(i, size).save(imgs / f"{name}.png")
        blobs[name] = (imgs / f"{name}.png").read_bytes()
    # JSONL: captions as a list (or one string)
    with open(root / "data.jsonl", "w") as f:
        for name, _, caps, label in SAMPLES:
            row = {"image": f"imgs/{name}.png", "caption": caps if len(caps) > 1 else caps[0]}
            if label:
                row["label"] = label
            f.write(json.dumps(row) + "\n")
    # CSV / TSV: one row per (image, caption), open_clip column names; rows of one image are merged
    for ext, sep in (("csv", ","), ("tsv", "\t")):
        with open(root / f"data.{ext}", "w", newline="") as f:
            w = csv.writer(f, delimiter=sep)
            w.writerow(["filepath", "title", "label"])
            for name, _, caps, label in SAMPLES:
                for c in caps:
                    w.writerow([f"./imgs/{name}.png", c, label or ""])
    # folder: image + .txt (one caption per line) + .json sidecar
    folder = root / "folder"
    folder.mkdir()
    for name, _, caps, label in SAMPLES:
        shutil.copy(imgs / f"{name}.png", folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("\n".join(caps) + "\n")
        if label:
            (folder / f"{name}.json").write_text(json.dumps({"label": label}))
    # webdataset: two shards
    shards = root / "shards"
    shards.mkdir()
    for s, part in enumerate((SAMPLES[:2], SAMPLES[2:])):
        with wds.TarWriter(str(shards / f"part-{s:03d}.tar")) as tw:
            for name, _, caps, label in part:
                sample = {"__key__": name, "png": blobs[name], "txt": "\n".join(caps)}
                if label:
                    sample["json"] = {"label": label, "source": "test"}
                tw.write(sample)
    return {
        "jsonl": str(root / "data.jsonl"),
        "csv": str(root / "data.csv"),
        "tsv": str(root / "data.tsv"),
        "folder": str(folder),
        "wds_pattern": str(shards / "part-{000..001}.tar"),
        "wds_dir": str(shards),
    }


def _normalised(source: str) -> dict:
    data = load_dataset(source, 24, use_cache=False, progress=False)
    out = {}
    for i, key in enumerate(data.keys):
        out[Path(key).stem] = (data.captions[i], data.labels[i], data.images[i].clone())
    return out


def test_every_reader_yields_the_same_samples(tmp_path):
    sources = _write_all_formats(tmp_path)
    ref = _normalised(sources["jsonl"])
    assert sorted(ref) == [s[0] for s in SAMPLES]
    for name, _, caps, label in SAMPLES:
        assert ref[name][0] == caps and ref[name][1] == label
        assert ref[name][2].shape == (3, 24, 24) and ref[name][2].dtype == torch.uint8
    for kind, source in sources.items():
        got = _normalised(source)
        assert sorted(got) == sorted(ref), kind
        for key, (caps, label, pix) in ref.items():
            assert got[key][0] == caps, (kind, key)
            assert got[key][1] == label, (kind, key)
            assert torch.equal(got[key][2], pix), (kind, key)


def test_single_tar_and_keys(tmp_path):
    sources = _write_all_formats(tmp_path)
    recs = read_records(Path(sources["wds_dir"]) / "part-000.tar")
    assert [r.key for r in recs] == ["a", "b"]
    assert isinstance(recs[0].image, bytes) and recs[0].extra == {"source": "test"}
    recs = read_records(sources["csv"])
    assert [r.key for r in recs] == ["imgs/a.png", "imgs/b.png", "imgs/c.png", "imgs/d.png"]  # ./ normalised
    assert Path(recs[0].image).is_absolute() and Path(recs[0].image).is_file()


def test_bad_captions_are_rejected_and_counted(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    rows = [
        {"image": "x.png", "caption": ["ok one", "", "   ", 5, None, "ok two"]},
        {"image": "y.png", "caption": ""},  # no valid caption: dropped (before the file check)
        {"image": "x.png", "caption": {"text": "a dict"}},
        {"image": "z.png", "caption": "fine but the file is missing"},
        {"image": "x.png"},  # no caption field at all
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    stats = DataStats()
    recs = read_records(tmp_path / "m.jsonl", stats=stats)
    assert len(recs) == 1 and recs[0].captions == ["ok one", "ok two"]
    assert stats.as_dict() == {"empty_caption": 3, "non_text_caption": 3, "no_valid_caption": 2,
                               "missing_image": 1, "missing_caption": 1}
    assert stats.total() == 10
    assert "3 empty_caption" in stats.summary() and DataStats().summary() == ""


def test_folder_rejects_empty_txt(tmp_path):
    for name, text in (("a", "cap a\n\nsecond\n"), ("b", "  \n"), ("c", None)):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
        if text is not None:
            (tmp_path / f"{name}.txt").write_text(text)
    stats = DataStats()
    recs = read_records(tmp_path, stats=stats)
    assert [(r.key, r.captions) for r in recs] == [("a.jpg", ["cap a", "second"])]
    assert stats.as_dict() == {"empty_caption": 1, "no_valid_caption": 1, "missing_caption": 1}


@pytest.mark.parametrize("content, line, what", [
    ('{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": \n', 2, "not valid JSON"),
    ('{"image": "a.png", "caption": "x"}\n\n["a.png", "x"]\n', 3, "expected a JSON object"),
    ('{"img": "a.png", "caption": "x"}\n', 1, "--image-key"),
    ('{"image": "a.png", "caption": "x"}\n{"image": "\udcff"}\n', 2, "not UTF-8"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError) as e:
        read_records(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}:") and what in msg and "\n" not in msg


def test_csv_errors_and_keys(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "a.csv").write_text("path,text,cls\nx.png,hello,1\n")
    with pytest.raises(UserError, match="no 'filepath' column.*--image-key"):
        read_records(tmp_path / "a.csv")
    recs = read_records(tmp_path / "a.csv", image_key="path", caption_key="text", label_key="cls")
    assert recs[0].captions == ["hello"] and recs[0].label == "1"
    (tmp_path / "b.csv").write_text('filepath,title\nx.png,"unclosed\n')
    (tmp_path / "c.csv").write_text("filepath,title\nx.png\n")
    for bad in ("b.csv", "c.csv"):
        with pytest.raises(UserError, match=rf"{bad}:2:"):
            read_records(tmp_path / bad)


def test_unknown_or_missing_sources(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown manifest type"):
        read_records(tmp_path / "data.parquet")
    with pytest.raises(UserError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="shard not found"):
        read_records(str(tmp_path / "s-{000..002}.tar"))
    (tmp_path / "broken.tar").write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(UserError, match="broken.tar"):
        read_records(tmp_path / "broken.tar")


def test_duplicate_rows_merge_languages(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    rows = [{"image": "x.png", "caption": "a cat", "lang": "en", "label": "cat"},
            {"image": "x.png", "caption": "eine Katze", "lang": "de", "label": "dog"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = DataStats()
    (rec,) = read_records(tmp_path / "m.jsonl", stats=stats)
    assert rec.captions == ["a cat", "eine Katze"] and rec.label == "cat" and rec.lang is None
    assert rec.extra["caption_langs"] == ["en", "de"]
    assert stats.as_dict() == {"label_conflict": 1}


def test_wds_json_captions_and_cls(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (9, 9), "red").save(buf, "JPEG")
    with wds.TarWriter(str(tmp_path / "s.tar")) as tw:
        tw.write({"__key__": "k1", "jpg": buf.getvalue(), "json": {"caption": ["x", "y"], "lang": "fr"},
                  "cls": b"3"})
        tw.write({"__key__": "k2", "txt": "no image here"})
    stats = DataStats()
    (rec,) = read_records(tmp_path / "s.tar", stats=stats)
    assert (rec.key, rec.captions, rec.label, rec.lang) == ("k1", ["x", "y"], "3", "fr")
    assert stats.as_dict() == {"missing_image": 1}


def test_keep_uncaptioned_keeps_images_without_text(tmp_path):
    """For captioning a collection: images with no caption stay (with none); by default they are skipped."""
    from PIL import Image

    from xmodal.data.records import read_records

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("a caption")
    (tmp_path / "m.jsonl").write_text('{"image": "1.png"}\n{"image": "2.png", "caption": "two"}\n')
    (tmp_path / "m.csv").write_text("filepath\n0.png\n1.png\n")
    assert [(r.key, r.captions) for r in read_records(tmp_path, keep_uncaptioned=True)] == [
        ("0.png", ["a caption"]), ("1.png", []), ("2.png", [])]  # fmt: skip
    assert [r.key for r in read_records(tmp_path)] == ["0.png"]
    assert [r.captions for r in read_records(tmp_path / "m.jsonl", keep_uncaptioned=True)] == [[], ["two"]]
    assert [r.captions for r in read_records(tmp_path / "m.jsonl")] == [["two"]]
    assert [r.captions for r in read_records(tmp_path / "m.csv", keep_uncaptioned=True)] == [[], []]
