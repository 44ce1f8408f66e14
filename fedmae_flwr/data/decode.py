"""Decode image files of any PIL mode into uint8 ``[C, size, size]`` tensors, skipping bad ones.

Shared by the image-folder and Hugging Face sources: every image goes through
:func:`to_uint8_chw` (mode -> 1 or 3 channels, shorter side resized to ``size`` with antialiased
bicubic, centre crop), and a file that cannot be decoded is counted and skipped (never fatal), so
one corrupt file in 100,000 does not stop a run.

Truncated files must fail: PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default
(False) and never set here, so a cut-off JPEG or PNG raises on ``load()`` instead of returning a
half-grey image.
"""

from __future__ import annotations

import io
import itertools
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import log
from PIL import Image, ImageOps
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeStats",
    "channel_stats",
    "decode_file",
    "decode_many",
    "decode_source",
    "split_train_test",
    "to_uint8_chw",
]

# Lower-case, with the dot; matched case-insensitively.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)  # fmt: skip
MAX_LOGGED_SKIPS = 20
# Images decoded per submission to the thread pool: bounds the encoded bytes held at once.
CHUNK = 256
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes with an alpha band (or palette transparency) that are composited over black.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA", "P")


@dataclass
class DecodeStats:
    """How many images decoded and how many were skipped, with the first reasons.

    Thread-safe: decoding runs in a thread pool and every worker reports here.
    """

    loaded: int = 0
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def skip(self, name: str, reason: str) -> None:
        """Count a skipped image; keep and log (WARNING) the first ``MAX_LOGGED_SKIPS`` reasons."""
        with self._lock:
            self.skipped += 1
            count = self.skipped
            if count <= MAX_LOGGED_SKIPS:
                self.skipped_files.append(f"{name}: {reason}")
        if count <= MAX_LOGGED_SKIPS:
            log(WARNING, "Skipping image %s: %s", name, reason)
        if count == MAX_LOGGED_SKIPS:
            log(WARNING, "%d images skipped; further skips are counted but not logged", count)

    def add_loaded(self, n: int = 1) -> None:
        with self._lock:
            self.loaded += n

    def summary(self) -> str:
        return f"{self.loaded} images decoded, {self.skipped} skipped"


def _alpha_over_black(rgba: np.ndarray) -> np.ndarray:
    """Composite ``[..., bands + alpha]`` uint8 over black: ``round(c * a / 255)``."""
    color = rgba[..., :-1].astype(np.uint32)
    alpha = rgba[..., -1:].astype(np.uint32)
    return ((color * alpha + 127) // 255).astype(np.uint8)


def _to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> ``L`` or ``RGB`` (8 bit), keeping the information the mode carries."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # 16-bit (and 'I', which older Pillow used for 16-bit PNGs): map 0..65535 to 0..255 by
        # the type's range (x / 257), not clipping, so a bright 16-bit image stays bright.
        array = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.rint(np.clip(array, 0, 65535) / 257.0).astype(np.uint8), "L")
    if mode == "F":
        # Float images are taken to be in [0, 1]; any other range is stretched per image so the
        # image keeps its contrast instead of saturating.
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
        return Image.fromarray(np.rint(array * 255.0).astype(np.uint8), "L")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        # Transparent pixels become black (premultiplied alpha): their hidden colour is
        # arbitrary (often garbage) and black is what the alpha-weighted colour sums to.
        if mode in ("LA", "La"):
            return Image.fromarray(_alpha_over_black(np.asarray(image.convert("LA")))[..., 0])
        return Image.fromarray(_alpha_over_black(np.asarray(image.convert("RGBA"))))
    # CMYK, YCbCr, LAB, HSV, I;16 variants PIL converts itself, ...
    return image.convert("RGB")


