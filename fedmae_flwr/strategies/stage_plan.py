"""The FedMAE stage plan: which stage a round is in, how the model grows, what is trained.

Pure and free of Flower and of the run config: the FedMAE strategy and the baselines trained
in the ServerApp (``centralized``, ``local``: :mod:`fedmae_flwr.baselines`) follow one plan, so
every algorithm grows the same cascade on the same schedule.

- Schedule: K stages of R rounds; round ``r`` (1-based) is in stage ``(r - 1) // R``.
- Progressive (FedMAE): in stage ``s`` blocks ``0..s-1`` (and the stem) are frozen and block
  ``s`` trains; end to end (``fedavg-mae``): all K blocks are present and train every round.
- Growth: a model is grown to the blocks its round needs by appending blocks, each freshly
  initialised or copied from the block before it, optionally resetting the decoder per block.
- Split: :func:`fedmae_flwr.models.cascade.active_key` / ``prefix_key`` decide which tensors
  train (and travel every round) and which form the frozen prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from fedmae_flwr.models.cascade import active_key, block_index, prefix_key

StateFactory = Callable[[int], Mapping[str, np.ndarray]]
V = TypeVar("V")


def num_blocks(keys: Iterable[str]) -> int:
    """Encoder blocks present among parameter names (``blocks.<i>.*``)."""
    return len({block_index(k) for k in keys} - {None})


@dataclass(frozen=True)
class StagePlan:
    """Schedule, growth and active/prefix split of a FedMAE run.

    Args:
        depth: K, blocks of the final backbone (= number of stages).
        rounds_per_stage: R; a run has ``depth * rounds_per_stage`` rounds.
        new_block: ``index -> {"blocks.<index>.*": ndarray}``, a freshly initialised block.
        new_decoder: ``index -> {"decoder.*": ndarray}``, a fresh decoder for the stage that
            adds block ``index``; needed when ``decoder_per_stage='reset'``.
        progressive: True for FedMAE's one-block stages; False trains all ``depth`` blocks end
            to end every round (``fedavg-mae``), on the same schedule.
        next_block_init: ``"fresh"`` (``new_block``) or ``"copy"`` (of the block before).
        decoder_per_stage: ``"keep"`` the trained decoder or ``"reset"`` it with each new block.
    """

    depth: int
    rounds_per_stage: int
    new_block: StateFactory = field(repr=False, compare=False)
    new_decoder: StateFactory | None = field(default=None, repr=False, compare=False)
    progressive: bool = True
    next_block_init: str = "fresh"
    decoder_per_stage: str = "keep"

    def __post_init__(self) -> None:
        whole = [v for v in (self.depth, self.rounds_per_stage) if type(v) is not int]
        if whole:  # '2' from a config file would fail later as "'<' not supported"
            raise ValueError(
                f"depth and rounds_per_stage must be whole numbers, got {self.depth!r}, "
                f"{self.rounds_per_stage!r}"
            )
        if not callable(self.new_block):
            raise ValueError(f"new_block must be a factory index -> state, got {self.new_block!r}")
        if self.depth < 1 or self.rounds_per_stage < 1:
            raise ValueError(
                f"depth and rounds_per_stage must be >= 1, got {self.depth}, "
                f"{self.rounds_per_stage}"
            )
        if self.next_block_init not in ("fresh", "copy"):
            raise ValueError(
                f"next_block_init must be 'fresh' or 'copy', got {self.next_block_init!r}"
            )
        if self.decoder_per_stage not in ("keep", "reset"):
            raise ValueError(
                f"decoder_per_stage must be 'keep' or 'reset', got {self.decoder_per_stage!r}"
            )
        if self.decoder_per_stage == "reset" and self.new_decoder is None:
            raise ValueError("decoder_per_stage='reset' needs a new_decoder factory")

    # --- schedule -----------------------------------------------------------------------------
    @property
    def num_rounds(self) -> int:
        return self.depth * self.rounds_per_stage

    def stage_of(self, server_round: int) -> int:
        return (server_round - 1) // self.rounds_per_stage

    def is_stage_end(self, server_round: int) -> bool:
        return server_round % self.rounds_per_stage == 0

    def frozen_blocks(self, server_round: int) -> int:
        """Blocks frozen on the nodes: the finished ones when progressive, none end to end."""
        return self.stage_of(server_round) if self.progressive else 0

    def blocks_at(self, server_round: int) -> int:
        """Blocks the model holds in ``server_round``."""
        return self.stage_of(server_round) + 1 if self.progressive else self.depth

    # --- model growth -------------------------------------------------------------------------
    def check_model(self, tensors: Mapping[str, tuple[Iterable[int], str]], round_: int) -> None:
        """Raise ValueError, naming it, on what in a model (name -> (shape, dtype)) that starts
        ``round_`` would fail on every node or train the wrong thing: more blocks than the round
        holds (a full-depth model would train end to end in stage 0), blocks not numbered
        0..n-1, no patch embedding or no decoder, a block or decoder tensor missing or of
        another shape or dtype than ``new_block`` / ``new_decoder`` make (another width, patch
        size or precision), a patch embedding the decoder does not fit (channels, patch size,
        width). Calls each factory once."""
        indices = sorted({block_index(k) for k in tensors} - {None})
        if indices and indices[-1] >= self.blocks_at(round_):
            raise ValueError(
                f"FedMAE: the model has blocks 0..{indices[-1]}, but round {round_} holds "
                f"{self.blocks_at(round_)} (depth {self.depth}, {self.rounds_per_stage} rounds "
                "per stage): give the model after the round before it (a fresh run: one block "
                "or none, e.g. models.initial_state)"
            )
        if indices != list(range(len(indices))):
            raise ValueError(f"FedMAE: the model's blocks are {indices}, not 0..n-1")
        for part in ("patch_embed.", "decoder."):
            if not any(k.startswith(part) for k in tensors):
                raise ValueError(f"FedMAE: the model has no {part}* tensors: the MAE needs them")
        check_stem_fits_decoder(tensors)
        expected: dict[str, np.ndarray] = {}
        if indices:  # ViT blocks share one layout: block 0's, renamed
            template = self.fresh_block(0)
            for index in indices:
                expected.update({f"blocks.{index}.{k[len('blocks.0.') :]}": v
                                 for k, v in template.items()})  # fmt: skip
        if self.new_decoder is not None:
            expected.update(self.new_decoder(0))
        if missing := sorted(set(expected) - set(tensors)):
            raise ValueError(
                f"FedMAE: the model lacks {', '.join(missing[:5])}"
                + (f" (+{len(missing) - 5} more)" if missing[5:] else "")
                + ", which new_block / new_decoder make"
            )
        for key, (shape, dtype) in tensors.items():
            if key not in expected:
                continue
            want = expected[key]
            want_dtype = str(want.dtype).removeprefix("torch.")  # numpy or torch factories
            if tuple(want.shape) != tuple(shape) or want_dtype != str(dtype):
                raise ValueError(
                    f"FedMAE: the model's {key} is {dtype} {tuple(shape)}, but new_block "
                    f"/ new_decoder make it {want_dtype} {tuple(want.shape)}: the model and the "
                    "strategy's factories describe different architectures or precisions "
                    "(nodes reply in the factories' dtype)"
                )

    def fresh_block(self, index: int) -> dict[str, np.ndarray]:
        """``new_block(index)``, checked to hold block ``index``'s tensors only."""
        block = dict(self.new_block(index))
        wrong = sorted(k for k in block if block_index(k) != index)
        if wrong or not block:
            raise ValueError(
                f"FedMAE: new_block({index}) must return block {index}'s tensors, named "
                f"blocks.{index}.*; it returned {', '.join(wrong[:3]) or 'nothing'}"
            )
        return block

    def grow(self, state: Mapping[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
        """``state`` with the blocks ``server_round`` needs appended (a new dict; ``state`` is
        not modified, and tensors that do not change are the same objects)."""
        grown = dict(state)
        for index in range(num_blocks(grown), self.blocks_at(server_round)):
            if self.next_block_init == "copy" and index > 0:  # block 0 has none to copy
                src = f"blocks.{index - 1}."
                block = {
                    f"blocks.{index}.{k[len(src) :]}": np.array(v, copy=True)
                    for k, v in grown.items()
                    if k.startswith(src)
                }
            else:
                block = self.fresh_block(index)
            grown.update(block)
            if self.decoder_per_stage == "reset" and self.new_decoder is not None:
                grown.update(self.new_decoder(index))
        return grown

    # --- what trains ----------------------------------------------------------------------------
    def split(self, state: Mapping[str, V], server_round: int) -> tuple[dict[str, V], dict[str, V]]:
        """``(active, prefix)``: the tensors trained in ``server_round`` (sent, returned and
        averaged every round) and the frozen prefix (stem + finished blocks; empty in stage 0
        and end to end)."""
        frozen = self.frozen_blocks(server_round)
        active = {k: v for k, v in state.items() if active_key(k, frozen)}
        prefix = {k: v for k, v in state.items() if prefix_key(k, frozen)}
        return active, prefix


def check_stem_fits_decoder(tensors: Mapping[str, tuple[Iterable[int], str]]) -> None:
    """Raise ValueError where the patch embedding and the decoder of one model disagree: the
    decoder predicts ``in_chans x patch^2`` pixel values per patch and reads the encoder's width.
    The factories make blocks and decoder only, so a stem of other channels or width than the
    decoder's passes :meth:`StagePlan.check_model`'s shape checks and fails on every node."""
    shapes = {k: tuple(shape) for k, (shape, _) in tensors.items()}
    stem, pred, embed = (
        shapes.get(k)
        for k in ("patch_embed.proj.weight", "decoder.pred.weight", "decoder.embed.weight")
    )
    if stem is None or len(stem) != 4:
        return  # another stem than timm's PatchEmbed conv: nothing to compare against
    width, values_per_patch = stem[0], int(np.prod(stem[1:]))
    if pred is not None and len(pred) == 2 and pred[0] != values_per_patch:
        raise ValueError(
            f"FedMAE: the patch embedding takes {stem[1]} channel(s) of {stem[2]}x{stem[3]} "
            f"patches ({values_per_patch} values), but decoder.pred predicts {pred[0]} per "
            "patch: the model's in_chans or patch size differ between its stem and decoder"
        )
    if embed is not None and len(embed) == 2 and embed[1] != width:
        raise ValueError(
            f"FedMAE: the patch embedding's width is {width}, but decoder.embed reads {embed[1]}"
        )
