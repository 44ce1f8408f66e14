"""What a run writes to ``outputs/<run-name>/``: config, per-round metrics, checkpoints, plots.

Resume trusts only what it can check (README "Resume after a crash"):

- a resumed run must have the run's own config: :func:`check_resume_config` names every key that
  differs (old -> new), apart from ``RESUME_MAY_DIFFER`` (where the run is, how it waits, how
  many nodes evaluate);
- it continues from the newest checkpoint that reads back whole (:func:`latest_checkpoint`),
  skipping, and logging, a truncated or corrupt one; ``KEEP_CHECKPOINTS`` >= 2 leaves one to
  fall back to;
- a checkpoint holds the model (in its tensor order) and the aggregation's state (a server
  optimizer's moments: :meth:`~fedmae_flwr.strategies.FedMAE.server_state`), so a run resumed
  mid-stage goes on as the uninterrupted one;
- a torn last metrics line (a crash mid-append) is dropped with a warning; each line reaches the
  disk (fsync) before its round's checkpoint is written, and a resume names any round whose
  line is missing;
- a fresh run never reuses or prunes another run's files: a non-empty run folder is moved to
  ``<output-dir>/.previous-runs/<run-name>-<time>/`` first (:meth:`RunOutputs.move_aside`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from logging import WARNING
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log
from safetensors import safe_open
from safetensors.numpy import save_file

from fedmae_flwr.atomic import atomic_write, atomic_write_text, remove_stale_temp_files
from fedmae_flwr.config import ConfigError, FedMAEConfig, load_config_yaml, to_flat, to_yaml

# The newest checkpoints kept; at least 2, so that an unreadable newest one has one to fall back to.
KEEP_CHECKPOINTS = 2
CHECKPOINT_NAME = re.compile(r"round-(\d+)\.safetensors")
# Where a fresh run moves an earlier run's folder of the same name (a hidden folder, so that the
# tools that list run folders, `ls outputs/bench-grid` say, never take it for a run).
PREVIOUS_RUNS = ".previous-runs"
# Run-config keys a resumed run may change: where the run folder is (it is the same folder, by
# construction), which preset spelled the values (the values themselves are compared), and how
# and where the run executes and waits, not what it computes. Every other key must be equal.
# The downstream scores of the finished backbone (probe, k-NN, fine-tune): a finished run
# resumed with other values of these re-scores its backbone under them, without training again.
# Not mid-run: the stage-end k-NN reads its images from the probe and test subsets.
DOWNSTREAM_KEYS = frozenset(
    {"probe-train-images", "probe-epochs", "probe-lr-grid", "probe-val-fraction",
     "evaluate-random-init", "probe-per-block", "finetune-labels", "finetune-epochs",
     "finetune-lr", "finetune-layer-decay", "finetune-augment", "finetune-head-norm",
     "finetune-subsets", "finetune-val-fraction", "finetune-lr-grid", "test-images"}
)  # fmt: skip
RESUME_MAY_DIFFER = frozenset(
    {"resume", "output-dir", "run-name", "preset", "device", "client-threads",
     "node-wait-timeout", "round-timeout",
     # how many nodes measure at stage ends: the model's training does not depend on it
     "evaluate-clients"}
)  # fmt: skip


def _rounds_text(rounds: list[int]) -> str:
    """``1, 2, 5`` (the first ten and a count of the rest)."""
    text = ", ".join(map(str, rounds[:10]))
    return text + (f" and {len(rounds) - 10} more" if len(rounds) > 10 else "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def run_dir(cfg: FedMAEConfig) -> Path:
    """``<output-dir>/<run-name>``, absolute."""
    return Path(cfg.output_dir).expanduser().resolve() / cfg.run_name


class RunOutputs:
    """The run folder and its files; every write is atomic (metrics lines are appended).

    Args:
        resume_round: continue a run whose checkpoint is at this round: metric lines and
            checkpoints of later rounds (written after that checkpoint, before a crash, or
            unreadable) are dropped, earlier ones kept. ``None`` starts a fresh run in an empty
            folder: an earlier run's folder of the same name is moved aside first.
    """

    def __init__(self, cfg: FedMAEConfig, resume_round: int | None = None) -> None:
        self.dir = run_dir(cfg)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.checkpoints = self.dir / "checkpoints"
        if resume_round is None:
            self.move_aside(resuming=cfg.resume)
        self.dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_round is not None:
            if self.metrics_path.is_file():
                kept = [row for row in self.read_metrics() if row["round"] <= resume_round]
            lost = sorted(set(range(1, resume_round + 1)) - {row["round"] for row in kept})
            if lost:  # the checkpoint is whole: the run goes on, these rounds stay unrecorded
                log(WARNING, "resume: %s has no line for round(s) %s of the %d before its "
                    "checkpoint: summary.json's totals (and the stages ending there) will lack "
                    "them", self.metrics_path, _rounds_text(lost), resume_round)  # fmt: skip
            for r, path in checkpoint_files(self.dir).items():
                if r > resume_round:  # skipped as unreadable: the resumed run writes it anew
                    path.unlink()
            used = self.checkpoints / _checkpoint_name(resume_round)
            if used.is_file():  # latest.json may name a later one, unreadable and now gone
                latest = {"round": resume_round, "file": used.name}
                atomic_write_text(self.checkpoints / "latest.json", json.dumps(latest))
            # A server killed mid-write (SIGKILL, OOM) left its temp file: a whole checkpoint
            stale = [p for d, targets in ((self.dir, _RUN_FILES), (self.checkpoints, _CKPT_FILES))
                     if d.is_dir() for p in remove_stale_temp_files(d, targets)]  # fmt: skip
            if stale:
                log(WARNING, "resume: removed %d temp files a killed writer left, e.g. %s",
                    len(stale), stale[0])  # fmt: skip
        text = "".join(json.dumps(row) + "\n" for row in kept)
        atomic_write_text(self.metrics_path, text)
        self.write_text("config.yaml", to_yaml(cfg))

    def move_aside(self, resuming: bool = False) -> Path | None:
        """Move a non-empty run folder to ``.previous-runs/<name>-<time>`` beside it (logged;
        ``resuming``: a ``resume=true`` run that found no readable checkpoint in it)."""
        if not self.dir.is_dir() or not any(self.dir.iterdir()):
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.dir.parent / PREVIOUS_RUNS / f"{self.dir.name}-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = target.with_name(f"{self.dir.name}-{stamp}-{n}")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.dir.rename(target)
        why = ("no readable checkpoint to resume from" if resuming
               else "start with resume=true to continue it")  # fmt: skip
        log(WARNING, "%s held an earlier run (%s); moved it to %s, starting a fresh run",
            self.dir, why, target)  # fmt: skip
        return target

    def write_text(self, name: str, text: str) -> Path:
        path = self.dir / name
        atomic_write_text(path, text)
        return path

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        return self.write_text(name, json.dumps(_jsonable(data), indent=2) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append a round's line, on disk before returning: the round's checkpoint, written
        next, must never outlive its line (a power cut would otherwise lose the line only)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def save_checkpoint(
        self,
        server_round: int,
        arrays: ArrayRecord,
        server_state: dict[str, np.ndarray] | None = None,
    ) -> Path:
        """``checkpoints/round-<r>.safetensors`` (+ ``latest.json``): the model ``arrays``, in
        their order, and the aggregation's ``server_state`` (under ``SERVER_STATE_PREFIX``).

        Keeps the ``KEEP_CHECKPOINTS`` newest up to this round (this one included); any other
        round file is removed: older ones, and stale ones of later rounds.
        """
        path = self.checkpoints / _checkpoint_name(server_round)
        tensors = {k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()}
        if clash := [k for k in tensors if k.startswith(SERVER_STATE_PREFIX)]:
            raise ValueError(f"model tensors named as server state: {clash[:3]}")
        order = list(tensors)
        for key, value in (server_state or {}).items():
            tensors[SERVER_STATE_PREFIX + key] = np.ascontiguousarray(value)
        meta = {"round": str(server_round), DIGEST_KEY: tensors_digest(tensors),
                ORDER_KEY: json.dumps(order)}  # fmt: skip
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        latest = {"round": server_round, "file": path.name}
        atomic_write_text(self.checkpoints / "latest.json", json.dumps(latest))
        files = checkpoint_files(self.dir)
        keep = sorted(r for r in files if r <= server_round)[-KEEP_CHECKPOINTS:]
        for r, old in files.items():
            if r not in keep:
                old.unlink()
        return path


# What a run writes through atomic_write, whose temp files a killed writer may leave behind
_RUN_FILES = re.compile(
    r"metrics\.jsonl|config\.yaml|summary\.json|partitions\.json|.+\.safetensors"
)
_CKPT_FILES = re.compile(r"round-\d+\.safetensors|latest\.json")


def _checkpoint_name(server_round: int) -> str:
    return f"round-{server_round:04d}.safetensors"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl``; a torn last line (a crash mid-append) is dropped, logged.

    Raises:
        ValueError: a line before the last is not a round's JSON object (not a crash: damage).
    """
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                raise ValueError("not a round's JSON object")
        except ValueError as e:
            if i < len(lines):
                raise ValueError(f"{path}, line {i}: {e}: {line[:80]!r}") from e
            log(WARNING, "%s: dropped its torn last line %d (%s): %r", path, i, e, line[:80])
            break
        rows.append(row)
    return rows