def to_uint8_chw(image: Image.Image, channels: int, size: int) -> Tensor:
    """Any PIL image -> uint8 ``[channels, size, size]``.

    Modes: ``1``/``L`` as is; 16-bit (``I;16*``, ``I``) scaled by 1/257; float ``F`` taken as
    [0, 1] (stretched per image when outside); ``RGBA``/``LA``/``P`` with transparency
    composited over **black**; ``CMYK``/``YCbCr``/... via PIL's RGB conversion. ``channels=1``
    is PIL's ITU-R 601-2 luminance, ``channels=3`` RGB (grey replicated).

    Geometry as torchvision's ``Resize(size)`` + ``CenterCrop(size)``: the shorter side becomes
    ``size`` (bicubic, antialiased on downscale), then the centre square is kept. Done in one
    PIL ``resize`` with a source ``box`` so only the kept square is resampled.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = _to_l_or_rgb(image)
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert(target)
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"empty image {width}x{height}")
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    image = image.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # owned, writable, contiguous


def _as_file_or_image(source: Any) -> Image.Image | str | os.PathLike | io.BytesIO:
    """Normalise a source: path, bytes, HF ``{'bytes', 'path'}`` dict, PIL image or array."""
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is None and not path:
            raise ValueError("row holds neither image bytes nor a path")
        source = data if data is not None else path
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source))
    if isinstance(source, Image.Image | str | os.PathLike):
        return source
    array = np.asarray(source)  # an array-valued column (e.g. HF Array3D)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _decode(fp: Any, channels: int, size: int) -> Tensor:
    """Open an (open) file object or take a PIL image, load it fully, convert."""
    image = fp if isinstance(fp, Image.Image) else Image.open(fp)
    # JPEG can decode at 1/2, 1/4 or 1/8 scale in the DCT, far faster than full size then resize;
    # draft never goes below the requested size, so the shorter side stays >= size.
    if image.format == "JPEG":
        image.draft("L" if channels == 1 else "RGB", (size, size))
    image.load()  # Decode now, inside the caller's try: truncated data raises here.
    # Camera photos store their rotation in EXIF (HF datasets' Image feature applies it too).
    image = ImageOps.exif_transpose(image)
    return to_uint8_chw(image, channels, size)


def decode_source(
    source: Any, name: str, channels: int, size: int, stats: DecodeStats
) -> Tensor | None:
    """:func:`to_uint8_chw` of any image ``source``; ``None`` (counted in ``stats``) on failure.

    Any exception (zero-byte, truncated, not an image, ``DecompressionBombError``, odd mode) is a
    skip, not an error: one bad file should not end a federated run.
    """
    try:
        source = _as_file_or_image(source)
        if isinstance(source, str | os.PathLike):
            # Our own handle, closed even for multi-frame files PIL would keep open.
            with open(source, "rb") as f:
                tensor = _decode(f, channels, size)
        else:
            tensor = _decode(source, channels, size)
    except Exception as e:  # every decoder failure is a skip, by design
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        stats.skip(name, reason)
        return None
    stats.add_loaded()
    return tensor


def decode_file(path: str | Path, channels: int, size: int, stats: DecodeStats) -> Tensor | None:
    """Decode one image file to uint8 ``[channels, size, size]``; ``None`` if it is unreadable."""
    return decode_source(Path(path), str(path), channels, size, stats)


def default_workers() -> int:
    """Threads for decoding: PIL releases the GIL while decoding and resampling."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def _chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk


def decode_many(
    sources: Iterable[tuple[str, Any]],
    total: int,
    channels: int,
    size: int,
    stats: DecodeStats,
    num_workers: int = 0,
) -> tuple[Tensor, list[int]]:
    """Decode ``(name, source)`` pairs in a thread pool into one uint8 ``[K, C, size, size]``.

    ``total`` bounds the number of pairs: the output is allocated once (no stacking copy, which
    would double peak memory), and sources are consumed ``CHUNK`` at a time so encoded bytes from a
    Hugging Face table are never all in memory. Returns the images and, for each, the index of its
    pair (skipped pairs are left out).
    """
    out = torch.empty((total, channels, size, size), dtype=torch.uint8)
    kept: list[int] = []
    workers = num_workers or default_workers()

    def work(item: tuple[int, tuple[str, Any]]) -> int | None:
        index, (name, source) = item
        tensor = decode_source(source, name, channels, size, stats)
        if tensor is None:
            return None
        out[index].copy_(tensor)
        return index

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in _chunks(enumerate(sources), CHUNK):
            if chunk[-1][0] >= total:
                raise ValueError(f"more than total={total} sources")
            kept.extend(i for i in pool.map(work, chunk) if i is not None)
    # Compact in place: rows of skipped images are overwritten by the ones after them.
    for dst, src in enumerate(kept):
        if dst != src:
            out[dst] = out[src]
    return out[: len(kept)], kept


def channel_stats(images: Tensor, chunk: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` in [0, 1] units.

    Exact and memory-safe: a 256-bin histogram per channel is accumulated over chunks of
    ``chunk`` images (no float copy of the set; ~4x faster than float sums on CPU), and the
    moments come from the histogram. A constant channel gets std 1.0 (not 0), so normalising
    never divides by zero.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"need a non-empty uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}"
        )
    channels = images.shape[1]
    hist = torch.zeros(channels, 256, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        for c in range(channels):
            hist[c] += torch.bincount(part[:, c].reshape(-1), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(dim=1)
    mean = (hist * values).sum(dim=1) / count
    std = ((hist * values.square()).sum(dim=1) / count - mean.square()).clamp_min(0.0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def split_train_test(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded, per-label (stratified) split of indices: ``round(n * test_fraction)`` of each label.

    Unlabelled sets (all ``-1``) form one group. The same ``labels``, fraction and seed always
    give the same split.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        num_test = round(len(members) * test_fraction)
        test.append(members[:num_test])
        train.append(members[num_test:])
    train_idx = torch.cat(train).sort().values if train else torch.empty(0, dtype=torch.long)
    test_idx = torch.cat(test).sort().values if test else torch.empty(0, dtype=torch.long)
    return train_idx, test_idx
