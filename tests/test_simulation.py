"""One real Flower simulation (Ray backend) of the whole app, end to end, on a tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
from safetensors.torch import load_file

from fedmae_flwr.client_app import build_client_app
from fedmae_flwr.server_app import build_server_app


def simulate(overrides: dict) -> None:
    """The app on Flower's simulation engine (Ray): 6 virtual SuperNodes, 1 CPU each."""
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=build_server_app(overrides),
        client_app=build_client_app(overrides),
        num_supernodes=6,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
    )


def check_written_run(run_dir: Path) -> None:
    """What a finished simulation of the tiny config wrote: its metrics, summary, backbone
    (loads in timm) and pictures."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [r["stage"] for r in rows] == [0, 0, 1, 1]
    assert all(r["clients"] == 3 and r["rejected"] == 0 for r in rows)
    # bytes up per client = the active tensors only, far below the whole model after stage 0
    assert (
        rows[-1]["bytes-up-per-client"] == rows[-1]["active-bytes"] < rows[-1]["full-model-bytes"]
    )
    # the prefix goes out once per node per stage: never more sends than nodes sampled so far
    assert sum(r["prefix-sends"] for r in rows if r["stage"] == 1) <= 6
    assert {"psnr", "trivial-psnr"} <= set(rows[1]) and {"psnr"} <= set(rows[3])

    assert summary["depth"] == 2 and len(summary["stages"]) == 2
    for protocol in ("linear-probe-accuracy", "finetune-accuracy"):
        assert {"fedmae", "random-init"} <= set(summary[protocol])
    assert "pixels" in summary["linear-probe-accuracy"]
    data = summary["data"]
    assert (data["train-images"], data["skipped-unreadable"]) == (800, 0)
    assert data["partitions"]["num-partitions"] == 6
    # what the nodes reported: up to 6 of them, 4 rounds x 3 sound replies in all
    assert 1 <= len(data["nodes"]) <= 6 and sum(n["rounds"] for n in data["nodes"].values()) == 12
    assert all(n["images"] > 0 and n["skipped-images"] == 0 for n in data["nodes"].values())

    meta = json.loads((run_dir / "backbone.json").read_text())
    model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
    model.load_state_dict(load_file(run_dir / "backbone.safetensors"), strict=True)
    assert len(model.blocks) == 2
    written = (
        "config.yaml", "curves.png", "partitions.json", "partitions.png",
        "reconstructions/stage-0.png", "reconstructions/stage-1.png", "checkpoints/latest.json",
    )  # fmt: skip
    for name in written:
        assert (run_dir / name).is_file(), name


@pytest.mark.slow
def test_simulation_resumes_a_crashed_run_from_its_checkpoint(tiny_overrides):
    """Rounds 1-2 ran (and crashed in round 3); the real simulation engine finishes 3-4, and the
    backbone equals the uninterrupted run's."""
    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.server_app import run

    from .conftest import LocalGrid
    from .test_resume import ServerCrash, crash_in_round

    overrides = {**tiny_overrides, "run-name": "crashed", "evaluate-clients": 0}
    grid = LocalGrid(6, overrides)
    grid.tamper = crash_in_round(grid, 3)
    with pytest.raises(ServerCrash):
        run(grid, resolve_config(overrides))

    resumed = {**overrides, "resume": True}
    simulate(resumed)
    run_dir = Path(overrides["output-dir"]) / "crashed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    # fresh SuperNodes hold no prefix: round 3 sends it to every sampled node
    assert rows[2]["prefix-sends"] == rows[2]["sampled"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    # the resumed simulation's nodes have new random ids, yet sample and train as the
    # uninterrupted run did (node keys): the same backbone, bit for bit
    whole = {**overrides, "run-name": "whole"}
    run(LocalGrid(6, whole), resolve_config(whole))
    a = load_file(run_dir / "backbone.safetensors")
    b = load_file(Path(overrides["output-dir"]) / "whole" / "backbone.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
def test_two_simulations_with_one_seed_train_the_same_backbone(tiny_overrides):
    """Flower draws new random node ids for every simulation; the run must not depend on them.
    The first writes the whole run (check_written_run); the second skips the fine-tuning,
    which the backbone does not depend on."""
    runs = []
    for name, finetune in (("first", tiny_overrides["finetune-labels"]), ("second", 0)):
        overrides = {**tiny_overrides, "run-name": name, "finetune-labels": finetune}
        simulate(overrides)
        run_dir = Path(overrides["output-dir"]) / name
        if name == "first":
            check_written_run(run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs.append((rows, load_file(run_dir / "backbone.safetensors")))
    (rows_a, backbone_a), (rows_b, backbone_b) = runs
    assert [r["train-loss"] for r in rows_a] == [r["train-loss"] for r in rows_b]
    assert backbone_a.keys() == backbone_b.keys()
    assert all(backbone_a[k].equal(backbone_b[k]) for k in backbone_a)
