"""MAE pieces on timm's Block/PatchEmbed, the growing (cascade) ViT, and its export to timm."""

from fedmae_flwr.models.cascade import (
    CascadeMAE,
    active_key,
    block_index,
    fresh_block_state,
    fresh_decoder_state,
    initial_state,
    model_from_state,
    prefix_key,
)
from fedmae_flwr.models.export import (
    create_timm_backbone,
    export_backbone,
    load_backbone,
    timm_kwargs,
)
from fedmae_flwr.models.mae import masked_mse_loss, patchify, random_masking, unpatchify

__all__ = [
    "CascadeMAE",
    "active_key",
    "block_index",
    "create_timm_backbone",
    "export_backbone",
    "fresh_block_state",
    "fresh_decoder_state",
    "initial_state",
    "load_backbone",
    "masked_mse_loss",
    "model_from_state",
    "patchify",
    "prefix_key",
    "random_masking",
    "timm_kwargs",
    "unpatchify",
]
