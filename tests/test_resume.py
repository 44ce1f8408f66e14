"""A crashed server resumes from its last checkpoint and ends where the uninterrupted run ends.

Real strategy and client handlers through the in-process grid; the crash is an exception in
round 3's replies, after round 2's checkpoint was written. Resume refuses another config, falls
back past an unreadable checkpoint, drops a torn last metrics line; a fresh run moves an earlier
run of its name aside instead of mixing with (and pruning against) its checkpoints.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
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


# FedAdam + server-side DP, crashed mid-stage (round 2 of 2 x 2): the checkpoint after round 1
# must hold FedAdam's moments and step, and the model's tensor order (DP draws its noise tensor
# after tensor); either lost gave another model, silently.
MID_STAGE = {"aggregation": "fedadam", "server-lr": 0.05, "dp-noise-multiplier": 0.3,
             "dp-clipping-norm": 5.0}  # fmt: skip


@pytest.mark.parametrize(
    ("algorithm", "extra", "crash_round"),
    [("fedmae", {}, 3), ("fedavg-mae", {}, 3), ("fedmae", MID_STAGE, 2)],
    ids=["fedmae", "fedavg-mae", "fedadam-dp-mid-stage"],
)
def test_a_resumed_run_matches_the_uninterrupted_one(algorithm, extra, crash_round, tiny_overrides):
    # On the CPU: CUDA's nondeterministic kernels (attention backward, say) make two GPU runs of
    # one seed differ in the last bits, resumed or not; what resume itself promises is exactness.
    base = {**tiny_overrides, **extra, "algorithm": algorithm, "evaluate-clients": 0,
            "device": "cpu"}  # fmt: skip
    whole = {**base, "run-name": "whole"}
    run(LocalGrid(6, whole), resolve_config(whole))

    crashed = {**base, "run-name": "crashed"}
    grid = LocalGrid(6, crashed)
    grid.tamper = crash_in_round(grid, crash_round)
    with pytest.raises(ServerCrash):
        run(grid, resolve_config(crashed))
    out = Path(base["output-dir"])
    assert [r["round"] for r in _rows(out / "crashed")] == list(range(1, crash_round))

    resumed = {**crashed, "resume": True}
    summary = run(LocalGrid(6, resumed), resolve_config(resumed))

    rows = _rows(out / "crashed")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]  # each round once
    assert [s["stage"] for s in summary["stages"]] == [0, 1]  # stage 0's PSNR kept from before
    if crash_round == 3 and algorithm == "fedmae":  # resumed in stage 1: the nodes lack block 0
        assert rows[2]["prefix-sends"] == rows[2]["sampled"]
    assert _rows(out / "whole")[-1]["train-loss"] == rows[-1]["train-loss"]
    a = load_file(str(out / "whole" / "backbone.safetensors"))
    b = load_file(str(out / "crashed" / "backbone.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_records_its_nodes_evaluation(tiny_overrides):
    """Stored under Flower's round (1 for a run resumed at round 3) and asked for by the run's
    (4): a resumed run's stage ends lost node-heldout-loss and evaluating-nodes."""
    crashed = {**tiny_overrides, "evaluate-clients": 2, "device": "cpu", "run-name": "evaluated"}
    grid = LocalGrid(6, crashed)
    grid.tamper = crash_in_round(grid, 3)
    with pytest.raises(ServerCrash):
        run(grid, resolve_config(crashed))
    resumed = {**crashed, "resume": True}
    summary = run(LocalGrid(6, resumed), resolve_config(resumed))
    for stage in summary["stages"]:
        assert (stage["evaluating-nodes"], stage["evaluation-rejected"]) == (2, 0), stage
        assert stage["node-heldout-loss"] > 0


def test_resume_without_a_checkpoint_starts_fresh(tiny_overrides):
    overrides = {**tiny_overrides, "run-name": "new", "resume": True}
    summary = run(LocalGrid(6, overrides), resolve_config(overrides))
    assert [r["round"] for r in _rows(Path(overrides["output-dir"]) / "new")] == [1, 2, 3, 4]
    assert len(summary["stages"]) == 2


