"""The growing ViT: a patch embedding, finished (frozen) blocks, one active block, and a decoder.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.*``, ``cls_token``,
``blocks.<i>.*``, ``norm.*``) so the encoder exports to timm by selecting keys; the decoder lives
under ``decoder.*``. Which names are trained and which are a frozen prefix in stage ``s`` is
defined once here (:func:`active_key`, :func:`prefix_key`) and shared by client and strategy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from timm.layers import LayerNorm, PatchEmbed
from torch import Tensor, nn

from fedmae_flwr.config import ModelConfig
from fedmae_flwr.models.mae import (
    MAEDecoder,
    init_weights,
    masked_mse_loss,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    vit_block,
)
from fedmae_flwr.seeding import seeded_global_rng

# The stem: trained in stage 0, part of the frozen prefix after. ``pos_embed`` is a learned
# position table (a plain timm ViT has one); CascadeMAE's own is a fixed sin-cos buffer, not a key.
STEM_PREFIXES = ("patch_embed.", "cls_token", "pos_embed")
# The parameter names a FedMAE model may hold; any other name would never be sent nor trained.
KEY_CONTRACT = "patch_embed.*, pos_embed, cls_token, blocks.<i>.*, norm.*, decoder.*"
_CONTRACT = re.compile(r"patch_embed\..+|pos_embed|cls_token|blocks\.\d+\..+|norm\..+|decoder\..+")


_NO_POS_EMBED = (
    "pos_embed: this cascade's position table is MAE's fixed 2-D sin-cos one, not a learned "
    "tensor; leave pos_embed out of the model sent to these nodes"
)


def check_model_keys(keys: Iterable[str]) -> None:
    """Raise ValueError naming the parameter names outside :data:`KEY_CONTRACT`, if any."""
    unknown = sorted(k for k in keys if not _CONTRACT.fullmatch(k))
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (+{len(unknown) - 10} more)" if unknown[10:] else "")
        raise ValueError(
            f"FedMAE: the model has parameter names outside the contract: {shown}. A FedMAE "
            f"model holds only {KEY_CONTRACT} (timm VisionTransformer names, the MAE decoder "
            "under decoder.*); any other tensor would never be sent nor trained. Drop or "
            "rename those keys (e.g. a classifier head: num_classes=0)."
        )


def block_index(key: str) -> int | None:
    """The block a parameter name belongs to (``blocks.3.attn...`` -> 3), else None."""
    if key.startswith("blocks."):
        return int(key.split(".")[1])
    return None


def active_key(key: str, frozen_blocks: int) -> bool:
    """Whether a parameter is trained (and exchanged every round) with ``frozen_blocks`` frozen.

    In FedMAE's stage ``s`` the first ``s`` blocks are frozen, so this is the active block, the
    final norm and the decoder, plus the stem (patch embedding, class token, a learned position
    table if the model has one) in stage 0 only.
    With 0 frozen blocks and the whole depth present (``fedavg-mae``) everything trains.
    """
    if key.startswith(("norm.", "decoder.")):
        return True
    if key.startswith(STEM_PREFIXES):
        return frozen_blocks == 0
    index = block_index(key)
    return index is not None and index >= frozen_blocks


def prefix_key(key: str, frozen_blocks: int) -> bool:
    """Whether a parameter belongs to the frozen prefix (stem + the first ``frozen_blocks``)."""
    if frozen_blocks == 0:
        return False
    if key.startswith(STEM_PREFIXES):
        return True
    index = block_index(key)
    return index is not None and index < frozen_blocks


def build_decoder(cfg: ModelConfig) -> MAEDecoder:
    return MAEDecoder(
        cfg.embed_dim,
        cfg.num_patches,
        cfg.patch_size**2 * cfg.in_chans,
        cfg.decoder_embed_dim,
        cfg.decoder_depth,
        cfg.decoder_num_heads,
        cfg.mlp_ratio,
    )


class CascadeMAE(nn.Module):
    """A one-block-at-a-time MAE: ``num_blocks`` encoder blocks of which only the last trains.

    Args:
        cfg: the model section (shapes, mask ratio, norm-pix).
        num_blocks: encoder blocks present (``stage + 1`` in FedMAE).
        frozen_blocks: blocks (and, when > 0, the stem) frozen and run under ``torch.no_grad()``;
            default ``num_blocks - 1`` (FedMAE); 0 trains the whole MAE end to end (fedavg-mae).
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, frozen_blocks: int | None = None) -> None:
        super().__init__()
        if not 1 <= num_blocks <= cfg.depth:
            raise ValueError(f"num_blocks must be in [1, depth={cfg.depth}], got {num_blocks}")
        frozen = num_blocks - 1 if frozen_blocks is None else frozen_blocks
        if not 0 <= frozen < num_blocks:
            raise ValueError(f"frozen_blocks must be in [0, {num_blocks - 1}], got {frozen}")
        self.cfg = cfg
        self.frozen_blocks = frozen
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(cfg.embed_dim, self.patch_embed.grid_size[0], True)[None],
            persistent=False,
        )
        self.blocks = nn.ModuleList(
            vit_block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(num_blocks)
        )
        self.norm = LayerNorm(cfg.embed_dim)
        self.decoder = build_decoder(cfg)
        self._init_weights()
        for name, param in self.named_parameters():
            param.requires_grad_(active_key(name, self.frozen_blocks))

    def _init_weights(self) -> None:
        # As MAE: patch embedding initialised like a linear layer, small normal class token.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for module in (self.blocks, self.norm):
            module.apply(init_weights)

    def _embed(self, imgs: Tensor) -> Tensor:
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def _with_cls(self, x: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``imgs [N, C, H, W]`` -> ``(latent [N, 1+L_keep, D], mask [N, L], ids_restore [N, L])``.

        The frozen prefix runs without gradients, so client memory is that of one block whatever
        the depth.
        """
        frozen_stem = self.frozen_blocks > 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_stem):
            x = self._embed(imgs)
            x, mask, ids_restore = random_masking(x, mask_ratio, generator)
            x = self._with_cls(x)
            with torch.no_grad():
                for block in self.blocks[: self.frozen_blocks]:
                    x = block(x)
        for block in self.blocks[self.frozen_blocks :]:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(loss, pred [N, L, p*p*C], mask [N, L])``, as MAE's ``forward``."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.decoder(latent, ids_restore)
        target = patchify(imgs, self.cfg.patch_size)
        loss = masked_mse_loss(pred, target, mask, self.cfg.norm_pix_loss)
        return loss, pred, mask

    def forward_features(self, imgs: Tensor) -> Tensor:
        """All patches through the whole encoder, no masking: ``[N, 1+L, D]`` (as timm)."""
        x = self._with_cls(self._embed(imgs))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def predicted_pixels(self, imgs: Tensor, pred: Tensor) -> Tensor:
        """Predictions in the images' own value space (undoes norm-pix per patch when enabled)."""
        if self.cfg.norm_pix_loss:
            target = patchify(imgs, self.cfg.patch_size)
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        return pred

    def active_state(self) -> dict[str, Tensor]:
        """The tensors trained (what a client sends back), on the CPU."""
        return {
            k: v.cpu() for k, v in self.state_dict().items() if active_key(k, self.frozen_blocks)
        }


def fresh_block_state(cfg: ModelConfig, index: int, seed: int) -> dict[str, Tensor]:
    """A freshly initialised encoder block ``index``, keyed ``blocks.<index>.*``."""
    with seeded_global_rng(seed):
        block = vit_block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio)
        block.apply(init_weights)
    return {f"blocks.{index}.{k}": v for k, v in block.state_dict().items()}


