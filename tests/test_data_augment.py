"""Batched augmentation: a slice of a batch is augmented exactly as inside the whole batch; RandAugment's
ops equal torchvision's; EDA on captions."""

import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode, RandAugment
from torchvision.transforms.v2 import functional as TF

from xmodal.data.augment import (
    RANDAUGMENT_BINS,
    RANDAUGMENT_OPS,
    AugmentConfig,
    augment_images,
    crop_boxes,
    draw_randaugment,
    drop_words,
    eda,
    randaugment_magnitude,
    randaugment_op,
    random_swap,
    synonym_replace,
)
from xmodal.data.synonyms import SYNONYMS
from xmodal.train.config import TrainConfig


def test_slices_augment_like_the_whole_batch():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(crop_scale=0.5, flip=0.5, color=0.3)
    whole = augment_images(x, cfg, torch.Generator().manual_seed(1))
    part = augment_images(x[2:5], cfg, torch.Generator().manual_seed(1), offset=2, total=6)
    assert torch.allclose(whole[2:5], part, atol=1e-6)
    assert not torch.allclose(whole, x)  # it does change the images
    assert whole.min() >= 0 and whole.max() <= 1


def test_identity_when_off_and_flip_mirrors():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(augment_images(x, AugmentConfig(), torch.Generator()), x)
    flipped = augment_images(x, AugmentConfig(flip=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)


@pytest.mark.parametrize("scale", [0.9, 0.08])
@pytest.mark.parametrize(("height", "width"), [(1000, 1000), (600, 1000)])
def test_crop_boxes_draw_as_torchvision_random_resized_crop(scale, height, width):
    """Crop sizes and centres have the distribution of torchvision's RandomResizedCrop.get_params (two-sample
    KS distance), fallback included: the clamping this replaced stretched most area >= 0.9 crops."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    n = 6000
    torch.manual_seed(0)
    img = torch.empty(3, height, width)
    ref = torch.tensor([RandomResizedCrop.get_params(img, (scale, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    top, left, h, w = ref.double().unbind(1)
    sx, sy, tx, ty = crop_boxes(n, scale, height, width, torch.Generator().manual_seed(1))
    assert (sx <= 1).all() and (sy <= 1).all() and (tx.abs() <= 1 - sx + 1e-6).all()
    pairs = {
        "width": (w / width, sx),
        "height": (h / height, sy),
        "x centre": ((left + w / 2) / width * 2 - 1, tx),
        "y centre": ((top + h / 2) / height * 2 - 1, ty),
    }
    for name, (a, b) in pairs.items():
        a, b = a.numpy().round(3), b.double().numpy().round(3)  # torchvision's crops are whole pixels
        assert ks_2samp(a, b).statistic < 0.04, name
    whole = ((w == width) & (h == height)).double().mean()  # mostly the fallback at area >= 0.9
    assert abs(whole - ((sx > 1 - 1e-3) & (sy > 1 - 1e-3)).double().mean()) < 0.03


def test_drop_words_keeps_at_least_one_word():
    g = torch.Generator().manual_seed(0)
    assert drop_words("a red circle", 0.0, g) == "a red circle"
    for _ in range(20):
        out = drop_words("a red circle", 0.99, g)
        assert out and set(out.split()) <= {"a", "red", "circle"}


# -- RandAugment ------------------------------------------------------------------------------------------
NEAREST = InterpolationMode.NEAREST


def reference_op(img, op, mag):
    """One RandAugment op on one float image, written out by hand from torchvision's RandAugment."""
    if op == "Identity":
        return img
    if op == "ShearX":
        return TF.affine(img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(mag)), 0.0], NEAREST, center=[0, 0])
    if op == "ShearY":
        return TF.affine(img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(mag))], NEAREST, center=[0, 0])
    if op == "TranslateX":
        return TF.affine(img, 0.0, [int(mag), 0], 1.0, [0.0, 0.0], NEAREST)
    if op == "TranslateY":
        return TF.affine(img, 0.0, [0, int(mag)], 1.0, [0.0, 0.0], NEAREST)
    if op == "Rotate":
        return TF.rotate(img, mag, NEAREST)
    return {
        "Brightness": lambda: TF.adjust_brightness(img, 1 + mag),
        "Color": lambda: TF.adjust_saturation(img, 1 + mag),
        "Contrast": lambda: TF.adjust_contrast(img, 1 + mag),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1 + mag),
        "Posterize": lambda: TF.posterize(img, int(mag)),
        "Solarize": lambda: TF.solarize(img, mag),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
    }[op]()


def _images(n, h=20, w=24, seed=0):
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.3  # a flat image: autocontrast/equalize leave it alone
    return x


def test_randaugment_ops_and_magnitudes_are_torchvisions():
    space = getattr(RandAugment, "_AUGMENTATION_SPACE", None)
    assert space is not None, "this torchvision keeps RandAugment's op table elsewhere: update augment.py"
    assert [op for op, _ in RANDAUGMENT_OPS] == list(space)
    for op, signed in RANDAUGMENT_OPS:
        fn, tv_signed = space[op]
        assert signed == tv_signed, op
        mags = fn(RANDAUGMENT_BINS, 20, 24)
        for m in range(RANDAUGMENT_BINS):
            want = 0.0 if mags is None else float(mags[m])
            assert randaugment_magnitude(op, m, 20, 24) == want, (op, m)