def test_a_resume_without_a_checkpoint_says_so_where_it_moves_the_folder_aside(
    cpu_overrides, caplog
):
    """It said "start with resume=true to continue it" to a run started with resume=true."""
    from fedmae_flwr.run_outputs import RunOutputs

    cfg = resolve_config({**cpu_overrides, "resume": True})
    RunOutputs(cfg).append_metrics({"round": 1})  # a run that crashed before its checkpoint
    RunOutputs(cfg)
    assert "held an earlier run (no readable checkpoint to resume from); moved it" in caplog.text
    assert "start with resume=true" not in caplog.text


def test_a_resume_without_a_checkpoint_starts_fresh_with_another_config_too(cpu_overrides):
    """A run that died before its first checkpoint, resumed with another batch-size, was
    refused as 'made with another config', though there is nothing to continue: it starts
    fresh (the folder moved aside), as README says and resume=false would."""
    from fedmae_flwr.run_outputs import RunOutputs, run_dir
    from fedmae_flwr.server_app import check_resume

    cfg = resolve_config({**cpu_overrides, "resume": True})
    RunOutputs(cfg).append_metrics({"round": 1})  # config.yaml written, no checkpoint
    other = resolve_config({**cpu_overrides, "resume": True, "batch-size": 16})
    assert check_resume(other, run_dir(other)) is None


def test_resume_is_refused_for_algorithms_without_federated_rounds():
    with pytest.raises(ConfigError, match=re.escape("resume: fedmae | fedavg-mae")):
        resolve_config({"algorithm": "centralized", "resume": True})


# --- resume that can be trusted: config check, fallback, torn lines, no reuse of another run ---


def _checkpoint_rounds(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("round-*"))


def _crashed_run(overrides: dict, server_round: int = 3) -> Path:
    """Run ``overrides`` until the server dies in ``server_round``; the run folder."""
    grid = LocalGrid(6, overrides)
    grid.tamper = crash_in_round(grid, server_round)
    with pytest.raises(ServerCrash):
        run(grid, resolve_config(overrides))
    return Path(overrides["output-dir"]) / overrides["run-name"]


@pytest.fixture
def cpu_overrides(tiny_overrides):
    return {**tiny_overrides, "evaluate-clients": 0, "device": "cpu", "run-name": "crashed"}


def test_resume_refuses_a_run_made_with_another_config(cpu_overrides):
    run_dir = _crashed_run(cpu_overrides)
    changed = {**cpu_overrides, "resume": True, "seed": 1, "lr": 0.01}
    with pytest.raises(ConfigError) as refused:
        run(LocalGrid(6, changed), resolve_config(changed))
    message = str(refused.value)
    assert "seed: 0 -> 1" in message and "lr: 0.001 -> 0.01" in message
    assert "batch-size" not in message  # only the keys that differ
    assert [r["round"] for r in _rows(run_dir)] == [1, 2]  # the run is left as it was
    assert _checkpoint_rounds(run_dir) == [1, 2]

    # Downstream keys only once the run has finished (mid-run, the stage-end k-NN reads them).
    rescored = {**cpu_overrides, "resume": True, "probe-epochs": 3}
    with pytest.raises(ConfigError, match=r"probe-epochs: 5 -> 3.*once the run has finished"):
        run(LocalGrid(6, rescored), resolve_config(rescored))

    # Keys about where and how the run executes may change (RESUME_MAY_DIFFER).
    same = {**cpu_overrides, "resume": True, "round-timeout": 1234.0, "client-threads": 2}
    finished = run(LocalGrid(6, same), resolve_config(same))
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3, 4]

    # A finished run resumed with other downstream keys re-scores its backbone, no round again
    backbone = (run_dir / "backbone.safetensors").read_bytes()
    summary = run(LocalGrid(6, rescored), resolve_config(rescored))
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "backbone.safetensors").read_bytes() == backbone
    assert summary["stages"] == finished["stages"]
    assert "probe-epochs: 3" in (run_dir / "config.yaml").read_text()

    (run_dir / "config.yaml").unlink()  # nothing left to check against: refused too
    with pytest.raises(ConfigError, match=re.escape("no config.yaml")):
        run(LocalGrid(6, same), resolve_config(same))


