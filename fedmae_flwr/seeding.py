"""Every random stream of a run comes from the run's ``seed`` and a name for its purpose.

``derive_seed(seed, "block-init", 2)`` replaces ad-hoc offsets (``seed + 100 + stage``,
``seed * 1_000_003 + round``) that could collide between purposes; ``seeded_global_rng`` lets code
that draws from PyTorch's global RNG (module constructors, timm's initialisers) run seeded
without changing the caller's RNG state.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def derive_seed(seed: int, *purpose: str | int) -> int:
    """A 63-bit seed for ``purpose`` (e.g. ``"client-train", round, partition``) under ``seed``.

    Stable across processes and Python versions (a hash of the text, not Python's ``hash``), and
    distinct purposes give unrelated streams.
    """
    text = "/".join(str(part) for part in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed the global RNG (and ``device``'s, on CUDA) for a block; restore the caller's after.

    Saved and restored by hand: ``torch.random.fork_rng`` with ``device_type='cpu'`` left the CPU
    state zeroed on one PyTorch build (2.11 on a CUDA machine).
    """
    device = torch.device(device)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
