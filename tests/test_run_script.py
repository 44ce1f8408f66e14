"""scripts/run.py's own pieces, without Flower: the run-config string and the process cleanup
(scripts/processes.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.processes import ended, processes_below, send_signal, start_time
from scripts.run import flwr_env, run_config_string

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs in its own process: ProcessTree makes it a child subreaper, as in scripts/run.py.
CLEANUP = """
import subprocess, tempfile, time
from pathlib import Path
from scripts.processes import ProcessTree, descendants
callers = subprocess.Popen(["sleep", "300"])  # the caller's own child, from before the run
temp = Path(tempfile.mkdtemp())  # as run.py's Ray temp folder
with ProcessTree(temp_dirs=[temp]) as tree:
    # A shell in a session of its own that leaves a sleeper behind, as SuperExec and Ray do.
    subprocess.run(["sh", "-c", "sleep 300 &"], start_new_session=True)
    (temp / "session").write_text("sockets, logs")
    time.sleep(0.5)
    print(callers.pid, *descendants({callers.pid, tree.guard_pid}), flush=True)
print(callers.poll(), *descendants({callers.pid}), temp.exists(), flush=True)
callers.kill()
"""

# The same, but the process holding the tree is SIGKILLed (uncatchable): its guard ends the rest.
SIGKILLED = """
import os, signal, subprocess, sys, time
from pathlib import Path
from scripts.processes import ProcessTree, descendants
callers = subprocess.Popen(["sleep", "300"])  # the caller's own child, from before the run
temp = Path(sys.argv[1]).parent / "ray-tmp"  # as run.py's Ray temp folder
temp.mkdir()
with ProcessTree(temp_dirs=[temp]) as tree:
    (temp / "session").write_text("sockets, logs")
    log, env = Path(sys.argv[1]), dict(os.environ)
    tree.start(["sh", "-c", "sleep 300 & exec sleep 301"], log, env, Path.cwd())
    subprocess.run(["sh", "-c", "sleep 302 &"], start_new_session=True)  # an adopted orphan
    time.sleep(2.0)  # the guard notes what runs below this process twice a second
    print(callers.pid, tree.guard_pid, *descendants({callers.pid, tree.guard_pid}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_run_config_string_writes_flwr_run_config_syntax():
    overrides = {"depth": 6, "run-name": "x", "resume": True, "lr": 0.5, "data-path": "/a b"}
    assert (
        run_config_string(overrides) == "depth=6 run-name='x' resume=true lr=0.5 data-path='/a b'"
    )


def test_ray_workers_run_at_the_users_niceness_unless_told_otherwise(monkeypatch, tmp_path):
    """Ray's own default (15) starves the virtual clients beside any other program."""
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert flwr_env(tmp_path)["RAY_worker_niceness"] == "0"
    monkeypatch.setenv("RAY_worker_niceness", "10")  # the user's choice wins
    assert flwr_env(tmp_path)["RAY_worker_niceness"] == "10"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and prctl")
def test_the_cleanup_ends_adopted_orphans_and_spares_the_callers_children():
    out = subprocess.run(
        [sys.executable, "-c", CLEANUP], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    callers, *orphans = (int(p) for p in out[0].split())
    assert len(orphans) == 1  # the sleeper, re-parented to the subreaper
    # the caller's child still runs; nothing of ours is left, nor the temp folder
    assert out[1].split() == ["None", "False"]
    assert not Path(f"/proc/{orphans[0]}").exists() and callers not in orphans


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and prctl")
def test_a_sigkilled_owner_s_processes_are_ended_by_its_guard(tmp_path):
    """`kill -9` on scripts/run.py used to leave its SuperLink and simulation running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGKILLED, str(tmp_path / "log")], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    callers, guard, *ours = (int(p) for p in proc.stdout.readline().split())
    try:
        assert proc.wait(30) == -9
        assert len(ours) == 3  # the session leader (sleep 301), its sleeper, the adopted orphan
        deadline = time.monotonic() + 40
        while not all(map(ended, [guard, *ours])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(map(ended, [guard, *ours])), [p for p in ours if not ended(p)]
        assert not ended(callers)  # not the guard's: it ran before the tree
        assert not (tmp_path / "ray-tmp").exists()  # the guard removed it once they ended
    finally:
        subprocess.run(["kill", str(callers), *map(str, ours)], check=False)
        proc.stdout.close()


def test_a_signal_reaches_only_the_process_that_was_seen():
    """A PID is reused once its process ends: the cleanup signals by PID and start time, so a
    process that took over a noted PID (another start time) is never hit."""
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        started = start_time(sleeper.pid)
        assert started is not None and processes_below(set())[sleeper.pid] == started
        assert not send_signal(sleeper.pid, str(int(started) + 1), signal.SIGTERM)
        time.sleep(0.3)
        assert sleeper.poll() is None  # a stranger under that PID: spared
        assert send_signal(sleeper.pid, started, signal.SIGTERM)
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        assert not send_signal(sleeper.pid, started, signal.SIGTERM)  # reaped: gone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_without_pidfds_the_signal_still_goes_to_the_process_that_was_seen(monkeypatch):
    """A kernel before Linux 5.3 has no pidfd_open (ENOSYS): the cleanup must still end its
    processes (PID and start time checked, then signalled), not take them for gone."""
    import errno
    import os

    def no_pidfds(pid):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        started = start_time(sleeper.pid)
        assert not send_signal(sleeper.pid, str(int(started) + 1), signal.SIGTERM)
        assert send_signal(sleeper.pid, started, signal.SIGTERM)
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_still_listed_running_after_its_stream_is_waited_for(monkeypatch, tmp_path, capsys):
    """`flwr run --stream` can return while the SuperLink still lists the run as running (Ray
    shutting down on a busy machine): the outcome waits for the final status."""
    import scripts.run as run_script

    statuses = iter(["running", "running", "finished:completed"])
    monkeypatch.setattr(run_script, "flwr_runs", lambda env: [{"status": next(statuses)}])
    monkeypatch.setattr(run_script.time, "sleep", lambda s: None)
    assert run_script.outcome({}, tmp_path / "log") == 0

    failed = [{"status": "finished:failed", "status-details": "boom"}]
    monkeypatch.setattr(run_script, "flwr_runs", lambda env: failed)
    assert run_script.outcome({}, tmp_path / "log") == 1
    assert "FAILED: the run finished:failed boom" in capsys.readouterr().out

    monkeypatch.setattr(run_script, "flwr_runs", lambda env: [{"status": "running"}])
    assert run_script.outcome({}, tmp_path / "log", grace=0.0) == 1
    assert "still running 0 s after its log stream ended" in capsys.readouterr().out

    # A loaded machine: the run's process took minutes to end after the stream (a finished
    # run, written to disk, was called failed after a fixed 120 s). While it lives, no limit.
    ending = iter([True] * 500 + [False])
    statuses = iter(["running"] * 500 + ["finished:completed"])
    monkeypatch.setattr(run_script, "flwr_runs", lambda env: [{"status": next(statuses)}])
    assert (
        run_script.outcome({}, tmp_path / "log", grace=0.0, still_ending=lambda: next(ending)) == 0
    )
    assert "waiting for the run's process to end" in capsys.readouterr().out

    # A SuperLink SIGKILLed mid-run: `flwr list` stops answering. It said "never submitted".
    answers = iter([[{"status": "running"}], None, [{"status": "running"}], None, None, None])
    monkeypatch.setattr(run_script, "flwr_runs", lambda env: next(answers))
    assert run_script.outcome({}, tmp_path / "log") == 1
    said = capsys.readouterr().out
    assert "FAILED: the run status unknown: the SuperLink stopped answering" in said
    assert "never submitted" not in said


def test_flwr_list_without_an_answer_is_told_from_an_empty_list(tmp_path):
    """Flower's CLI prints ``"success": false`` (exit 0) when it reaches no SuperLink."""
    from scripts.run import flwr_env, flwr_runs

    assert flwr_runs(flwr_env(tmp_path / "home")) is None  # no such connection configured


def test_the_simulation_process_is_found_below_the_runner(tmp_path):
    """The outcome's wait knows the ServerApp's process by the name Flower starts it with."""
    import scripts.run as run_script

    fake = tmp_path / run_script.SIMULATION_PROCESS
    fake.write_text("import time\ntime.sleep(300)\n")
    assert not run_script.simulation_alive()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", run_script.SIMULATION_PROCESS]
    )  # argv[2]: not its name
    try:
        time.sleep(0.2)
        assert not run_script.simulation_alive()
    finally:
        proc.kill()
        proc.wait()
    proc = subprocess.Popen([sys.executable, str(fake)])  # as a console script runs
    try:
        time.sleep(0.2)
        assert run_script.simulation_alive()
    finally:
        proc.kill()
        proc.wait()


def test_a_run_config_the_app_refuses_is_named_before_anything_starts(tmp_path, capsys):
    """Flower says only "[code: 15] Invalid run configuration." for an unknown key (its name is
    in superlink.log) and a bad value surfaced at the ServerApp's start; run.py names both."""
    from scripts.run import run

    assert run(run_config="mask_ratio=0.9", flwr_home=tmp_path) == 2
    said = capsys.readouterr().out
    assert "refused, nothing started: Unknown config key 'mask_ratio'" in said
    assert "mask-ratio" in said  # the allowed keys are listed
    assert run(run_config="depth=6 mask-ratio=1.5", flwr_home=tmp_path) == 2
    assert "'mask-ratio': 1.5. Allowed: a number in (0, 1)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no SuperLink, no config.toml, no log


def test_a_node_count_the_run_cannot_use_is_named_before_anything_starts(tmp_path, capsys):
    """0 virtual nodes, or fewer than a round waits for: the run waited node-wait-timeout
    (300 s) for nodes a simulation never gets."""
    from scripts.run import run

    assert run(num_supernodes=0, flwr_home=tmp_path) == 2
    assert "num-supernodes must be >= 1" in capsys.readouterr().out
    assert run(num_supernodes=5, run_config="clients-per-round=8", flwr_home=tmp_path) == 2
    assert "a round waits for 8 nodes" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_a_resume_the_run_would_refuse_is_named_before_anything_starts(tmp_path, capsys):
    """A resume with a changed key, or on another node count, was refused by the ServerApp,
    after the SuperLink and Ray had started (~80 s on 2 cores); run.py refuses it at once."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.models import initial_state
    from fedmae_flwr.run_outputs import RunOutputs
    from scripts.run import parse_run_config, run

    base = f"output-dir='{tmp_path / 'out'}' run-name='crashed' depth=2 rounds-per-stage=2"
    cfg = resolve_config(parse_run_config([base]))
    outputs = RunOutputs(cfg)  # the crashed run: its config, a checkpoint, its partitions
    state = initial_state(cfg.model, 0)
    outputs.save_checkpoint(1, ArrayRecord({k: Array(np.ascontiguousarray(v.numpy()))
                                            for k, v in state.items()}))  # fmt: skip
    outputs.write_json("partitions.json", {"num-partitions": 100, "num-supernodes": 100})
    home = tmp_path / "home"

    assert run(run_config=f"{base} resume=true mask-ratio=0.5", flwr_home=home) == 2
    said = capsys.readouterr().out
    assert "refused, nothing started: resume: the run in" in said
    assert "mask-ratio: 0.75 -> 0.5" in said
    assert run(num_supernodes=50, run_config=f"{base} resume=true", flwr_home=home) == 2
    assert "Resume with 100 SuperNodes" in capsys.readouterr().out
    assert not home.exists()  # no SuperLink, no config.toml, no log
    # The run's own config on its node count passes the check (and would start the run).
    from scripts.run import run_config_problem

    assert run_config_problem(f"{base} resume=true", 100) is None
    # A server state that would broadcast against the model (or fail mid-round): refused too.
    bad_state = {"stage": np.array([0]), "steps": np.array([1]),
                 "m_t/pos_embed": np.zeros(1), "v_t/pos_embed": np.zeros(1)}  # fmt: skip
    outputs.save_checkpoint(1, ArrayRecord({k: Array(np.ascontiguousarray(v.numpy()))
                                            for k, v in state.items()}), bad_state)  # fmt: skip
    problem = run_config_problem(f"{base} resume=true", 100)
    assert problem and "holds a server state this run cannot continue from" in problem


def test_a_run_config_flower_cannot_parse_is_named_not_a_traceback(tmp_path, capsys):
    """An unquoted string, a key given twice or a stray comma ended in a click traceback (exit
    1). `make run RUN_CONFIG="run-name='mine'"` was one: the Makefile set run-name too."""
    from scripts.run import main, parse_run_config

    for bad in ("dataset=imagefolder", "run-name='a' run-name='b'", "depth=3,"):
        assert main(["--run-config", bad, "--flwr-home", str(tmp_path)]) == 2
        said = capsys.readouterr().out
        assert f"refused, nothing started: --run-config {bad!r} is not what Flower reads" in said
        assert "strings in quotes (dataset='imagefolder')" in said and "Traceback" not in said
    for dropped in ("depth = 3", "depth=3 mask-ratio 0.5"):  # Flower read none / only depth
        assert main(["--run-config", dropped, "--flwr-home", str(tmp_path)]) == 2
        assert "is no key=value pair, and Flower would drop it unread" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    # Several --run-config: a later value wins, as in `flwr run` (the Makefile's defaults first)
    lines = ["output-dir='/o' run-name='fedmae-fmnist'", "run-name='mine' depth=6"]
    assert parse_run_config(lines) == {"output-dir": "/o", "run-name": "mine", "depth": 6}
    assert main([*(a for line in lines for a in ("--run-config", line)), "--run-config",
                 "mask_ratio=0.5", "--flwr-home", str(tmp_path)]) == 2  # fmt: skip
    assert "Unknown config key 'mask_ratio'" in capsys.readouterr().out


def test_the_summary_printed_is_the_run_folder_the_config_names(tmp_path, capsys):
    from scripts.run import print_run_summary

    lines = [f"output-dir='{tmp_path}' run-name='fedmae-fmnist'", "run-name='mine'"]
    assert print_run_summary(lines) == 1
    assert f"No summary at {tmp_path / 'mine' / 'summary.json'}" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    stage = {"blocks": 1, "psnr": 11.0, "trivial-psnr": 9.0}
    summary = {"run-name": "mine", "depth": 1, "rounds": 1, "wall-seconds": 3.0,
               "stages": [stage], "linear-probe-accuracy": {}, "knn-accuracy": {},
               "finetune-accuracy": {}, "communication": {"bytes-up-total": 1, "bytes-down-total":
               1, "prefix-sends": 0, "rejected-replies": 0},
               "downstream": {"skipped": "unlabelled source: no downstream accuracy"}}  # fmt: skip
    (tmp_path / "mine" / "summary.json").write_text(json.dumps(summary))
    assert print_run_summary(lines) == 0  # an unlabelled source's run is complete
    assert "skipped: unlabelled source" in capsys.readouterr().out
    # a relative output-dir is the repo's (the SuperLink runs the ServerApp there), not the
    # caller's working directory
    from scripts.run import REPO

    assert print_run_summary(["output-dir='outputs-that-is-not-here'"]) == 1
    said = capsys.readouterr().err
    assert f"No summary at {REPO / 'outputs-that-is-not-here' / 'fedmae-fmnist'}" in said