def test_resume_refuses_a_checkpoint_that_does_not_fit_the_model_before_any_node_gets_it(
    cpu_overrides,
):
    """A checkpoint copied in from a run of another width: config.yaml matches, the tensors do
    not (every node failed on 'size mismatch' inside the round, the cause in a Ray trace)."""
    run_dir = _crashed_run(cpu_overrides)
    other = {**cpu_overrides, "run-name": "wider", "embed-dim": 48}
    wider = _crashed_run(other)
    for name in ("round-0001.safetensors", "round-0002.safetensors"):
        (run_dir / "checkpoints" / name).write_bytes((wider / "checkpoints" / name).read_bytes())
    resumed = {**cpu_overrides, "resume": True}
    grid = LocalGrid(6, resumed)
    with pytest.raises(ConfigError) as refused:
        run(grid, resolve_config(resumed))
    message = str(refused.value)
    assert "the round-2 checkpoint under" in message and "does not fit this run's model" in message
    assert "size mismatch" in message or "shape" in message
    assert grid.sent == [] and [r["round"] for r in _rows(run_dir)] == [1, 2]


def test_resume_falls_back_past_a_truncated_checkpoint(cpu_overrides, caplog):
    whole = {**cpu_overrides, "run-name": "whole"}
    run(LocalGrid(6, whole), resolve_config(whole))
    run_dir = _crashed_run(cpu_overrides)
    newest = run_dir / "checkpoints" / "round-0002.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn by a crash

    resumed = {**cpu_overrides, "resume": True}
    summary = run(LocalGrid(6, resumed), resolve_config(resumed))

    assert f"skipped checkpoint {newest}" in caplog.text
    assert "round-1 checkpoint" in caplog.text
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3, 4]  # round 2 dropped and rerun
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    a = load_file(str(Path(whole["output-dir"]) / "whole" / "backbone.safetensors"))
    b = load_file(str(run_dir / "backbone.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_drops_a_torn_last_metrics_line(cpu_overrides, caplog):
    run_dir = _crashed_run(cpu_overrides)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "clients": 3, "bytes-up-per')  # the crash came mid-write

    resumed = {**cpu_overrides, "resume": True}
    run(LocalGrid(6, resumed), resolve_config(resumed))

    assert "dropped its torn last line 3" in caplog.text
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3, 4]


def test_a_fresh_run_moves_an_earlier_run_aside_and_never_prunes_its_own_checkpoints(
    cpu_overrides,
):
    """The earlier code pruned each new checkpoint as written (older names sort first)."""
    out = Path(cpu_overrides["output-dir"])
    first = {**cpu_overrides, "run-name": "reused"}
    run(LocalGrid(6, first), resolve_config(first))  # finished: checkpoints of rounds 3, 4

    second = {**first, "lr": 0.01}  # a new run under the same name (`make run` twice)
    run_dir = _crashed_run(second)
    assert _checkpoint_rounds(run_dir) == [1, 2]
    assert [r["round"] for r in _rows(run_dir)] == [1, 2]
    assert not (run_dir / "summary.json").exists()
    (earlier,) = (out / ".previous-runs").iterdir()
    assert earlier.name.startswith("reused-")
    assert (earlier / "summary.json").is_file() and _checkpoint_rounds(earlier) == [3, 4]
    assert [r["round"] for r in _rows(earlier)] == [1, 2, 3, 4]

    resumed = {**second, "resume": True}
    run(LocalGrid(6, resumed), resolve_config(resumed))
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3, 4]
    assert _checkpoint_rounds(run_dir) == [3, 4]


