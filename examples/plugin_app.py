"""Your own Flower app pretraining a ViT with FedMAE: no run config, your shapes, your images."""

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmae_flwr.client import evaluate_reply, identify_reply, train_reply
from fedmae_flwr.config import ModelConfig, TrainConfig
from fedmae_flwr.models import export_backbone, fresh_block_state, initial_state
from fedmae_flwr.strategies import FedMAE

# 16x16 RGB images in 4x4 patches; 2 blocks of width 48 (= 2 stages); a narrow MAE decoder.
VIT = ModelConfig(
    img_size=16, patch_size=4, in_chans=3, embed_dim=48, num_heads=3, depth=2, decoder_embed_dim=32
)
TRAIN = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)
BACKBONE_DIR = "fedmae-backbone"

server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedMAE(
        depth=VIT.depth,
        rounds_per_stage=2,
        new_block=lambda i: {k: v.numpy() for k, v in fresh_block_state(VIT, i, seed=i).items()},
        num_train_nodes=3,
        num_evaluate_nodes=2,  # nodes scoring each finished stage
        model=VIT,  # sent along: a node built with other heads or image size refuses
    )
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_state(VIT, seed=0)))
    export_backbone(VIT, result.arrays, BACKBONE_DIR)  # models.load_backbone(BACKBONE_DIR)


def node_images(context: Context) -> torch.Tensor:
    """Stand-in for the node's own images: 80 smooth random ``[3, 16, 16]`` float images."""
    seed = int(context.node_config["partition-id"])
    coarse = torch.randn(80, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context, node_images(context)[:64], model=VIT, train=TRAIN, seed=0)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    images = node_images(context)[64:]  # held out from training
    return evaluate_reply(msg, context, images, model=VIT, seed=0)


@client.query()
def identify(msg: Message, context: Context) -> Message:
    return identify_reply(msg, context)  # the key FedMAE samples this node by, in every run
