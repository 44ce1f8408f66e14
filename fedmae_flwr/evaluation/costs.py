"""Client training memory, measured the same way on any device.

Peak training memory of a step = parameters + gradients and AdamW's two moments of the trainable
ones + the activations autograd saves for backward. The activations are measured, not estimated:
a ``saved_tensors_hooks`` context sums the bytes of every distinct storage autograd keeps during
one forward. Under ``torch.no_grad()`` (FedMAE's frozen prefix) autograd saves nothing, so the
number shows what a client really holds, on CPU as on GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def saved_activation_bytes(forward: Callable[[], Tensor]) -> tuple[Tensor, int]:
    """Run ``forward()`` and return its output and the bytes autograd saved for backward."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(seen.values())


def training_state_bytes(model: nn.Module) -> int:
    """All parameters, plus gradient and two AdamW moments for each trainable one."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size() * (4 if p.requires_grad else 1)
    return total