def test_checkpoints_that_do_not_read_back_whole_are_skipped(tmp_path, caplog):
    from safetensors.numpy import save_file

    from fedmae_flwr.run_outputs import DIGEST_KEY, latest_checkpoint, tensors_digest

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_file(good, str(folder / "round-0001.safetensors"), metadata={"round": "1"})
    save_file(good, str(folder / "round-0002.safetensors"))  # no round metadata
    save_file(good, str(folder / "round-0003.safetensors"), metadata={"round": "2"})  # misnamed
    (folder / "round-0004.safetensors").write_bytes(b"\0" * 64)  # corrupt
    # Whole and well-formed, but one bit of its data flipped after it was written: the digest.
    meta = {"round": "5", DIGEST_KEY: tensors_digest(good)}
    save_file(good, str(folder / "round-0005.safetensors"), metadata=meta)
    data = bytearray((folder / "round-0005.safetensors").read_bytes())
    data[-3] ^= 0x01
    (folder / "round-0005.safetensors").write_bytes(bytes(data))

    server_round, arrays, *_ = latest_checkpoint(tmp_path)

    assert server_round == 1 and np.array_equal(arrays["w"].numpy(), good["w"])
    assert "round-0005.safetensors: its tensors do not match the digest" in caplog.text
    for r in (2, 3, 4, 5):
        assert f"skipped checkpoint {folder / f'round-000{r}.safetensors'}" in caplog.text
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_a_damaged_metrics_line_before_the_last_is_an_error(tmp_path):
    from fedmae_flwr.run_outputs import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, "tor\n{"round": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert [r["round"] for r in read_metrics(path)] == [1, 2]


def test_a_resume_over_a_damaged_metrics_line_is_refused_before_it_starts(cpu_overrides):
    """It failed with a bare ValueError inside the ServerApp, after Flower and Ray had started
    and the run folder was taken; the pre-check (scripts/run.py's too) now says what to do."""
    from fedmae_flwr.server_app import check_resume

    run_dir = _crashed_run(cpu_overrides)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:20]  # damaged, and not the last line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    cfg = resolve_config({**cpu_overrides, "resume": True})
    with pytest.raises(ConfigError, match=r"metrics\.jsonl cannot be read .* Mend or delete"):
        check_resume(cfg, run_dir)


def test_resuming_removes_checkpoints_after_the_one_it_uses(cpu_overrides):
    from fedmae_flwr.run_outputs import RunOutputs

    cfg = resolve_config({**cpu_overrides, "resume": True})
    outputs = RunOutputs(cfg, resume_round=None)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    for r in (1, 2, 3):
        outputs.save_checkpoint(r, arrays)
    assert _checkpoint_rounds(outputs.dir) == [2, 3]  # KEEP_CHECKPOINTS
    # a server killed between a temp write and its rename left the temp file (a whole
    # checkpoint); each such kill added one, which no later run removed
    killed = outputs.checkpoints / ".round-0004.safetensors.999999999.0123abcd"
    same_pid = outputs.dir / f".summary.json.{os.getpid()}.0123abcd"  # a restart got its pid
    live = outputs.checkpoints / ".round-0004.safetensors.1.0123abcd"  # pid 1 runs: kept
    users = outputs.dir / ".notes.2024.deadbeef"  # named alike, of no file a run writes: kept
    for path in (killed, same_pid, live, users):
        path.write_bytes(b"x" * 64)
    outputs = RunOutputs(cfg, resume_round=2)  # round 3 was unreadable, say
    assert _checkpoint_rounds(outputs.dir) == [2]
    assert not killed.exists() and not same_pid.exists() and live.exists() and users.exists()
    # latest.json named round 3, which is gone
    latest = json.loads((outputs.checkpoints / "latest.json").read_text())
    assert latest == {"round": 2, "file": "round-0002.safetensors"}
    outputs.save_checkpoint(3, arrays)
    assert _checkpoint_rounds(outputs.dir) == [2, 3]


