"""The Ray-engine benchmark (benchmarks/ray_engine.py): its arithmetic, and one real run on CPUs."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from benchmarks import ray_engine
from scripts.run import RAY_WORKER_NICENESS


def test_gpu_use_is_averaged_over_the_rounds_after_the_first():
    ends = [10.0, 12.0, 14.0]
    samples = [(9.0, 100.0, 900.0), (10.0, 99.0, 950.0), (11.0, 40.0, 500.0),
               (13.0, 60.0, 700.0), (14.0, 50.0, 600.0), (15.0, 0.0, 2000.0)]  # fmt: skip
    window = ray_engine.steady_window(ends, samples)
    # round 1's samples (<= 10.0) and those after the last round are left out
    assert window == {"gpu-util": pytest.approx(50.0), "gpu-mib-peak": 700.0}
    assert ray_engine.steady_window(ends, []) == {"gpu-util": None, "gpu-mib-peak": None}
    assert ray_engine.steady_window([10.0], samples)["gpu-util"] is None


def test_clients_at_once_is_the_tighter_of_cpu_and_gpu_shares():
    assert ray_engine.concurrency(16, 1, 0.1, 1) == 10
    assert ray_engine.concurrency(16, 1, 0.05, 1) == 16
    assert ray_engine.concurrency(16, 2, 0, 0) == 8
    assert ray_engine.concurrency(16, 1, 0.02, 2) == 16


def test_steady_round_leaves_round_one_out():
    result = {"round-seconds": [30.0, 2.0, 4.0, 3.0], "images-per-round": 600.0,
              "local-epochs": 2}  # fmt: skip
    s = ray_engine.summarize(result)
    assert s["round-1"] == 30.0 and s["steady"] == 3.0
    assert s["rounds-per-s"] == pytest.approx(1 / 3)
    assert s["images-per-s"] == pytest.approx(400.0)


def test_arguments_that_cannot_run_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ray_engine.main(["--rounds", "1", "--out", str(tmp_path)])
    assert "needs >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ray_engine.main(["--supernodes", "5", "--clients", "10", "--out", str(tmp_path)])
    assert "at most --supernodes 5" in capsys.readouterr().err
    # a client asking for more CPUs than the machine has would leave Ray no actor to start
    with pytest.raises(SystemExit):
        ray_engine.main(["--client-cpus", "100000", "--client-gpus", "0", "--out", str(tmp_path)])
    assert "no virtual client fits this machine" in capsys.readouterr().err
    assert not (tmp_path / "command.txt").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_setting_on_ray_writes_results_and_a_page(fmnist_dir, tmp_path, monkeypatch):
    """A real simulation on Flower's Ray engine (CPU only here: no GPU samples); the page of
    several settings is checked from results (each setting costs a simulation of its own)."""
    monkeypatch.delenv(RAY_WORKER_NICENESS, raising=False)
    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    ray_engine.main(["--supernodes", "8", "--clients", "2", "--client-gpus", "0",
                     "--rounds", "2", "--data", str(fmnist_dir), "--out", str(out),
                     "--docs", str(docs)])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [r["clients"] for r in results] == [2]
    for r in results:
        assert len(r["round-seconds"]) == 2 and r["gpu-util"] is None
        assert 0 < r["key-seconds"] < r["round-seconds"][0]  # the queries are in round 1
        # 800 images over 8 nodes, of which each node trains on its share past its held-out few
        assert 0.8 * r["clients"] * 100 <= r["images-per-round"] <= r["clients"] * 100
    page = (docs / "ray-engine.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "2"
    assert "GPU: none" in page and (docs / "ray-engine.png").stat().st_size > 0
    # measured as `make run` runs Ray's workers (unless the environment says otherwise), and
    # the variable is as it was afterwards
    assert "; Ray workers at niceness 0)" in page and all(
        r["worker-niceness"] == "0" for r in results
    )
    assert RAY_WORKER_NICENESS not in os.environ
    # the page can be rewritten from the results alone, and from their tracked copy beside
    # the pages where the out folder is gone (another machine)
    assert f"tracked in `{docs / 'data' / 'ray-engine'}`" in page
    (docs / "ray-engine.md").unlink()
    ray_engine.main(["--report-only", "--out", str(out), "--docs", str(docs)])
    assert (docs / "ray-engine.md").read_text() == page
    shutil.rmtree(out)
    ray_engine.main(["--report-only", "--out", str(out), "--docs", str(docs)])
    assert (docs / "ray-engine.md").read_text() == page
    # A second setting beside the first (as from --clients 2 4): a row each, in their order.
    out.mkdir()
    (out / "results.json").write_text(json.dumps([results[0], {**results[0], "clients": 4}]))
    shutil.copy(docs / "data" / "ray-engine" / "command.txt", out / "command.txt")
    ray_engine.main(["--report-only", "--out", str(out), "--docs", str(docs)])
    rows = [line for line in (docs / "ray-engine.md").read_text().splitlines()
            if line.startswith("| 8 |")]  # fmt: skip
    assert [row.split("|")[2].strip() for row in rows] == ["2", "4"]
