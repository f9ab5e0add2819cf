"""Batched augmentation: a slice of a batch is augmented exactly as inside the whole batch."""

import torch

from xmodal.data.augment import AugmentConfig, augment_images, drop_words


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


def test_drop_words_keeps_at_least_one_word():
    g = torch.Generator().manual_seed(0)
    assert drop_words("a red circle", 0.0, g) == "a red circle"
    for _ in range(20):
        out = drop_words("a red circle", 0.99, g)
        assert out and set(out.split()) <= {"a", "red", "circle"}
