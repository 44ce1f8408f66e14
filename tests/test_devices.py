"""The ``device`` key: resolved per process, clear errors, and (with a GPU) training there."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fedmae_flwr import client_app
from fedmae_flwr.config import ConfigError, resolve_config
from fedmae_flwr.devices import resolve_device
from fedmae_flwr.models import CascadeMAE, active_key
from fedmae_flwr.models.mae import random_masking

from .conftest import LocalGrid
from .test_client_app import message

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_picks_what_the_process_sees_and_cpu_is_always_allowed():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(ConfigError, match="device='auto' or device='cpu'"):
        resolve_device("cuda")


def test_an_unknown_device_fails_at_config_time_naming_the_choices():
    with pytest.raises(ConfigError, match=re.escape("Allowed: auto | cpu | cuda")):
        resolve_config({"device": "gpu"})


def test_masks_are_drawn_from_the_seeded_generator():
    # Noise is drawn where the generator lives, so a seeded CPU generator also serves CUDA tokens.
    x = torch.zeros(3, 16, 4)
    _, mask_a, _ = random_masking(x, 0.75, torch.Generator().manual_seed(5))
    _, mask_b, _ = random_masking(x, 0.75, torch.Generator().manual_seed(5))
    assert torch.equal(mask_a, mask_b) and mask_a.sum() == 3 * 12


@needs_gpu
def test_a_client_trains_on_the_gpu_and_replies_with_cpu_tensors(tiny_overrides):
    overrides = {**tiny_overrides, "device": "cuda", "crop-scale-min": 0.5,
                 "horizontal-flip": True}  # fmt: skip
    context = LocalGrid(4, overrides).contexts[1000]
    model = CascadeMAE(resolve_config(overrides).model, num_blocks=2)
    reply = client_app.train(message(model, 1, "v1", with_prefix=True), context, overrides)
    arrays, sent = reply.content["arrays"], model.state_dict()
    assert set(arrays) == {k for k in sent if active_key(k, 1)}
    # Flower serialises tensors to bytes; what matters is that CUDA tensors came back whole.
    for key, array in arrays.items():
        values = array.numpy()
        assert values.shape == tuple(sent[key].shape) and np.isfinite(values).all()
    assert any(not np.allclose(arrays[k].numpy(), sent[k].numpy()) for k in arrays)  # trained
    assert reply.content["metrics"]["train-loss"] > 0
