"""Every algorithm runs end to end on a tiny config and reports comparable metrics.

The ServerApp's ``run`` is called with the in-process grid (real strategy and client handlers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmae_flwr.config import resolve_config
from fedmae_flwr.server_app import run

from .conftest import LocalGrid


@pytest.mark.parametrize(
    "algorithm", ["fedmae", "fedavg-mae", "centralized", "local", "random-init"]
)
def test_algorithm_runs_and_reports(algorithm, tiny_overrides):
    overrides = {**tiny_overrides, "algorithm": algorithm, "run-name": algorithm}
    if algorithm != "random-init":
        overrides["evaluate-random-init"] = algorithm == "fedmae"
    cfg = resolve_config(overrides)
    summary = run(LocalGrid(6, overrides), cfg)

    assert summary["algorithm"] == algorithm
    for protocol in ("linear-probe-accuracy", "finetune-accuracy"):
        expected = {algorithm, "random-init"} if algorithm == "fedmae" else {algorithm}
        assert set(summary[protocol]) - {"pixels"} == expected
        assert all(0.0 <= acc <= 1.0 for acc in summary[protocol].values())
    run_dir = Path(cfg.output_dir) / algorithm
    assert (run_dir / "backbone.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if algorithm == "random-init":
        assert rows == [] and summary["stages"] == []
        return
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train-loss"]) for r in rows)
    assert [s["blocks"] for s in summary["stages"]] == (
        [2, 2] if algorithm == "fedavg-mae" else [1, 2]
    )
    # The nodes' own evaluation at each stage end (it was in Flower's log only): recorded with
    # the stage, beside the server's; the baselines train on the server, no node evaluates.
    federated = algorithm in ("fedmae", "fedavg-mae")
    for stage in summary["stages"]:
        assert (stage.get("evaluating-nodes") == cfg.schedule.evaluate_clients) == federated
        assert np.isfinite(stage["node-heldout-loss"]) if federated else True
    assert [r.get("node-heldout-loss") for r in rows if r.get("stage-end")] == [
        s.get("node-heldout-loss") for s in summary["stages"]
    ]


def test_fedavg_mae_exchanges_the_whole_model_every_round(tiny_overrides):
    overrides = {**tiny_overrides, "algorithm": "fedavg-mae"}
    grid = LocalGrid(6, overrides)
    run(grid, resolve_config(overrides))
    sent = {len(m.content["arrays"]) for m in grid.sent if m.metadata.message_type == "train"}
    assert len(sent) == 1  # the same full set of tensors in every round, no prefix
    assert all("prefix" not in m.content for m in grid.sent)


def test_local_clients_are_each_evaluated_and_averaged(tiny_overrides):
    overrides = {**tiny_overrides, "algorithm": "local", "local-clients": 2}
    summary = run(LocalGrid(6, overrides), resolve_config(overrides))
    per_client = summary["downstream"]["linear-probe"]
    assert {"local-0", "local-1"} <= set(per_client)
    mean = (per_client["local-0"]["accuracy"] + per_client["local-1"]["accuracy"]) / 2
    assert summary["linear-probe-accuracy"]["local"] == pytest.approx(mean)


def test_costs_and_per_block_probe_are_reported(tiny_overrides):
    overrides = {**tiny_overrides, "probe-per-block": True, "stage-knn-images": 100}
    summary = run(LocalGrid(6, overrides), resolve_config(overrides))
    costs = summary["communication"]
    assert costs["client-train-mbytes-peak"] > 0 and costs["client-train-seconds-mean"] > 0
    assert costs["bytes-up-per-client-round"] > 0
    assert len(summary["downstream"]["linear-probe-per-block"]["fedmae"]) == 2
    assert {"fedmae", "random-init", "pixels"} <= set(summary["knn-accuracy"])
    assert all(0 <= stage["knn-accuracy"] <= 1 for stage in summary["stages"])


def test_an_in_process_run_with_too_few_nodes_fails_at_once_naming_the_keys(tiny_overrides):
    from fedmae_flwr.config import ConfigError

    from .local_grid import run_in_process

    with pytest.raises(ConfigError, match=r"a round waits for 3 nodes .run-config clients-per"):
        run_in_process(tiny_overrides, num_nodes=2)