@pytest.mark.parametrize("op", [op for op, _ in RANDAUGMENT_OPS])
def test_each_randaugment_op_on_a_batch_equals_torchvision_on_single_images(op):
    x = _images(5)
    for m in (9, 30):
        mag = randaugment_magnitude(op, m, 20, 24)
        for sign in (1.0, -1.0) if dict(RANDAUGMENT_OPS)[op] else (1.0,):
            got = randaugment_op(x, op, sign * mag)
            want = torch.stack([reference_op(img, op, sign * mag) for img in x])
            assert got.shape == x.shape and torch.allclose(got, want, atol=1e-6), (op, m, sign)
            if op != "Identity" and m == 30:
                assert not torch.allclose(got[1:], x[1:]), op  # it does something


def test_randaugment_batch_equals_each_sample_through_its_own_ops():
    """Grouping by (op, sign) gives each row exactly its own op sequence, as a per-image loop would."""
    x = _images(16)
    cfg = AugmentConfig(randaugment_n=3, randaugment_m=15)
    got = augment_images(x, cfg, torch.Generator().manual_seed(4))
    ops, negate = draw_randaugment(3, 16, torch.Generator().manual_seed(4))
    assert len(set(ops.flatten().tolist())) > 8  # the rows do get different ops
    for i in range(16):
        img = x[i]
        for r in range(3):
            op = RANDAUGMENT_OPS[int(ops[r, i])][0]
            mag = randaugment_magnitude(op, 15, 20, 24)
            img = reference_op(img, op, -mag if negate[r, i] else mag)
        assert torch.allclose(got[i], img, atol=1e-5), i
    assert torch.equal(x, _images(16))  # the input is left as it was


def test_randaugment_is_seeded_and_slices_match_the_whole_batch():
    x = _images(12, 16, 16, seed=3)
    cfg = AugmentConfig(crop_scale=0.3, flip=0.5, color=0.4, randaugment_n=2, randaugment_m=12)
    a = augment_images(x, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a, augment_images(x, cfg, torch.Generator().manual_seed(7)))  # same (seed, step)
    assert not torch.allclose(a, augment_images(x, cfg, torch.Generator().manual_seed(8)))
    for lo, hi in [(0, 4), (5, 12), (3, 4)]:
        part = augment_images(x[lo:hi], cfg, torch.Generator().manual_seed(7), offset=lo, total=12)
        assert torch.allclose(a[lo:hi], part, atol=1e-6), (lo, hi)
    assert a.min() >= 0 and a.max() <= 1


def test_randaugment_fields_come_from_the_train_config():
    cfg = TrainConfig(data="d", aug_randaugment_n=2, aug_randaugment_m=5, aug_text_eda=0.1)
    aug = AugmentConfig.from_config(cfg)
    assert (aug.randaugment_n, aug.randaugment_m, aug.text_eda) == (2, 5, 0.1)
    assert aug.images_enabled and not AugmentConfig.from_config(TrainConfig(data="d")).images_enabled


# -- EDA --------------------------------------------------------------------------------------------------
CAPTION = "A man walking his big dog on the beach at sunset."


def test_eda_is_seeded_and_off_at_zero():
    outs = [eda(CAPTION, 0.1, torch.Generator().manual_seed(s)) for s in range(60)]
    assert outs == [eda(CAPTION, 0.1, torch.Generator().manual_seed(s)) for s in range(60)]
    assert eda(CAPTION, 0.0, torch.Generator()) == CAPTION
    assert len(set(outs)) > 10


def test_eda_ops_swap_replace_and_delete():
    words = CAPTION.split()
    seen = {"swap": 0, "synonym": 0, "delete": 0}
    for s in range(300):
        out = eda(CAPTION, 0.1, torch.Generator().manual_seed(s)).split()
        if len(out) < len(words):
            seen["delete"] += 1
            assert out and all(w in words for w in out)
        elif sorted(out) == sorted(words):
            seen["swap"] += out != words
        else:
            seen["synonym"] += 1
            changed = [(a, b) for a, b in zip(words, out, strict=True) if a != b]
            assert len(changed) == 1  # n = max(1, ⌊0.1·11⌋) = 1 word
            (a, b), core = changed[0], changed[0][0].strip(".").lower()
            assert b.strip(".").lower() in SYNONYMS[core] and b.endswith(".") == a.endswith(".")
    # picked with CLIP🚀's weights 0.4 / 0.4 / 0.2 (a deletion may also delete nothing)
    assert seen["swap"] > 80 and seen["synonym"] > 80 and 20 < seen["delete"] < 90, seen


def test_synonym_replace_keeps_case_and_punctuation_and_replaces_every_occurrence():
    out = synonym_replace(["Dog,", "dog", "runs."], 1, torch.Generator().manual_seed(0))
    assert out[0][0].isupper() and out[0].endswith(",") and out[2] == "runs."
    assert out[0][:-1].lower() == out[1] and out[1] in SYNONYMS["dog"]
    assert synonym_replace(["xyzzy", "plugh"], 3, torch.Generator()) == ["xyzzy", "plugh"]
    assert random_swap(["one"], 2, torch.Generator()) == ["one"]
    assert sorted(random_swap(["a", "b", "c"], 5, torch.Generator().manual_seed(1))) == ["a", "b", "c"]


def test_synonym_table_is_lowercase_symmetric_and_never_maps_a_word_to_itself():
    assert len(SYNONYMS) > 200
    for word, others in SYNONYMS.items():
        assert word == word.lower() and others and word not in others, word
        for o in others:
            assert word in SYNONYMS[o], (word, o)
    for kept_out in ("red", "blue", "left", "right", "two", "circle", "square"):
        assert kept_out not in SYNONYMS
