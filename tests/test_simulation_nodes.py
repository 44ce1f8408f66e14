"""A simulation's fixed node count against the config: refused before any round, naming why."""

from __future__ import annotations

import pytest

from fedmae_flwr.config import ConfigError, resolve_config
from fedmae_flwr.server_app import run
from fedmae_flwr.simulation_nodes import registered_nodes, simulation_problem

from .conftest import LocalGrid


def test_a_node_count_the_config_cannot_run_on_is_named_with_the_keys_to_change():
    cfg = resolve_config({"clients-per-round": 10})
    assert simulation_problem(cfg, 10, train_images=60_000) is None
    assert "num-supernodes must be >= 1" in simulation_problem(cfg, 0)
    too_few = simulation_problem(cfg, 4)
    assert "a round waits for 10 nodes (run-config clients-per-round=10" in too_few
    assert "raise num-supernodes to >= 10" in too_few
    # min-available-clients below clients-per-round trains on fewer: 4 nodes will do.
    assert simulation_problem(resolve_config({"min-available-clients": 3}), 4) is None
    # Non-federated algorithms sample no rounds and give the nodes no shares.
    assert simulation_problem(resolve_config({"algorithm": "centralized"}), 1) is None
    baseline = resolve_config({"algorithm": "centralized", "num-partitions": 10})
    assert simulation_problem(baseline, 100) is None
    # The key to lower is the one that sets the wait.
    waits = simulation_problem(
        resolve_config({"clients-per-round": 3, "min-available-clients": 8}), 5
    )
    assert "or lower min-available-clients" in waits and "clients-per-round (or" not in waits
    shares = simulation_problem(resolve_config({"num-partitions": 20}), 30)
    assert "num-partitions=20 splits the data into 20 shares" in shares
    assert "nodes 20..29 would have none" in shares
    images = simulation_problem(cfg, 50, train_images=40)
    assert "50 shares of 40 training images leave some node without an image" in images


def test_the_node_count_is_read_once_the_simulation_has_registered_its_nodes():
    """Flower starts the ServerApp's thread just before it registers the virtual nodes."""

    class Registering:
        def __init__(self) -> None:
            self.calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [] if self.calls < 3 else [7, 8]

    assert registered_nodes(Registering(), wait=5.0, sleep=lambda s: None) == 2

    class Empty:
        def get_node_ids(self):
            return []

    now = [0.0]
    sleep = lambda s: now.__setitem__(0, now[0] + s)  # noqa: E731
    assert registered_nodes(Empty(), wait=3.0, sleep=sleep, clock=lambda: now[0]) == 0
    assert now[0] == 3.0


def test_the_node_count_is_read_once_it_stops_growing():
    """Flower registers the nodes one by one: a check between saw 1 of 8 and refused a run
    of 2 clients per round ('the simulation has 1')."""

    class OneByOne:
        def __init__(self) -> None:
            self.calls = 0

        def get_node_ids(self):
            self.calls += 1
            return list(range(min(self.calls, 8)))

    now = [0.0]
    sleep = lambda s: now.__setitem__(0, now[0] + s)  # noqa: E731
    assert registered_nodes(OneByOne(), wait=10.0, sleep=sleep, clock=lambda: now[0]) == 8


def test_the_server_refuses_a_simulation_too_small_for_its_rounds_before_writing_anything(
    tiny_overrides, tmp_path
):
    """2 virtual nodes, 3 clients per round: the run waited node-wait-timeout, then failed."""
    cfg = resolve_config(tiny_overrides)
    with pytest.raises(ConfigError, match=r"a round waits for 3 nodes .* has 2 \(num-supernodes"):
        run(LocalGrid(2, tiny_overrides), cfg)
    assert not (tmp_path / "outputs").exists()  # no run folder made, none moved aside


def test_more_shares_than_nodes_is_allowed_and_names_the_shares_never_trained(caplog):
    """num-partitions=7 on 5 nodes trained 5 shares of 7 without a word."""
    from fedmae_flwr.simulation_nodes import check_simulation_nodes

    class FiveNodes:
        def get_node_ids(self):
            return [1, 2, 3, 4, 5]

    cfg = resolve_config({"num-partitions": 7, "clients-per-round": 2})
    assert check_simulation_nodes(cfg, FiveNodes(), train_images=100) == 5
    assert "num-partitions=7 splits the images into 7 shares, but the simulation has 5 nodes: " \
        "shares 5..6 are never trained on" in caplog.text  # fmt: skip
