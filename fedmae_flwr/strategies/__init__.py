"""The FedMAE strategy plugin: ``from fedmae_flwr.strategies import FedMAE``.

- :mod:`.fedmae`: the strategy (Flower Message API, on FedAvg).
- :mod:`.aggregation`: the seam to any Flower aggregation (``aggregator=``) and server-side DP.
- :mod:`.stage_plan`: schedule, model growth and active/prefix split, shared with the baselines.
- :mod:`.replies`: reply validation; :mod:`.prefix_cache`: which node holds which prefix;
  :mod:`.accounting`: the per-round record; :mod:`.sampling`: seeded sampling, bounded wait;
  :mod:`.node_keys`: the run-independent node order sampling draws from.
"""

from fedmae_flwr.strategies.accounting import EVALUATION_REJECTED
from fedmae_flwr.strategies.fedmae import FedMAE
from fedmae_flwr.strategies.prefix_cache import PREFIX_KEY
from fedmae_flwr.strategies.replies import NODE_UNUSABLE, PREFIX_MISSING
from fedmae_flwr.strategies.stage_plan import StagePlan

__all__ = [
    "EVALUATION_REJECTED",
    "NODE_UNUSABLE",
    "PREFIX_KEY",
    "PREFIX_MISSING",
    "FedMAE",
    "StagePlan",
]
