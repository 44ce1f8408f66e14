"""Evaluation utilities: hand-checked numbers on tiny synthetic data (CPU, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from fedmae_flwr.evaluation import (
    FinetuneResult,
    ProbeResult,
    extract_features,
    finetune,
    knn_accuracy,
    linear_probe,
    masked_psnr,
    mean_fill_baseline,
    save_reconstruction_grid,
    tuned_linear_probe,
)
from fedmae_flwr.evaluation.finetune import HEAD_NORMS, _random_crop_flip, finetuned_model

torch.set_num_threads(2)


# ---------------------------------------------------------------- helpers


def blobs(
    n_per_class: int, num_classes: int, dim: int, seed: int, spread: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs with unit noise around class centres ``spread`` apart on the axes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(num_classes, dim)
    centres[torch.arange(num_classes), torch.arange(num_classes)] = spread
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 one-channel images; class c in 0..3 = which 4x4 quadrant is bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 1.0
    return x, y


def half_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 one-channel images; class 0 = top half bright, 1 = bottom half (flip-invariant)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 4 * c : 4 * c + 4, :] += 1.0
    return x, y


def tiny_backbone(dim: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, dim), nn.GELU())


# ---------------------------------------------------------------- masked_psnr


def test_masked_psnr_identical_is_inf():
    x = torch.rand(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    assert masked_psnr(x, x.clone(), mask) == math.inf


def test_masked_psnr_known_offset_is_20db_and_ignores_visible_errors():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 0, :] = 1  # 4 pixels in image 0
    mask[1, 0, 1:3, 1:3] = 1  # 4 pixels in image 1
    pred = target + 0.1 * mask.double()  # offset 0.1 on every masked value, all channels
    # MSE = 0.01 -> 10 * log10(1 / 0.01) = 20 dB.
    assert masked_psnr(pred, target, mask) == pytest.approx(20.0, abs=1e-9)
    # Large errors on visible pixels only must not change the result.
    noisy = pred + 5.0 * (1 - mask) * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    assert masked_psnr(noisy, target, mask.bool()) == pytest.approx(20.0, abs=1e-9)
    # data_range scales the peak: range 2 adds 20 * log10(2) dB.
    assert masked_psnr(pred, target, mask, data_range=2.0) == pytest.approx(
        20.0 + 20 * math.log10(2), abs=1e-9
    )
    # float32 inputs give the same number up to float32 rounding of the offset.
    assert masked_psnr(pred.float(), target.float(), mask) == pytest.approx(20.0, abs=1e-4)


def test_masked_psnr_rejects_bad_inputs():
    x = torch.rand(2, 3, 4, 4)
    mask = torch.ones(2, 1, 4, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        masked_psnr(x, torch.rand(2, 3, 4, 5), mask)
    with pytest.raises(ValueError, match="pixel_mask"):
        masked_psnr(x, x, torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="no pixel"):
        masked_psnr(x, x, torch.zeros(2, 1, 4, 4))


# ---------------------------------------------------------------- mean_fill_baseline


def test_mean_fill_single_pixel():
    image = torch.tensor([[[[1.0, 2.0], [3.0, 10.0]]]])  # [1, 1, 2, 2]
    mask = torch.tensor([[[[False, False], [False, True]]]])
    out = mean_fill_baseline(image, mask)
    expected = torch.tensor([[[[1.0, 2.0], [3.0, 2.0]]]])  # (1 + 2 + 3) / 3 = 2
    assert torch.equal(out, expected)
    assert image[0, 0, 1, 1] == 10.0  # input not modified in place


def test_mean_fill_per_channel_and_per_image():
    images = torch.zeros(2, 3, 2, 2)
    for c in range(3):
        images[0, c] = torch.tensor([[1.0, 2.0], [3.0, 99.0]]) * (c + 1)
        images[1, c] = torch.tensor([[5.0, 7.0], [-1.0, -1.0]]) + c
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 1, 1] = 1
    mask[1, 0, 1, :] = 1
    out = mean_fill_baseline(images, mask)
    for c in range(3):
        assert out[0, c, 1, 1] == pytest.approx(2.0 * (c + 1))
        assert torch.equal(out[0, c, 0], images[0, c, 0])
        assert out[0, c, 1, 0] == images[0, c, 1, 0]
        assert torch.allclose(out[1, c, 1], torch.full((2,), 6.0 + c))
        assert torch.equal(out[1, c, 0], images[1, c, 0])


def test_mean_fill_rejects_fully_masked_image():
    with pytest.raises(ValueError, match="no visible pixel"):
        mean_fill_baseline(torch.rand(2, 1, 2, 2), torch.ones(2, 1, 2, 2))


# ---------------------------------------------------------------- extract_features


def test_extract_features_batched_restores_mode():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Dropout(0.5))
    backbone.train()
    images = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    feats = extract_features(backbone, images, batch_size=3)
    assert feats.shape == (10, 5) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert backbone.training  # previous mode restored
    with torch.no_grad():
        expected = backbone.eval()(images.float())
    assert torch.allclose(feats, expected)  # eval mode: dropout off, batching invisible
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        extract_features(nn.Identity(), images)


# ---------------------------------------------------------------- linear_probe / kNN


def test_linear_probe_separable_badly_scaled():
    train_x, train_y = blobs(100, 4, 8, seed=0)
    test_x, test_y = blobs(50, 4, 8, seed=1)
    # Huge offset and scale: plain SGD on these would blow up; the affine-free BN absorbs them.
    train_x, test_x = train_x * 1000 + 500, test_x * 1000 + 500
    rng_before = torch.random.get_rng_state()
    result = linear_probe(train_x, train_y, test_x, test_y, 4, epochs=30, batch_size=64)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert isinstance(result, ProbeResult)
    assert result.accuracy >= 0.99
    assert result.train_accuracy >= 0.99
    assert result.epochs == 30
    assert math.isfinite(result.final_loss) and result.final_loss < 0.1

    again = linear_probe(train_x, train_y, test_x, test_y, 4, epochs=30, batch_size=64)
    assert again == result  # bit-identical for the same seed


def test_linear_probe_random_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(800, 8, generator=g), torch.randn(1000, 8, generator=g)
    train_y = torch.randint(0, 4, (800,), generator=g)
    test_y = torch.randint(0, 4, (1000,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, 4, epochs=20, batch_size=128)
    # Chance is 0.25; the std of the accuracy of 1000 guesses is ~0.014.
    assert abs(result.accuracy - 0.25) < 0.06
    assert result.train_accuracy < 0.5  # 8 dims cannot memorize 800 random labels


def test_linear_probe_final_loss_is_the_eval_mode_training_loss_on_overlapping_classes():
    # Overlapping blobs: train accuracy stays < 1 and the loss well above 0.
    train_x, train_y = blobs(100, 3, 4, seed=0, spread=2.0)
    test_x, test_y = blobs(100, 3, 4, seed=1, spread=2.0)
    done = linear_probe(train_x, train_y, test_x, test_y, 3, epochs=20, batch_size=64)
    assert done.train_accuracy < 1.0
    assert done.accuracy > 0.7  # Bayes accuracy here is about 0.84
    # A learning rate too small to move the head leaves the training loss near log(3).
    stuck = linear_probe(train_x, train_y, test_x, test_y, 3, epochs=20, lr=1e-5, batch_size=64)
    assert stuck.final_loss > done.final_loss + 0.3
    assert abs(stuck.final_loss - math.log(3)) < 0.05


def test_tuned_probe_keeps_the_lr_validation_picks_and_never_looks_at_the_test_labels():
    train_x, train_y = blobs(100, 3, 4, seed=0, spread=2.0)
    test_x, test_y = blobs(100, 3, 4, seed=1, spread=2.0)
    lrs = (1e-4, 1e-2, 0.3)
    tuned = tuned_linear_probe(train_x, train_y, test_x, test_y, 3, 10, lrs, 0.25, seed=3)
    assert set(tuned.val_accuracy) == {"0.0001", "0.01", "0.3"}
    assert tuned.lr == max(lrs, key=lambda lr: tuned.val_accuracy[repr(lr)])
    assert tuned.val_accuracy["0.0001"] < tuned.val_accuracy[repr(tuned.lr)]  # a real choice
    # the kept probe is the plain probe at that lr on all the training features
    plain = linear_probe(train_x, train_y, test_x, test_y, 3, 10, lr=tuned.lr, seed=3)
    assert (tuned.accuracy, tuned.final_loss) == (plain.accuracy, plain.final_loss)
    # shuffled test labels change the test score only, never the choice
    shuffled = test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))]
    blind = tuned_linear_probe(train_x, train_y, test_x, shuffled, 3, 10, lrs, 0.25, seed=3)
    assert (blind.lr, blind.val_accuracy) == (tuned.lr, tuned.val_accuracy)
    assert blind.accuracy < tuned.accuracy
    # one lr: the plain probe, no validation share
    single = tuned_linear_probe(train_x, train_y, test_x, test_y, 3, 10, (0.1,), 0.25, seed=3)
    assert single == linear_probe(train_x, train_y, test_x, test_y, 3, 10, lr=0.1, seed=3)
    assert single.val_accuracy == {}


def test_linear_probe_input_checks():
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="lengths must match"):
        linear_probe(x, y[:9], x, y, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        linear_probe(x, y, x, y + 3, 3)
    with pytest.raises(ValueError, match="feature dims differ"):
        linear_probe(x, y, x[:, :2], y, 3)
    with pytest.raises(ValueError, match="integer"):
        linear_probe(x, y.float(), x, y, 3)
    with pytest.raises(ValueError, match="lengths must match"):
        knn_accuracy(x, y, x, y[:3], 3)


def test_knn_separable_blobs():
    train_x, train_y = blobs(100, 5, 16, seed=0)
    test_x, test_y = blobs(40, 5, 16, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, 5) == 1.0
    # k larger than the training set is capped; a single neighbour still works.
    assert knn_accuracy(train_x[:10], train_y[:10], test_x, test_y, 5, k=50) >= 0.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, 5, k=1) == 1.0


def test_knn_weighting_hand_checked():
    # Test point at angle 0; two class-1 neighbours at 60 degrees (cos 0.5) and one class-0
    # neighbour at 0 degrees (cos 1). With T = 0.07: exp(1/0.07) > 2 * exp(0.5/0.07) -> class 0.
    # With T = 10 the weights are almost equal and the majority (class 1) wins.
    train_x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.5, -math.sqrt(3) / 2]])
    train_y = torch.tensor([0, 1, 1])
    test_x, test_y = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
    assert knn_accuracy(train_x, train_y, test_x, test_y, 2, k=3) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, 2, k=3, temperature=10.0) == 0.0


# ---------------------------------------------------------------- finetune


def test_random_crop_flip():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16) + 1.0
    images = images.repeat(64, 1, 1, 1)  # 128 samples
    out = _random_crop_flip(images, g)
    assert out.shape == images.shape
    again = _random_crop_flip(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # pad = 16 // 8 = 2: every output is the input shifted by at most 2 px, maybe mirrored,
    # with the uncovered border zero.
    shifts_seen, flips_seen = set(), set()
    for img, src in zip(out[:, 0], images[:, 0], strict=True):
        padded = nn.functional.pad(src, (2, 2, 2, 2))
        crops = {(dy, dx): padded[dy : dy + 16, dx : dx + 16] for dy in range(5) for dx in range(5)}
        matches = [
            (dy, dx, flip)
            for (dy, dx), crop in crops.items()
            for flip in (False, True)
            if torch.equal(img, crop.flip(-1) if flip else crop)
        ]
        assert len(matches) == 1
        shifts_seen.add(matches[0][:2])
        flips_seen.add(matches[0][2])
    assert len(shifts_seen) > 15 and flips_seen == {False, True}


def test_finetune_quadrants_and_backbone_untouched():
    train_x, train_y = quadrant_images(512, seed=0)
    test_x, test_y = quadrant_images(256, seed=1)
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = finetune(
        backbone, 16, train_x, train_y, test_x, test_y, 4, epochs=8, lr=1e-2, augment=False
    )
    assert isinstance(result, FinetuneResult)
    assert result.accuracy >= 0.95
    assert result.train_accuracy >= 0.95
    assert result.epochs == 8 and math.isfinite(result.final_loss)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert backbone.training  # mode untouched too


def test_finetune_with_augmentation_is_deterministic():
    train_x, train_y = half_images(256, seed=0)
    test_x, test_y = half_images(128, seed=1)
    kwargs = dict(num_classes=2, epochs=6, lr=1e-2, batch_size=32, augment=True, seed=3)
    rng_before = torch.random.get_rng_state()
    first = finetune(tiny_backbone(), 16, train_x, train_y, test_x, test_y, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    second = finetune(tiny_backbone(), 16, train_x, train_y, test_x, test_y, **kwargs)
    assert first == second
    assert first.accuracy >= 0.95


def test_finetune_rejects_wrong_feature_dim():
    x, y = quadrant_images(16, seed=0)
    with pytest.raises(ValueError, match="feature_dim=8"):
        finetune(tiny_backbone(16), 8, x, y, x, y, num_classes=4, epochs=1)


@pytest.mark.parametrize("kind", HEAD_NORMS)
def test_finetune_learns_with_every_head_norm(kind):
    train_x, train_y = quadrant_images(512, seed=0)
    test_x, test_y = quadrant_images(256, seed=1)
    result = finetune(tiny_backbone(), 16, train_x, train_y, test_x, test_y, 4, epochs=8,
                      lr=1e-2, augment=False, head_norm=kind)  # fmt: skip
    assert result.accuracy >= 0.95 and result.train_accuracy >= 0.95


def test_the_head_norm_sits_between_backbone_and_head():
    x, y = quadrant_images(64, seed=0)
    kwargs = dict(num_classes=4, epochs=1, lr=1e-3, batch_size=32, weight_decay=0.05,
                  augment=False, seed=0, device="cpu", label_smoothing=0.0,
                  warmup_fraction=0.0, layer_decay=1.0)  # fmt: skip
    model, _ = finetuned_model(tiny_backbone(), 16, x, y, head_norm="batchnorm", **kwargs)
    assert isinstance(model.norm, nn.BatchNorm1d) and not model.norm.affine
    assert model.norm.running_mean.abs().sum() > 0  # it saw the training features
    model, _ = finetuned_model(tiny_backbone(), 16, x, y, head_norm="none", **kwargs)
    assert isinstance(model.norm, nn.Identity)
    # Under layer decay the LayerNorm's scale and shift are trained (in a group) too.
    model, _ = finetuned_model(tiny_backbone(), 16, x, y, head_norm="layernorm",
                               **{**kwargs, "layer_decay": 0.75})  # fmt: skip
    assert not torch.equal(model.norm.weight, torch.ones(16))


def test_finetune_rejects_an_unknown_head_norm_before_training():
    x, y = quadrant_images(16, seed=0)
    with pytest.raises(ValueError, match="head_norm must be one of batchnorm, layernorm, none"):
        finetune(tiny_backbone(16), 16, x, y, x, y, num_classes=4, epochs=1, head_norm="bn")


# ---------------------------------------------------------------- save_reconstruction_grid


@pytest.mark.parametrize("channels", [1, 3])
def test_save_reconstruction_grid_png(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    originals = torch.rand(3, channels, 8, 8, generator=g)
    masked = originals.clone()
    masked[:, :, :4] = 0.5
    recon = (originals + 0.2 * torch.randn(3, channels, 8, 8, generator=g)).clamp(0, 1)
    path = tmp_path / "nested" / "dir" / f"grid_c{channels}.png"
    save_reconstruction_grid(path, originals, masked, recon, title="stage 2, round 5")
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_save_reconstruction_grid_single_row_and_bad_shapes(tmp_path):
    one = torch.rand(1, 1, 8, 8)
    save_reconstruction_grid(str(tmp_path / "one.png"), one, one, one)
    assert (tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="same shape"):
        save_reconstruction_grid(tmp_path / "bad.png", one, one, torch.rand(1, 1, 8, 9))
    two = torch.rand(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"C in \{1, 3\}"):
        save_reconstruction_grid(tmp_path / "bad.png", two, two, two)


def test_labelled_subsets_are_capped_at_what_the_source_has():
    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.data.images import DatasetSplits, ImageSet
    from fedmae_flwr.evaluation.downstream import labelled_subsets

    def image_set(n: int) -> ImageSet:
        return ImageSet(
            torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)
        )

    splits = DatasetSplits(image_set(50), image_set(30), (0.5,), (0.5,), num_classes=2)
    cfg = resolve_config({"probe-train-images": 400, "finetune-labels": 100, "test-images": 200})
    sizes = {k: len(v) for k, v in labelled_subsets(cfg.eval, splits, cfg.seed).items()}
    assert sizes == {"probe": 50, "finetune": 50, "test": 30}


def test_layer_decay_scales_each_block_by_its_distance_from_the_head():
    import timm
    from torch import nn

    from fedmae_flwr.evaluation.finetune import _Classifier, _param_groups

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4,
                            embed_dim=8, depth=2, num_heads=2, num_classes=0)  # fmt: skip
    model = _Classifier(vit, nn.Linear(8, 3))
    groups = _param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    # timm's convention, 2 blocks: stem 0.5^2, block 0 0.5^1, block 1, final norm and head 1
    assert scale[id(vit.patch_embed.proj.weight)] == 0.25
    assert scale[id(vit.blocks[0].attn.qkv.weight)] == 0.5
    assert scale[id(vit.blocks[1].mlp.fc1.weight)] == 1.0
    assert scale[id(vit.norm.weight)] == 1.0 and scale[id(model.head.weight)] == 1.0
    assert len(scale) == len(list(model.parameters()))  # every parameter in exactly one group
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(vit.blocks[0].attn.qkv.bias) not in decayed and id(model.head.weight) in decayed
