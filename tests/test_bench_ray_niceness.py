"""benchmarks.ray_niceness: its neighbours end, its niceness is restored, its page reads right,
and one real simulation runs beside a busy process at a set niceness."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from benchmarks import ray_niceness


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # an exited child not yet reaped would still answer: check its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_busy_neighbours_run_inside_the_block_and_end_after_it_even_on_error():
    with pytest.raises(RuntimeError), ray_niceness.BusyNeighbours(2) as busy:
        pids = [p.pid for p in busy.processes]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        raise RuntimeError("the simulation failed")
    assert not any(_alive(p) for p in pids)
    with ray_niceness.BusyNeighbours(0) as none:
        assert none.processes == []


def test_worker_niceness_is_set_inside_the_block_and_restored(monkeypatch):
    monkeypatch.setenv(ray_niceness.NICENESS_ENV, "7")
    with ray_niceness.WorkerNiceness("0"):
        assert os.environ[ray_niceness.NICENESS_ENV] == "0"
    assert os.environ[ray_niceness.NICENESS_ENV] == "7"
    with ray_niceness.WorkerNiceness(ray_niceness.RAY_DEFAULT):
        assert ray_niceness.NICENESS_ENV not in os.environ  # Ray's own default applies
    assert os.environ[ray_niceness.NICENESS_ENV] == "7"
    monkeypatch.delenv(ray_niceness.NICENESS_ENV)
    with ray_niceness.WorkerNiceness("5"):
        pass
    assert ray_niceness.NICENESS_ENV not in os.environ


def test_a_niceness_out_of_range_is_refused_naming_what_is_allowed():
    assert ray_niceness.niceness_value("ray") == "ray"
    assert ray_niceness.niceness_value("-3") == "-3"
    for bad in ("20", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"whole number -20\.\.19"):
            ray_niceness.niceness_value(bad)


def test_the_page_compares_each_condition_with_the_same_niceness_alone(tmp_path):
    def result(niceness, neighbours, steady):
        return {"supernodes": 200, "clients": 10, "machine": "2 CPU cores", "date": "2026-01-02",
                "niceness": niceness, "neighbours": neighbours, "key-seconds": 4.0,
                "round-seconds": [20.0, steady, steady], "images-per-round": 540.0,
                "local-epochs": 1, "client-train-seconds": 0.2, "wall-seconds": 30.0}  # fmt: skip

    results = [result("ray", 0, 2.0), result("ray", 2, 30.0), result("0", 0, 2.5),
               result("0", 2, 5.0)]  # fmt: skip
    docs = tmp_path / "new-docs"  # made by the report
    ray_niceness.report(results, "cmd", docs)
    text = (docs / "ray-niceness.md").read_text()
    assert "| 15 (Ray's default) | 2 | 1 | 20.0 | 4.0 | 30.00 | 15.0 | 0.20 | 30 |" in text
    assert "| 0 | 2 | 1 | 20.0 | 4.0 | 5.00 | 2.0 | 0.20 | 30 |" in text
    assert text.index("15 (Ray's default) | 0") < text.index("| 0 | 0 |")
    assert (docs / "ray-niceness.png").is_file()


@pytest.mark.slow
def test_a_real_simulation_beside_a_busy_process_at_a_set_niceness(fmnist_dir, tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    before = os.environ.get(ray_niceness.NICENESS_ENV)
    ray_niceness.main(["--supernodes", "6", "--clients", "2", "--rounds", "2",
                       "--niceness", "0", "--neighbours", "1", "--repeats", "1",
                       "--data", str(fmnist_dir), "--out", str(out),
                       "--docs", str(docs)])  # fmt: skip
    (record,) = json.loads((out / "results.json").read_text())
    assert record["niceness"] == "0" and record["neighbours"] == 1
    assert len(record["round-seconds"]) == 2
    assert os.environ.get(ray_niceness.NICENESS_ENV) == before  # restored after the run
    assert "| 0 | 1 | 1 |" in (docs / "ray-niceness.md").read_text()
