"""MAE building blocks: position table, patchify, random masking, the light decoder, the loss.

Conventions follow facebookresearch/mae: in a mask, 0 is keep and 1 is remove; patches are
flattened as ``(p, p, C)``; the encoder sees only the visible patches.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block
from torch import Tensor, nn


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> Tensor:
    """Fixed 2-D sin-cos position table.

    Returns:
        ``[grid_size**2 (+1), embed_dim]``; with ``cls_token`` a leading zero row, so the class
        token carries no position (as in MAE and timm's exported ``pos_embed``).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of 4 for a 2-D sin-cos table")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w goes first, following MAE's reference

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate(
        [one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], axis=1
    )
    if cls_token:
        table = np.concatenate([np.zeros([1, embed_dim]), table], axis=0)
    return torch.from_numpy(table).float()


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, L, p*p*C]``."""
    n, c, h, w = imgs.shape
    if h != w or h % patch_size:
        raise ValueError(
            f"Images must be square with a side divisible by {patch_size}: got {h}x{w}"
        )
    g = h // patch_size
    x = imgs.reshape(n, c, g, patch_size, g, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, g * g, patch_size * patch_size * c)


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """``[N, L, p*p*C]`` -> ``[N, C, H, W]``; the inverse of :func:`patchify`."""
    n, length, dim = x.shape
    g = round(length**0.5)
    if g * g != length or dim != patch_size * patch_size * channels:
        raise ValueError(
            f"Cannot unpatchify {tuple(x.shape)} with patch {patch_size}, C={channels}"
        )
    x = x.reshape(n, g, g, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * patch_size, g * patch_size)


def random_masking(
    x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by sorting uniform noise.

    Args:
        x: ``[N, L, D]`` patch tokens.

    Returns:
        ``(x_visible [N, L_keep, D], mask [N, L] with 0 keep / 1 remove, ids_restore [N, L])``.
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    # Drawn where the generator lives (a seeded CPU generator also serves CUDA tokens).
    noise_device = generator.device if generator is not None else x.device
    noise = torch.rand(n, length, device=noise_device, generator=generator).to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def masked_mse_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """Mean squared error over masked patches only.

    Args:
        pred: ``[N, L, p*p*C]`` predicted patches.
        target: ``[N, L, p*p*C]`` patchified images.
        mask: ``[N, L]``, 1 on removed patches.
        norm_pix: regress per-patch normalized pixels (MAE's ``norm_pix_loss``).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def vit_block(dim: int, num_heads: int, mlp_ratio: float) -> Block:
    """A timm ViT block set up as in timm's ``VisionTransformer`` (qkv bias, LN eps 1e-6)."""
    return Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)


def init_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAEDecoder(nn.Module):
    """The light decoder: embeds visible tokens, fills in mask tokens, predicts pixels.

    Args:
        embed_dim: encoder width.
        num_patches: L, patches per image.
        patch_dim: ``p*p*C``, pixels per patch.
        decoder_embed_dim / decoder_depth / decoder_num_heads: decoder shape.
    """

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        patch_dim: int,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 1,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        grid = round(num_patches**0.5)
        # Fixed table, rebuilt from the shape: it never travels between server and clients.
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(decoder_embed_dim, grid, True)[None], persistent=False
        )
        self.blocks = nn.ModuleList(
            vit_block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.norm = LayerNorm(decoder_embed_dim)
        self.pred = nn.Linear(decoder_embed_dim, patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_weights)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """``latent [N, 1+L_keep, D]`` (class token first) -> ``[N, L, p*p*C]`` predictions."""
        x = self.embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]