def test_run_outputs_get_the_umask_mode_not_0600(cpu_overrides):
    """Atomic writes went through mkstemp and safetensors' save_file, whose files are 0600: on
    a shared machine no other user could read a run's summary, checkpoints or backbone."""
    import os

    from fedmae_flwr.models import export_backbone
    from fedmae_flwr.run_outputs import RunOutputs
    from fedmae_flwr.server_app import random_init_state

    old, cfg = os.umask(0o022), resolve_config(cpu_overrides)
    try:
        outputs = RunOutputs(cfg)
        written = [
            outputs.write_json("summary.json", {"a": 1}),
            outputs.save_checkpoint(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))})),
        ]
        outputs.append_metrics({"round": 1})
        written.append(outputs.metrics_path)
        written.append(export_backbone(cfg.model, random_init_state(cfg), outputs.dir))
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == dict.fromkeys(
        [p.name for p in written], "0o644"
    )
    assert not [p for p in outputs.dir.rglob(".*") if p.is_file()]  # no temp file left


def test_a_write_that_dies_midway_leaves_the_earlier_file_whole(cpu_overrides, monkeypatch):
    """backbone.safetensors and the pictures were written in place: a resume rewriting them
    and crashing midway left a torn backbone beside a whole checkpoint."""
    from fedmae_flwr.models import export_backbone, load_backbone
    from fedmae_flwr.server_app import random_init_state

    cfg = resolve_config(cpu_overrides)
    folder = Path(cfg.output_dir) / "exported"
    weights = export_backbone(cfg.model, random_init_state(cfg), folder)
    before = weights.read_bytes()
    write_bytes = Path.write_bytes

    def torn(path: Path, data: bytes) -> int:  # the disk fills halfway through the bytes
        write_bytes(path, data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_bytes", torn)
    with pytest.raises(OSError, match="No space left"):
        export_backbone(cfg.model, random_init_state(cfg), folder)
    monkeypatch.undo()
    assert weights.read_bytes() == before and load_backbone(folder) is not None
    assert sorted(p.name for p in folder.iterdir()) == ["backbone.json", "backbone.safetensors"]


def test_resume_with_another_node_count_is_refused_naming_the_run_s_count(tiny_overrides):
    """Resumed on 5 SuperNodes, a run of 6 re-split its images 5 ways: it trained on other
    data, silently, and differed from the run it continued."""
    crashed = {**tiny_overrides, "evaluate-clients": 0, "device": "cpu"}
    grid = LocalGrid(6, crashed)
    grid.tamper = crash_in_round(grid, 3)
    with pytest.raises(ServerCrash):
        run(grid, resolve_config(crashed))
    resumed = {**crashed, "resume": True}
    with pytest.raises(ConfigError, match=r"split its images over 6 partitions on 6 SuperNodes, "
                       r"this simulation has 5 .*Resume with 6 SuperNodes"):  # fmt: skip
        run(LocalGrid(5, resumed), resolve_config(resumed))
    # num-partitions set: the shares stay, the nodes (and so what is sampled) would not
    fixed = {**resumed, "num-partitions": 6, "run-name": "fixed"}
    grid = LocalGrid(6, {**fixed, "resume": False})
    grid.tamper = crash_in_round(grid, 3)
    with pytest.raises(ServerCrash):
        run(grid, resolve_config({**fixed, "resume": False}))
    with pytest.raises(ConfigError, match=r"6 partitions on 6 SuperNodes, this simulation has 5"):
        run(LocalGrid(5, fixed), resolve_config(fixed))
    out = Path(crashed["output-dir"]) / crashed["run-name"]
    assert [r["round"] for r in _rows(out)] == [1, 2]  # nothing of the refused resume
    run(LocalGrid(6, resumed), resolve_config(resumed))
    assert [r["round"] for r in _rows(out)] == [1, 2, 3, 4]


def test_a_run_folder_held_by_a_live_run_is_refused_and_freed_when_that_run_dies(tiny_overrides):
    """A second run of one run-name moved the live run's folder aside and both wrote into the
    new one (metrics interleaved, checkpoints mixed); resume=true after a SuperLink crash ran
    beside the ServerApp Flower had kept alive."""
    import subprocess
    import sys

    config = {**tiny_overrides, "evaluate-clients": 0, "device": "cpu"}
    folder = Path(config["output-dir"]) / config["run-name"]
    run(LocalGrid(6, config), resolve_config(config))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from fedmae_flwr.run_lock import hold_run_folder\n"
         f"with hold_run_folder(Path({str(folder)!r}), flower_run_id=42):\n"
         "    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for again in (config, {**config, "resume": True}):
            with pytest.raises(ConfigError, match=rf"{re.escape(str(folder))} is being written by "
                               rf"a live run \(process {holder.pid} on .*, Flower run 42, "
                               r"started .*another run-name"):  # fmt: skip
                run(LocalGrid(6, again), resolve_config(again))
        assert (folder / "summary.json").is_file()  # not moved aside
        assert not (folder.parent / ".previous-runs").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    run(LocalGrid(6, config), resolve_config(config))
    assert (folder.parent / ".previous-runs").is_dir()  # the finished run moved aside, as ever


def test_resuming_a_finished_run_keeps_what_its_nodes_reported(tiny_overrides):
    """Resumed after its last round, the run re-evaluated and rewrote summary.json with
    data.nodes empty: no node replied this time."""
    config = {**tiny_overrides, "evaluate-clients": 0, "device": "cpu"}
    before = run(LocalGrid(6, config), resolve_config(config))["data"]["nodes"]
    assert before
    resumed = {**config, "resume": True}
    assert run(LocalGrid(6, resumed), resolve_config(resumed))["data"]["nodes"] == before


def test_a_filesystem_without_flock_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    """NFS without lockd refuses flock (ENOLCK): such runs worked before the lock and must go
    on, not fail with a raw OSError (nor leak the lock file's handle)."""
    import errno
    import os

    from fedmae_flwr import run_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    opened = len(os.listdir("/proc/self/fd"))
    with run_lock.hold_run_folder(tmp_path / "run"):
        pass
    assert len(os.listdir("/proc/self/fd")) == opened
    assert "does not guard its folder against a second live run" in caplog.text


def test_a_mid_stage_resume_from_a_checkpoint_without_server_state_says_it_will_differ(caplog):
    """FedAdam resumed after round 2 of a 3-round stage from a checkpoint without its moments
    (written before checkpoints held them) gives another model; said, not silent. With the
    moments, or after a stage's last round, the resume is exact: no warning."""
    from fedmae_flwr.run_outputs import Checkpoint
    from fedmae_flwr.server_app import warn_of_lost_server_state

    model = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    adam = resolve_config({"aggregation": "fedadam", "rounds-per-stage": 3})
    assert warn_of_lost_server_state(adam, Checkpoint(2, model, {}))
    assert "aggregation=fedadam keeps its optimizer's moments" in caplog.text
    assert "they restart at round 3, mid-stage" in caplog.text
    held = {"stage": np.array([0]), "steps": np.array([2]), "m_t/w": np.zeros(3),
            "stage-norm": np.array([1.0])}  # fmt: skip
    assert not warn_of_lost_server_state(adam, Checkpoint(2, model, held))
    assert not warn_of_lost_server_state(adam, Checkpoint(3, model, {}))  # a stage end
    plain = resolve_config({"aggregation": "fedavg", "rounds-per-stage": 3})
    with_norm = {"stage": np.array([0]), "steps": np.array([2]), "stage-norm": np.array([1.0])}
    assert not warn_of_lost_server_state(plain, Checkpoint(2, model, with_norm))
    # without stage-norm (written before checkpoints held it) the update bound is measured
    # against each round's tensors until the stage ends: a reply may be taken that was not
    caplog.clear()
    assert warn_of_lost_server_state(plain, Checkpoint(2, model, {"stage": np.array([0])}))
    assert "lacks the update bound's reference" in caplog.text
    unbounded = resolve_config({"rounds-per-stage": 3, "max-update-norm": 0})
    assert not warn_of_lost_server_state(unbounded, Checkpoint(2, model, {}))
    # DP draws its noise tensor after tensor: a model read back sorted (no recorded order)
    dp = resolve_config({"dp-noise-multiplier": 0.3, "dp-clipping-norm": 5.0})
    assert warn_of_lost_server_state(dp, Checkpoint(3, model, {}, ordered=False))
    assert "server-side DP draws its noise tensor after tensor" in caplog.text
    assert not warn_of_lost_server_state(dp, Checkpoint(3, model, with_norm))


def test_a_checkpoint_reads_back_in_the_run_s_tensor_order_with_its_server_state(cpu_overrides):
    """safetensors reads tensors back sorted by name; the run holds them in its own order."""
    from fedmae_flwr.run_outputs import RunOutputs, load_checkpoint

    outputs = RunOutputs(resolve_config(cpu_overrides))
    names = ["stem.w", "blocks.0.w", "decoder.w", "blocks.1.w"]
    arrays = ArrayRecord({k: Array(np.full(2, i, np.float32)) for i, k in enumerate(names)})
    state = {"stage": np.array([1]), "steps": np.array([4]), "m_t/blocks.1.w": np.ones(2)}
    outputs.save_checkpoint(5, arrays, state)
    checkpoint = load_checkpoint(outputs.dir)
    assert checkpoint.round == 5 and list(checkpoint.arrays.keys()) == names
    assert all(np.array_equal(checkpoint.arrays[k].numpy(), arrays[k].numpy()) for k in names)
    assert checkpoint.server_state.keys() == state.keys()
    assert np.array_equal(checkpoint.server_state["m_t/blocks.1.w"], np.ones(2))


def test_a_resume_names_the_rounds_whose_metrics_lines_were_lost(cpu_overrides, caplog):
    """Each line is fsynced before its checkpoint; a line lost anyway (a file system that lies)
    is named, not passed over in silence."""
    from fedmae_flwr.run_outputs import RunOutputs

    cfg = resolve_config({**cpu_overrides, "resume": True})
    outputs = RunOutputs(cfg, resume_round=None)
    for r in (1, 3):
        outputs.append_metrics({"round": r})
    RunOutputs(cfg, resume_round=3)
    assert "has no line for round(s) 2 of the 3 before its checkpoint" in caplog.text
    caplog.clear()
    outputs.append_metrics({"round": 2})
    RunOutputs(cfg, resume_round=3)
    assert "has no line" not in caplog.text


def test_a_run_resumes_after_a_stage_s_first_round_lost_every_reply(cpu_overrides, caplog):
    """Round 3, the first of stage 1, brought only error replies (every node timed out) and the
    server died in round 4: the round-3 checkpoint named stage 0 (the aggregation marked a
    stage only when it combined), and the resume was refused as 'another config'."""
    from flwr.app import Error, Message

    grid = LocalGrid(6, cpu_overrides)

    def tamper(reply):
        sent = grid.sent[-1]
        server_round = sent.content["config"]["server-round"]
        if server_round == 4:
            raise ServerCrash("server died in round 4")
        return (
            Message(Error(code=0, reason="timed out"), reply_to=sent)
            if server_round == 3
            else reply
        )

    grid.tamper = tamper
    with pytest.raises(ServerCrash):
        run(grid, resolve_config(cpu_overrides))
    run_dir = Path(cpu_overrides["output-dir"]) / cpu_overrides["run-name"]
    assert _checkpoint_rounds(run_dir)[-1] == 3
    assert "round 3: no sound reply with examples (3 rejected" in caplog.text
    state = load_file(run_dir / "checkpoints" / "round-0003.safetensors")
    assert state["server-state/stage"].tolist() == [1]
    resumed = {**cpu_overrides, "resume": True}
    summary = run(LocalGrid(6, resumed), resolve_config(resumed))
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3, 4]
    assert summary["stages"] and len(summary["stages"]) == 2


def test_a_temp_file_this_process_is_writing_is_left_alone(tmp_path):
    """The stale-temp cleanup keyed on the pid alone: a write in progress in this process (or
    another live one) must survive it."""
    from fedmae_flwr.atomic import atomic_write, remove_stale_temp_files

    removed = []

    def write(tmp: str) -> None:
        Path(tmp).write_text("whole")
        removed.extend(remove_stale_temp_files(tmp_path, re.compile(r"out\.txt")))

    atomic_write(tmp_path / "out.txt", write)
    assert removed == [] and (tmp_path / "out.txt").read_text() == "whole"
