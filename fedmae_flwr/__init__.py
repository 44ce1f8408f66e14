"""FedMAE: federated one-block Masked Auto-Encoder pretraining of ViTs with Flower and timm."""

__version__ = "0.1.0"
