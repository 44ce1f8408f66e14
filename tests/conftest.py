"""Shared fixtures: a tiny Fashion-MNIST-format dataset on disk, tiny configs, an in-process Grid.

``LocalGrid`` (tests/local_grid.py's InProcessGrid) is a transport double only: it hands each
message to the REAL ClientApp handlers with a per-node Context (whose ``state`` persists, as
Flower's does), so strategy and client code run unmodified. The real Flower simulation is
exercised in tests/test_simulation.py.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmae_flwr.data.fashion_mnist import FILES

from .local_grid import InProcessGrid

torch.set_num_threads(2)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images whose class (0-9) decides which horizontal band is bright, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, label in enumerate(labels):
        row = 1 + int(label) * 2 + (label // 5)
        images[i, row : row + 4, 4:24] += 180
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="session", autouse=True)
def node_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """The ClientApp's on-disk node cache (fedmae_flwr/data/node_cache.py) in a session folder,
    not the user's ~/.cache; the env var reaches the Flower processes the tests start too."""
    folder = tmp_path_factory.mktemp("node-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("FEDMAE_CACHE_DIR", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def ray_temp_dir():
    """Ray started in this process (``run_simulation``) writes its session folders here, removed
    at the end, instead of into /tmp/ray, where each test run left several behind. A short path
    under /tmp: Ray's socket paths must fit in 107 bytes. The Flower processes the tests start
    through scripts/run.py get a folder of their own."""
    folder = tempfile.mkdtemp(prefix="fedmae-ray-", dir="/tmp")
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_TMPDIR", folder)
    yield Path(folder)
    patch.undo()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in Fashion-MNIST's idx format: 800 train and 200 test synthetic images."""
    folder = tmp_path_factory.mktemp("fmnist")
    for split, n, seed in (("train", 800, 0), ("test", 200, 1)):
        images, labels = synthetic_images(n, seed)
        write_idx(folder / FILES[f"{split}_images"], images)
        write_idx(folder / FILES[f"{split}_labels"], labels)
    return folder


# The tiny model and schedule shared by the in-process runs: 2 blocks x 2 rounds, 3 of 6 nodes.
TINY_FEDERATION = {
    "embed-dim": 32,
    "num-heads": 2,
    "decoder-embed-dim": 16,
    "decoder-num-heads": 2,
    "depth": 2,
    "rounds-per-stage": 2,
    "clients-per-round": 3,
    "evaluate-clients": 2,
    "batch-size": 32,
}


@pytest.fixture
def tiny_overrides(fmnist_dir: Path, tmp_path: Path) -> dict:
    """A small but complete run: 2 blocks x 2 rounds, 3 of 6 nodes per round."""
    return {
        "data-path": str(fmnist_dir),
        "output-dir": str(tmp_path / "outputs"),
        "run-name": "tiny",
        **TINY_FEDERATION,
        "eval-images": 50,
        "grid-images": 4,
        "probe-train-images": 200,
        "probe-epochs": 5,
        "finetune-labels": 50,
        "finetune-epochs": 1,
        "test-images": 100,
    }


# The real client handlers behind an in-process transport (see tests/local_grid.py).
LocalGrid = InProcessGrid
