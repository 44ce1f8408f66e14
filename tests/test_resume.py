"""A crashed server resumes from its last checkpoint and ends where the uninterrupted run ends.

Real strategy and client handlers through the in-process grid; the crash is an exception in
round 3's replies, after round 2's checkpoint was written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmae_flwr.config import ConfigError, resolve_config
from fedmae_flwr.server_app import run

from .conftest import LocalGrid


class ServerCrash(RuntimeError):
    pass


def crash_in_round(grid: LocalGrid, server_round: int):
    """A reply hook that raises once the grid delivers a message of ``server_round``."""

    def tamper(reply):
        if grid.sent[-1].content["config"]["server-round"] == server_round:
            raise ServerCrash(f"server died in round {server_round}")
        return reply

    return tamper


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["fedmae", "fedavg-mae"])
def test_a_resumed_run_matches_the_uninterrupted_one(algorithm, tiny_overrides):
    # On the CPU: CUDA's nondeterministic kernels (attention backward, say) make two GPU runs of
    # one seed differ in the last bits, resumed or not; what resume itself promises is exactness.
    base = {**tiny_overrides, "algorithm": algorithm, "evaluate-clients": 0, "device": "cpu"}
    whole = {**base, "run-name": "whole"}
    run(LocalGrid(6, whole), resolve_config(whole))

    crashed = {**base, "run-name": "crashed"}
    grid = LocalGrid(6, crashed)
    grid.tamper = crash_in_round(grid, 3)
    with pytest.raises(ServerCrash):
        run(grid, resolve_config(crashed))
    out = Path(base["output-dir"])
    assert [r["round"] for r in _rows(out / "crashed")] == [1, 2]

    resumed = {**crashed, "resume": True}
    summary = run(LocalGrid(6, resumed), resolve_config(resumed))

    rows = _rows(out / "crashed")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]  # each round once
    assert [s["stage"] for s in summary["stages"]] == [0, 1]  # stage 0's PSNR kept from before
    assert rows[2]["prefix-sends"] == rows[2]["sampled"] or algorithm == "fedavg-mae"
    a = load_file(str(out / "whole" / "backbone.safetensors"))
    b = load_file(str(out / "crashed" / "backbone.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_starts_fresh(tiny_overrides):
    overrides = {**tiny_overrides, "run-name": "new", "resume": True}
    summary = run(LocalGrid(6, overrides), resolve_config(overrides))
    assert [r["round"] for r in _rows(Path(overrides["output-dir"]) / "new")] == [1, 2, 3, 4]
    assert len(summary["stages"]) == 2


def test_resume_is_refused_for_algorithms_without_federated_rounds():
    with pytest.raises(ConfigError, match=re.escape("resume: fedmae | fedavg-mae")):
        resolve_config({"algorithm": "centralized", "resume": True})
