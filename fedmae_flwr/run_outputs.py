"""What a run writes to ``outputs/<run-name>/``: config, per-round metrics, checkpoints, plots."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

from fedmae_flwr.config import FedMAEConfig, to_yaml

KEEP_CHECKPOINTS = 2


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder and rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        resume_round: continue a run whose checkpoint is at this round: metric lines of later
            rounds (written after that checkpoint, before a crash) are dropped, earlier ones kept.
            ``None`` starts a fresh log.
    """

    def __init__(self, cfg: FedMAEConfig, resume_round: int | None = None) -> None:
        self.dir = run_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.checkpoints = self.dir / "checkpoints"
        kept = []
        if resume_round is not None and self.metrics_path.is_file():
            kept = [row for row in self.read_metrics() if row["round"] <= resume_round]
        text = "".join(json.dumps(row) + "\n" for row in kept)
        _atomic_write(self.metrics_path, lambda tmp: Path(tmp).write_text(text))
        self.write_text("config.yaml", to_yaml(cfg))

    def write_text(self, name: str, text: str) -> Path:
        path = self.dir / name
        _atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return path

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        return self.write_text(name, json.dumps(_jsonable(data), indent=2) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> Path:
        """``checkpoints/round-<r>.safetensors`` (+ ``latest.json``); older ones pruned."""
        path = self.checkpoints / f"round-{server_round:04d}.safetensors"
        tensors = {k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()}
        _atomic_write(
            path, lambda tmp: save_file(tensors, tmp, metadata={"round": str(server_round)})
        )
        latest = {"round": server_round, "file": path.name}
        _atomic_write(self.checkpoints / "latest.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(latest)))  # fmt: skip
        for old in sorted(self.checkpoints.glob("round-*.safetensors"))[:-KEEP_CHECKPOINTS]:
            old.unlink()
        return path


def has_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / "checkpoints" / "latest.json").is_file()


def load_checkpoint(folder: str | Path) -> tuple[int, ArrayRecord]:
    """The last checkpoint of a run folder: ``(round, global arrays)``."""
    folder = Path(folder) / "checkpoints"
    latest = json.loads((folder / "latest.json").read_text())
    tensors = load_file(str(folder / latest["file"]))
    return int(latest["round"]), ArrayRecord({k: Array(v) for k, v in tensors.items()})


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
    ends = [r for r in rows if "psnr" in r]
    stages = [r["stage"] + 1 for r in ends]
    ax_psnr.plot(stages, [r["psnr"] for r in ends], marker="o", label="FedMAE")
    ax_psnr.plot(stages, [r["trivial-psnr"] for r in ends], ls="--", label="mean of visible pixels")
    ax_psnr.set(xlabel="blocks", ylabel="masked PSNR (dB)", title="Held-out reconstruction")
    ax_psnr.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
