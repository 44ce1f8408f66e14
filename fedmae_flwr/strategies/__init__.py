"""The FedMAE strategy plugin: ``from fedmae_flwr.strategies import FedMAE``."""

from fedmae_flwr.strategies.fedmae import PREFIX_KEY, PREFIX_MISSING, FedMAE, StageSchedule

__all__ = ["PREFIX_KEY", "PREFIX_MISSING", "FedMAE", "StageSchedule"]