# A checkpoint's metadata key for the digest of its tensors: a flipped bit in the data (disk,
# copy) would otherwise read back as a valid, silently different model.
DIGEST_KEY = "sha256"
# Its metadata key for the model tensors' names in the run's order: safetensors reads them back
# sorted, and a resumed run must hold them as the uninterrupted one does (the DP noise is drawn
# tensor after tensor, in that order).
ORDER_KEY = "tensor-order"
# The prefix of the aggregation's state tensors in a checkpoint ("server-state/m_t/<tensor>"): a
# "/" no model tensor name has.
SERVER_STATE_PREFIX = "server-state/"


class Checkpoint(NamedTuple):
    """A checkpoint read back: the round it follows, the model, and the aggregation's state
    (empty in checkpoints written before it was kept, and for the baselines)."""

    round: int
    arrays: ArrayRecord
    server_state: dict[str, np.ndarray]
    # False: written before checkpoints kept the model's tensor order (read back sorted by name)
    ordered: bool = True


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def checkpoint_files(folder: str | Path) -> dict[int, Path]:
    """``{round: path}`` of a run folder's ``checkpoints/round-<r>.safetensors``."""
    found = {}
    for path in (Path(folder) / "checkpoints").glob("round-*.safetensors"):
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def read_checkpoint_file(path: Path, server_round: int) -> Checkpoint:
    """One checkpoint, checked: whole tensors, ``round`` metadata equal to ``server_round``, and
    the tensors' digest where the file has one (checkpoints written before it had none). The
    model's tensors come back in the order they were saved in, where the file records it.

    Raises:
        ValueError: the file is truncated or corrupt, or its metadata names no or another round.
    """
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open)
    except Exception as e:  # safetensors raises its own error types (and OSError)
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e
    if meta.get("round") != str(server_round):
        raise ValueError(f"its metadata names round {meta.get('round')!r}, not {server_round}")
    if not tensors:
        raise ValueError("it holds no tensors")
    if DIGEST_KEY in meta and tensors_digest(tensors) != meta[DIGEST_KEY]:
        raise ValueError("its tensors do not match the digest written with them (damaged data)")
    state = {k[len(SERVER_STATE_PREFIX) :]: v for k, v in tensors.items()
             if k.startswith(SERVER_STATE_PREFIX)}  # fmt: skip
    model = {k: v for k, v in tensors.items() if not k.startswith(SERVER_STATE_PREFIX)}
    if not model:
        raise ValueError("it holds no model tensors")
    order = list(model)
    if ORDER_KEY in meta:
        try:
            order = json.loads(meta[ORDER_KEY])
        except ValueError as e:
            raise ValueError(f"its {ORDER_KEY} metadata is not JSON ({e})") from e
        names = isinstance(order, list) and all(isinstance(k, str) for k in order)
        if not names or sorted(order) != sorted(model):
            raise ValueError(f"its {ORDER_KEY} metadata does not name its model tensors")
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(model[k])) for k in order})
    return Checkpoint(server_round, arrays, state, ordered=ORDER_KEY in meta)


