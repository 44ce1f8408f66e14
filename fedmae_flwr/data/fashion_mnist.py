"""Fashion-MNIST from its idx files (offline: Debian's ``dataset-fashion-mnist`` package)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from fedmae_flwr.data.images import DatasetSplits, ImageSet

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
# Measured over the 60,000 training images.
MEAN, STD = (0.2860,), (0.3530,)
INSTALL_HINT = (
    "Install Debian's package (sudo apt-get install dataset-fashion-mnist, which writes "
    "/usr/share/datasets/fashion-mnist), or set run-config data-path to a folder holding "
    + ", ".join(FILES.values())
)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file: big-endian header of dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # a cut download, a renamed file
        raise ValueError(
            f"{path} does not decompress ({type(err).__name__}: {err}); download it again. "
            f"{INSTALL_HINT}."
        ) from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {tuple(dims)}, has {body.size} bytes")
    return body.reshape(tuple(dims))


def load_fashion_mnist(data_dir: str | Path) -> DatasetSplits:
    """The 60,000 training and 10,000 test images, ``[N, 1, 28, 28]`` uint8."""
    folder = Path(data_dir)
    missing = [name for name in FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {folder} lacks {', '.join(missing)}. {INSTALL_HINT}."
        )
    arrays = {key: read_idx(folder / name) for key, name in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{folder / FILES[f'{split}_images']} holds {images.shape} images but "
                f"{folder / FILES[f'{split}_labels']} {labels.shape} labels: expected [N, 28, 28] "
                f"images and N labels (files of two downloads mixed?). {INSTALL_HINT}."
            )

    def image_set(split: str) -> ImageSet:
        images = torch.from_numpy(arrays[f"{split}_images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
        return ImageSet(images, labels)

    train, test = image_set("train"), image_set("test")
    return DatasetSplits(train, test, MEAN, STD, num_classes=10, loaded=len(train) + len(test))
