"""resize_center_crop equals open_clip's eval transform; the cache hits, invalidates, survives crashes."""

import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose

from xmodal.data import dataset as D
from xmodal.data import load_dataset, resize_center_crop


@pytest.mark.parametrize("size", [24, 32])
def test_resize_center_crop_equals_open_clip(size):
    oc = open_clip.image_transform(size, is_train=False)
    pre_normalize = Compose(oc.transforms[:-1])
    assert type(oc.transforms[-1]).__name__ == "Normalize"
    rng = np.random.default_rng(size)
    for w, h in [(50, 37), (37, 50), (200, 90), (31, 200), (size, size), (13, 7), (101, 100)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = resize_center_crop(img, size)
        assert ours.dtype == torch.uint8 and ours.shape == (3, size, size)
        assert torch.equal(ours.float() / 255, pre_normalize(img)), (w, h)


def _manifest(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": [f"image {i}", f"number {i}"], "label": str(i % 2),
                     "extra_field": {"i": i}})
    rows.append({"image": "broken.png", "caption": "broken"})
    (folder / "broken.png").write_bytes(b"not a png")
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def test_cache_hit_equals_fresh(tmp_path):
    manifest, cache = _manifest(tmp_path / "d"), tmp_path / "cache"
    fresh = load_dataset(manifest, 16, use_cache=False, progress=False)
    first = load_dataset(manifest, 16, cache_dir=cache, progress=False)
    second = load_dataset(manifest, 16, cache_dir=cache, progress=False)
    assert (fresh.from_cache, first.from_cache, second.from_cache) == (False, False, True)
    assert second.cache_path == first.cache_path and _entries(cache) == [first.cache_path]
    for d in (first, second):
        assert torch.equal(d.images, fresh.images)
        assert (d.captions, d.labels, d.keys, d.langs, d.extras) == (
            fresh.captions, fresh.labels, fresh.keys, fresh.langs, fresh.extras)
        assert d.stats.as_dict() == {"corrupt_image": 1} == fresh.stats.as_dict()
        assert len(d) == 6 and d.image_size == 16 and d.source == str(manifest)
    assert fresh.extras[0] == {"extra_field": {"i": 0}}
    assert second.images.shape == (6, 3, 16, 16) and second.images.dtype == torch.uint8
    second.images[0, 0, 0, 0] += 1  # copy-on-write: never changes the cache file
    third = load_dataset(manifest, 16, cache_dir=cache, progress=False)
    assert third.from_cache and torch.equal(third.images, fresh.images)


def test_cache_invalidation(tmp_path):
    manifest, cache = _manifest(tmp_path / "d"), tmp_path / "cache"
    base = load_dataset(manifest, 16, cache_dir=cache, progress=False)
    assert not load_dataset(manifest, 20, cache_dir=cache, progress=False).from_cache  # other size
    assert load_dataset(manifest, 16, cache_dir=cache, progress=False).from_cache

    img = manifest.parent / "3.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched
    touched = load_dataset(manifest, 16, cache_dir=cache, progress=False)
    assert not touched.from_cache and touched.cache_path != base.cache_path
    assert not base.cache_path.exists()  # the stale entry of this source and size is pruned
    assert len(_entries(cache)) == 2  # this size's new entry + the 20 px one

    Image.new("RGB", (30, 23), (255, 0, 0)).save(img)  # modified content
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    changed = load_dataset(manifest, 16, cache_dir=cache, progress=False)
    assert not changed.from_cache
    assert (changed.images[3] == torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)).all()

    manifest.write_text(manifest.read_text().replace("image 0", "picture 0"))  # manifest edit
    edited = load_dataset(manifest, 16, cache_dir=cache, progress=False)
    assert not edited.from_cache and edited.captions[0] == ["picture 0", "number 0"]


def test_crash_leaves_no_partial_entry(tmp_path, monkeypatch):
    manifest, cache = _manifest(tmp_path / "d"), tmp_path / "cache"
    real, calls = D._decode_one, []

    def dies_midway(job):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(D, "_decode_one", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(manifest, 16, cache_dir=cache, progress=False)
    assert _entries(cache) == []  # no half entry, no temp folder
    monkeypatch.setattr(D, "_decode_one", real)
    data = load_dataset(manifest, 16, cache_dir=cache, progress=False)
    assert not data.from_cache and len(data) == 6
    assert load_dataset(manifest, 16, cache_dir=cache, progress=False).from_cache


def test_default_cache_dir_and_worker_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "env-cache"))
    manifest = _manifest(tmp_path / "d")
    pooled = load_dataset(manifest, 16, workers=2, progress=False)
    assert pooled.cache_path.parent == tmp_path / "env-cache"
    inline = load_dataset(manifest, 16, use_cache=False, progress=False)
    assert torch.equal(pooled.images, inline.images) and pooled.keys == inline.keys
    assert pooled.stats.as_dict() == {"corrupt_image": 1}


def test_nothing_usable_is_a_user_error(tmp_path):
    from xmodal.errors import UserError

    (tmp_path / "bad.png").write_bytes(b"nope")
    (tmp_path / "m.jsonl").write_text('{"image": "bad.png", "caption": "x"}\n')
    with pytest.raises(UserError, match=r"m.jsonl: no usable samples \(skipped: 1 corrupt_image\)"):
        load_dataset(tmp_path / "m.jsonl", 16, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(UserError, match="--image-size"):
        load_dataset(tmp_path / "m.jsonl", 0, progress=False)


def test_auto_workers_decode_big_sets_on_every_core_with_the_same_result(tmp_path, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert D.decode_workers(D.POOL_MIN_RECORDS - 1, D.AUTO_WORKERS) == 0
    assert D.decode_workers(D.POOL_MIN_RECORDS, D.AUTO_WORKERS) == (cores if cores > 1 else 0)
    assert D.decode_workers(10, 3) == 3  # a given count is kept
    monkeypatch.setattr(D, "POOL_MIN_RECORDS", 2)  # the tiny set takes the pool path
    monkeypatch.setattr(D.os, "sched_getaffinity", lambda pid: {0, 1})
    pools, real = [], D.mp.get_context
    monkeypatch.setattr(D.mp, "get_context", lambda method: pools.append(method) or real(method))
    manifest = _manifest(tmp_path / "d")
    auto = load_dataset(manifest, 16, cache_dir=tmp_path / "c", workers=D.AUTO_WORKERS, progress=False)
    assert pools  # decoded in a pool
    inline = load_dataset(manifest, 16, use_cache=False, progress=False)
    assert torch.equal(auto.images, inline.images) and auto.keys == inline.keys
