"""Which torch device a process computes on, from the ``device`` config key."""

from __future__ import annotations

import torch

from fedmae_flwr.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``; ``cpu``/``cuda`` as given.

    Resolved per process (each SuperNode and the ServerApp decide for themselves), so one run
    config serves a mix of GPU and CPU machines under ``auto``.

    Raises:
        ConfigError: ``cuda`` where torch sees no GPU, or a name that is none of the three.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device='cuda' but torch sees no GPU in this process "
                f"(torch {torch.__version__}); use device='auto' or device='cpu'"
            )
        return torch.device("cuda")
    raise ConfigError(f"Invalid value for 'device': {name!r}. Allowed: auto | cpu | cuda")
