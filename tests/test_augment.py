"""MAE's pretraining augmentations on tensors."""

from __future__ import annotations

import torch

from fedmae_flwr.data.augment import mae_augment, random_horizontal_flip, random_resized_crop


def test_full_scale_square_crop_is_the_identity():
    x = torch.rand(3, 2, 8, 8)
    out = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-5)


def test_crops_keep_shape_vary_per_image_and_are_seeded():
    x = torch.arange(64, dtype=torch.float).view(1, 1, 8, 8).repeat(4, 1, 1, 1)
    a = random_resized_crop(x, (0.2, 0.5), generator=torch.Generator().manual_seed(0))
    b = random_resized_crop(x, (0.2, 0.5), generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    constant = torch.full((2, 3, 8, 8), 0.5)
    assert torch.allclose(random_resized_crop(constant, (0.2, 0.5)), constant, atol=1e-5)


def test_flip_mirrors_about_half_the_images():
    x = torch.arange(4, dtype=torch.float).view(1, 1, 1, 4).repeat(200, 1, 1, 1)
    out = random_horizontal_flip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 3).sum().item()
    assert 70 < flipped < 130
    assert all(torch.equal(o, x[0]) or torch.equal(o, x[0].flip(-1)) for o in out)


def test_disabled_augmentation_returns_the_batch():
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(mae_augment(x, crop_scale_min=1.0, flip=False), x)
