"""MAE pieces, the cascade's trainable/frozen split, and the export to timm."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from fedmae_flwr.config import resolve_config
from fedmae_flwr.models import (
    CascadeMAE,
    active_key,
    create_timm_backbone,
    export_backbone,
    fresh_block_state,
    initial_state,
    load_backbone,
    masked_mse_loss,
    model_from_state,
    patchify,
    prefix_key,
    random_masking,
    unpatchify,
)
from fedmae_flwr.models.mae import sincos_pos_embed_2d

SMALL = {"embed-dim": 32, "num-heads": 2, "decoder-embed-dim": 16, "decoder-num-heads": 2}


@pytest.fixture
def cfg():
    return resolve_config({**SMALL, "depth": 3})


def test_patchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 8, 8)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 4, 4 * 4 * 3)
    # patch 1 is the top-right 4x4 block, flattened as (p, p, C)
    assert torch.equal(patches[0, 1], imgs[0, :, :4, 4:].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4, 3), imgs)


def test_random_masking_keeps_the_right_count_and_restores_order():
    x = torch.arange(2 * 16, dtype=torch.float).reshape(2, 16, 1)
    visible, mask, ids_restore = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert visible.shape == (2, 4, 1)
    assert mask.sum(1).tolist() == [12.0, 12.0]
    for n in range(2):  # the visible tokens are exactly those with mask 0
        assert sorted(visible[n, :, 0].tolist()) == x[n, mask[n] == 0, 0].tolist()
    assert not torch.equal(mask[0], mask[1])  # per-sample masks
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(16).expand(2, -1))


def test_loss_counts_masked_patches_only():
    target = torch.zeros(1, 4, 3)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    pred = torch.zeros(1, 4, 3)
    pred[0, 1] = 100.0  # a visible patch: must not count
    assert masked_mse_loss(pred, target, mask).item() == 0.0
    pred[0, 0] = 2.0  # a masked patch: (4 + 0) / 2 masked patches
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx(2.0)


def test_norm_pix_target_is_per_patch_standardised():
    target = torch.tensor([[[1.0, 3.0]]])
    mask = torch.ones(1, 1)
    # unbiased variance of (1, 3) is 2, as in MAE (torch.var default)
    std_target = torch.tensor([[[-1.0, 1.0]]]) / (2.0 + 1e-6) ** 0.5
    assert masked_mse_loss(std_target, target, mask, norm_pix=True).item() == pytest.approx(
        0, abs=1e-9
    )


def test_sincos_table_has_a_zero_class_row_and_distinct_positions():
    table = sincos_pos_embed_2d(16, 4, cls_token=True)
    assert table.shape == (17, 16)
    assert torch.all(table[0] == 0)
    assert torch.unique(table[1:], dim=0).shape[0] == 16


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_active_and_prefix_keys_split_each_stage_model(cfg, stage):
    state = CascadeMAE(cfg.model, num_blocks=stage + 1).state_dict()
    active = {k for k in state if active_key(k, stage)}
    prefix = {k for k in state if prefix_key(k, stage)}
    assert active | prefix == set(state) and not active & prefix
    assert any(k.startswith(f"blocks.{stage}.") for k in active)
    assert ("patch_embed.proj.weight" in active) == (stage == 0)
    assert all(k.startswith(("patch_embed", "cls_token", "blocks.")) for k in prefix)


def test_frozen_prefix_gets_no_gradient(cfg):
    model = CascadeMAE(cfg.model, num_blocks=3)
    loss, _, _ = model(torch.randn(4, 1, 28, 28))
    loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == active_key(name, 2), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if active_key(n, 2)}


def test_model_from_state_rejects_gaps(cfg):
    state = initial_state(cfg.model, 0)
    state.update(fresh_block_state(cfg.model, 2, 0))
    with pytest.raises(ValueError, match="contiguously"):
        model_from_state(cfg.model, state)


def test_model_from_state_names_a_learned_pos_embed(cfg):
    """The key contract allows pos_embed (a foreign model's learned table); this cascade's
    table is fixed, and loading failed with a bare 'Unexpected key(s) in state_dict'."""
    state = initial_state(cfg.model, 0)
    state["pos_embed"] = torch.zeros(1, cfg.model.num_patches + 1, cfg.model.embed_dim)
    with pytest.raises(ValueError, match="pos_embed: this cascade's position table is MAE's"):
        model_from_state(cfg.model, state)


def test_export_loads_in_timm_strictly_and_matches_features(cfg, tmp_path):
    model = CascadeMAE(cfg.model, num_blocks=3).eval()
    export_backbone(cfg.model, model.state_dict(), tmp_path)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["kwargs"]["depth"] == 3
    timm_model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
    from safetensors.torch import load_file

    timm_model.load_state_dict(load_file(tmp_path / "backbone.safetensors"), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = timm_model.eval().forward_features(x)
        pooled = load_backbone(tmp_path)(x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(pooled, ours[:, 1:].mean(1), atol=1e-6)
    assert pooled.shape == (2, 32)
    assert create_timm_backbone(cfg.model, model.state_dict()).num_features == 32
