"""Export the finished encoder as a plain timm ``VisionTransformer`` and load it back.

The model comes as a torch state dict or as a Flower ``ArrayRecord`` (e.g. the ``Result.arrays``
that ``FedMAE.start`` returns); its shapes come from a :class:`~fedmae_flwr.config.ModelConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from flwr.app import ArrayRecord
from safetensors.torch import load_file, save
from torch import Tensor, nn

from fedmae_flwr.atomic import atomic_write_bytes, atomic_write_text
from fedmae_flwr.config import ModelConfig
from fedmae_flwr.models.cascade import STEM_PREFIXES, block_index
from fedmae_flwr.models.mae import sincos_pos_embed_2d

# Any registered ViT works as a base: every shape argument is overridden by the kwargs below.
TIMM_BASE_MODEL = "vit_tiny_patch16_224"

ModelState = Mapping[str, Tensor] | ArrayRecord
"""A cascade's tensors: a torch state dict, or an ArrayRecord with the same keys."""


def _torch_state(state: ModelState) -> Mapping[str, Tensor]:
    """``state`` as torch tensors (an ArrayRecord is converted; a state dict is returned as is)."""
    return state.to_torch_state_dict() if isinstance(state, ArrayRecord) else state


def _depth(state: Mapping[str, Any]) -> int:
    return len({block_index(k) for k in state} - {None})


def timm_kwargs(cfg: ModelConfig, depth: int | None = None) -> dict[str, Any]:
    """kwargs for ``timm.create_model(TIMM_BASE_MODEL, pretrained=False, **kwargs)``.

    ``global_pool='avg', fc_norm=False``: ``model(x)`` returns the final-norm'd patch tokens
    averaged, the features MAE evaluates, with the state-dict keys of a token-pool ViT.
    """
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth if depth is None else depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "num_classes": 0,
        "global_pool": "avg",
        "fc_norm": False,
    }


def timm_state_dict(cfg: ModelConfig, state: ModelState) -> dict[str, Tensor]:
    """The encoder part of a cascade state, in timm's key layout (position table included)."""
    grid = cfg.img_size // cfg.patch_size
    out = {
        k: v.detach().clone().contiguous()
        for k, v in _torch_state(state).items()
        if k.startswith((*STEM_PREFIXES, "norm.")) or block_index(k) is not None
    }
    # CascadeMAE's table is a fixed sin-cos buffer, not a key; a learned one in ``state`` wins.
    if "pos_embed" not in out:
        out["pos_embed"] = sincos_pos_embed_2d(cfg.embed_dim, grid, cls_token=True)[None]
    return out


def create_timm_backbone(cfg: ModelConfig, state: ModelState) -> nn.Module:
    """A timm ViT holding the cascade's encoder (strict load: every key must match)."""
    model = timm.create_model(TIMM_BASE_MODEL, pretrained=False, **timm_kwargs(cfg, _depth(state)))
    model.load_state_dict(timm_state_dict(cfg, state), strict=True)
    return model


def export_backbone(cfg: ModelConfig, state: ModelState, folder: str | Path) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` (timm name and kwargs) into ``folder``.

    Args:
        cfg: the model's shapes.
        state: the cascade (stem, blocks, norm; decoder tensors are left out), e.g.
            ``FedMAE.start(...).arrays`` or a ``CascadeMAE.state_dict()``; its blocks set the
            depth.
        folder: created when missing; :func:`load_backbone` reads it back.

    Returns:
        The path of ``backbone.safetensors``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "backbone.safetensors"
    # Written whole or not at all (a resume rewrites them): the json last, so that a folder with
    # a backbone.json has the weights it describes.
    atomic_write_bytes(weights, save(timm_state_dict(cfg, state)))
    meta = {"model_name": TIMM_BASE_MODEL, "kwargs": timm_kwargs(cfg, _depth(state))}
    atomic_write_text(folder / "backbone.json", json.dumps(meta, indent=2) + "\n")
    return weights


def load_backbone(folder: str | Path) -> nn.Module:
    """Load an exported backbone as a timm model (``pretrained=False``, strict=True)."""
    folder = Path(folder)
    meta = json.loads((folder / "backbone.json").read_text())
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(load_file(str(folder / "backbone.safetensors")), strict=True)
    return model.eval()


__all__ = [
    "TIMM_BASE_MODEL",
    "ModelState",
    "create_timm_backbone",
    "export_backbone",
    "load_backbone",
    "timm_kwargs",
    "timm_state_dict",
]