def latest_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The newest checkpoint of a run folder that reads back whole (:class:`Checkpoint`).

    A newer one that does not (truncated, corrupt, without its round metadata) is skipped with
    a warning naming it. None: no readable checkpoint.
    """
    for server_round, path in sorted(checkpoint_files(folder).items(), reverse=True):
        try:
            return read_checkpoint_file(path, server_round)
        except ValueError as e:
            log(WARNING, "resume: skipped checkpoint %s: %s", path, e)
    return None


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """The newest readable checkpoint of a run folder (see :func:`latest_checkpoint`)."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise FileNotFoundError(f"no readable checkpoint under {Path(folder) / 'checkpoints'}")
    return checkpoint


def check_resume_config(folder: str | Path, cfg: FedMAEConfig, finished: bool = False) -> None:
    """Refuse to resume the run in ``folder`` with a config other than its own.

    Compares the flat views of the run's ``config.yaml`` and ``cfg``, apart from
    ``RESUME_MAY_DIFFER`` (and ``DOWNSTREAM_KEYS`` for a ``finished`` run: its checkpoint is
    its last round's, so only its downstream scores are made again). A folder with neither
    ``config.yaml`` nor checkpoints holds no run.

    Raises:
        ConfigError: the keys that differ, each with the run's value and the new one; or
            checkpoints without a ``config.yaml`` (written before any), or one this code
            cannot read.
    """
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        if checkpoint_files(folder):
            raise ConfigError(
                f"resume: {folder} holds checkpoints but no config.yaml to check this config "
                "against; start a new run under another run-name instead"
            )
        return
    try:
        saved = to_flat(load_config_yaml(path))
    except Exception as e:
        raise ConfigError(
            f"resume: cannot read the config of the run in {folder} ({e}); start a new run "
            "under another run-name instead"
        ) from e
    new = to_flat(cfg)
    may_differ = RESUME_MAY_DIFFER | (DOWNSTREAM_KEYS if finished else frozenset())
    differ = [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in new.items()
        if key not in may_differ and saved.get(key) != value
    ]
    if differ:
        raise ConfigError(
            f"resume: the run in {folder} was made with another config ({'; '.join(differ)}). "
            "Resume it with its own settings (its config.yaml), or start a new run under another "
            f"run-name. Keys that may change on resume: {', '.join(sorted(RESUME_MAY_DIFFER))}; "
            "once the run has finished, also the downstream keys "
            f"({', '.join(sorted(DOWNSTREAM_KEYS))}), which re-score its backbone."
        )


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Train loss per round and held-out PSNR per stage (beside the trivial predictor's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(10, 3.6))
    rounds = [r["round"] for r in rows if "train-loss" in r]
    ax_loss.plot(rounds, [r["train-loss"] for r in rows if "train-loss" in r], marker=".")
    for r in rows:
        if r.get("stage-end"):
            ax_loss.axvline(r["round"], color="0.85", lw=0.8, zorder=0)
    ax_loss.set(xlabel="server round", ylabel="client train loss (masked MSE)", title="Training")
    ends = [r for r in rows if r.get("stage-end") and "psnr" in r]
    stages = [r["stage"] + 1 for r in ends]
    ax_psnr.plot(stages, [r["psnr"] for r in ends], marker="o", label="FedMAE")
    ax_psnr.plot(stages, [r["trivial-psnr"] for r in ends], ls="--", label="mean of visible pixels")
    ax_psnr.set(xlabel="blocks", ylabel="masked PSNR (dB)", title="Held-out reconstruction")
    ax_psnr.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