def fresh_decoder_state(cfg: ModelConfig, seed: int) -> dict[str, Tensor]:
    """A freshly initialised decoder, keyed ``decoder.*``."""
    with seeded_global_rng(seed):
        decoder = build_decoder(cfg)
    return {f"decoder.{k}": v for k, v in decoder.state_dict().items()}


def initial_state(cfg: ModelConfig, seed: int) -> dict[str, Tensor]:
    """The stage-0 global model: stem, block 0, norm, decoder."""
    with seeded_global_rng(seed):
        return CascadeMAE(cfg, num_blocks=1).state_dict()


def check_state_fits(cfg: ModelConfig, tensors: Mapping[str, tuple[Sequence[int], str]]) -> None:
    """ValueError unless ``tensors`` (name -> (shape, dtype)) is what :func:`model_from_state`
    loads for ``cfg``: the tensors of ``CascadeMAE(cfg, n)`` for its ``n`` blocks (none: those
    outside the blocks), no more, no fewer, of their shapes, in float32 (what the client helpers
    build, train and reply in). A server that knows the nodes' ``ModelConfig`` checks its model
    with it before the first round, instead of every node failing to load it for a whole
    stage."""
    if "pos_embed" in tensors:
        raise ValueError(_NO_POS_EMBED)
    blocks = {block_index(k) for k in tensors} - {None}
    count = max(blocks) + 1 if blocks else 0  # type: ignore[operator]
    if count > cfg.depth:
        raise ValueError(f"the model holds {count} blocks, its ModelConfig's depth is {cfg.depth}")
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        net = CascadeMAE(cfg, max(count, 1))
    # A fresh model of no block gets block 0 from the strategy's new_block (checked there).
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()
                if count or block_index(k) is None}  # fmt: skip
    problems = []
    if missing := sorted(expected.keys() - tensors.keys()):
        problems.append(f"missing {missing[:4]}")
    if extra := sorted(tensors.keys() - expected.keys()):
        problems.append(f"not in the model {extra[:4]}")
    shapes = [f"{k} {tuple(tensors[k][0])} (expected {expected[k]})"
              for k in sorted(expected.keys() & tensors.keys())
              if tuple(tensors[k][0]) != expected[k]]  # fmt: skip
    if shapes:
        problems.append(f"shapes {shapes[:3]}")
    if dtypes := sorted({str(dtype) for _, dtype in tensors.values()} - {"float32"}):
        problems.append(f"dtypes {dtypes} (the nodes build and reply in float32)")
    if problems:
        raise ValueError(
            f"the model does not fit its ModelConfig ({count} blocks of embed_dim "
            f"{cfg.embed_dim}, decoder_depth {cfg.decoder_depth}): {'; '.join(problems)}"
        )


def model_from_state(
    cfg: ModelConfig, state: dict[str, Tensor], frozen_blocks: int | None = None
) -> CascadeMAE:
    """Build the cascade that matches ``state``'s blocks and load it strictly."""
    indices = {block_index(k) for k in state} - {None}
    if not indices or indices != set(range(max(indices) + 1)):  # type: ignore[type-var]
        raise ValueError(f"State must hold blocks 0..n contiguously, has {sorted(indices)}")
    if "pos_embed" in state:  # KEY_CONTRACT allows one for ClientApps with a learned table
        raise ValueError(_NO_POS_EMBED)
    model = CascadeMAE(cfg, num_blocks=len(indices), frozen_blocks=frozen_blocks)
    model.load_state_dict(state, strict=True)
    return model
