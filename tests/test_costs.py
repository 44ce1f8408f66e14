"""Client training memory: one trainable block costs the same whatever the depth."""

from __future__ import annotations

import torch

from fedmae_flwr.config import resolve_config
from fedmae_flwr.evaluation.costs import saved_activation_bytes, training_state_bytes
from fedmae_flwr.models import CascadeMAE


def test_no_grad_saves_nothing_and_a_linear_saves_its_input():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)
    with torch.no_grad():
        _, frozen = saved_activation_bytes(lambda: layer(x))
    _, trained = saved_activation_bytes(lambda: layer(x))
    assert frozen == 0
    assert trained >= x.numel() * 4  # the input kept for the weight gradient


def test_training_state_counts_adam_only_for_trainable_parameters():
    layer = torch.nn.Linear(10, 10)  # 110 float32 parameters
    assert training_state_bytes(layer) == 110 * 4 * 4
    layer.weight.requires_grad_(False)
    assert training_state_bytes(layer) == 100 * 4 + 10 * 4 * 4


def test_one_block_memory_is_flat_in_depth_and_below_full_depth():
    cfg = resolve_config({"depth": 6, "embed-dim": 64, "num-heads": 2})
    x = torch.randn(32, 1, 28, 28)

    def peak(num_blocks: int, frozen: int) -> int:
        model = CascadeMAE(cfg.model, num_blocks, frozen)
        _, activations = saved_activation_bytes(lambda: model(x)[0])
        trainable_state = training_state_bytes(model) - sum(
            p.numel() * 4 for p in model.parameters() if not p.requires_grad
        )
        return trainable_state + activations

    first, last, full = peak(1, 0), peak(6, 5), peak(6, 0)
    assert abs(last - first) / first < 0.15  # the frozen prefix adds (almost) nothing
    # 5 more trainable blocks (the decoder, on all 49 tokens, is shared by both): ~1.6x here
    assert full > 1.5 * last
