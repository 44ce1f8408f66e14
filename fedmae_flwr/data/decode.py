"""Decode image files of any PIL mode into uint8 ``[C, size, size]`` tensors, skipping bad ones.

Shared by the image-folder and Hugging Face sources. The steps are torchvision's
(``transforms.v2``): ``Grayscale(1)`` or ``RGB()``, ``Resize(size)`` (shorter side, bicubic,
antialiased), ``CenterCrop(size)``, ``PILToTensor``; before them only what those do not cover
(transparency, 16-bit and float modes) is brought to 8 bits. A file that cannot be decoded is
counted and skipped (never fatal), so one corrupt file in 100,000 does not stop a run.

Truncated files must fail: PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default
(False) and never set here, so a cut-off JPEG or PNG raises on ``load()`` instead of returning a
half-grey image.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import log
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from fedmae_flwr.data.images import ImageSet

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeStats",
    "decode_file",
    "decode_train_test",
    "to_uint8_chw",
]

# Lower-case, with the dot; matched case-insensitively.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)  # fmt: skip
MAX_LOGGED_SKIPS = 20
# Images decoded per submission to the thread pool: bounds the encoded bytes held at once.
CHUNK = 256
# 16-bit modes: scaled to 8 bits by the type's range.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Mode "I" (32-bit integers: TIFFs, int32 arrays; older Pillow opened 16-bit PNGs so) says
# nothing of the range its values use: read at the smallest of 8 / 16 / 32 bits that holds them,
# per image (so a dark 16-bit frame stored as int32, all values <= 255, reads as 8-bit).
_I_MODE_DIVISORS = ((255, 1), (65535, 256), (2**31 - 1, 2**23))


_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


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
        # PIL names the in-memory buffer it read ('cannot identify image file <_io.BytesIO
        # object at 0x7f...>'); ``name`` already says which file.
        reason = _BUFFER_REPR.sub("", reason)
        with self._lock:
            self.skipped += 1
            count = self.skipped
            if count <= MAX_LOGGED_SKIPS:
                self.skipped_files.append(f"{name}: {reason}")
        if count <= MAX_LOGGED_SKIPS:
            log(WARNING, "Skipping image %s: %s", name, reason)
        if count == MAX_LOGGED_SKIPS:
            log(WARNING, "%d images skipped; further skips are counted but not logged", count)

    def add_loaded(self) -> None:
        with self._lock:
            self.loaded += 1

    def summary(self) -> str:
        return f"{self.loaded} images decoded, {self.skipped} skipped"


def _as_8_bit(image: Image.Image) -> Image.Image:
    """Any PIL mode -> an 8-bit mode without alpha that ``Grayscale`` / ``RGB`` convert as PIL does.

    Transparent pixels (alpha, or a palette's transparent index) are composited over black:
    their hidden colour is arbitrary (often garbage), and black is what the alpha-weighted colour
    sums to. 16-bit images keep their contrast (``x >> 8``, as ``ToDtype(uint8, scale=True)``)
    instead of clipping at 255; 32-bit integer images (mode I) are read at the range their
    values use; float images (mode F) are taken to be in [0, 1].
    """
    if image.mode == "La":  # premultiplied, which PIL converts to RGBA only via LA
        image = image.convert("LA")
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        black = Image.new("RGBA", image.size, "black")
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES:
        return image.convert("I").point(lambda x: x / 256).convert("L")
    if image.mode == "I":
        top = image.getextrema()[1]
        divisor = next(d for limit, d in _I_MODE_DIVISORS if top <= limit)
        return image.point(lambda x: x / divisor).convert("L")  # convert clamps below 0
    if image.mode == "F":
        return image.point(lambda x: x * 255).convert("L")  # convert clamps to 0..255
    return image


@functools.cache
def _transform(channels: int, size: int) -> v2.Compose:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    # All on the PIL image until the last step: PIL converts and resamples with the GIL released
    # for the decode threads, and no small torch kernel competes for the intra-op threads.
    return v2.Compose(
        [
            v2.Grayscale(1) if channels == 1 else v2.RGB(),
            v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.PILToTensor(),
        ]
    )


def to_uint8_chw(image: Image.Image, channels: int, size: int) -> Tensor:
    """Any PIL image -> uint8 ``[channels, size, size]``: shorter side to ``size``, centre crop.

    ``channels=1`` is PIL's luminance (ITU-R 601-2 weights), ``channels=3`` RGB (grey
    replicated). Modes as :func:`_as_8_bit`.
    """
    return _transform(channels, size)(_centre_region(_as_8_bit(image)))


def _centre_region(image: Image.Image) -> Image.Image:
    """``image`` cut to at most twice its shorter side along the longer one, centred.

    The centre crop keeps only the middle ``shorter side`` of it anyway; resizing a strip whole
    first cost memory in proportion to its length (a 5000x1 PNG of 14 kB: +1 GB at size 224).
    Images up to 2:1 pass unchanged, so ordinary photos decode as before.
    """
    width, height = image.size
    keep = 2 * min(width, height)
    if max(width, height) <= keep:
        return image
    left, top = (width - min(width, keep)) // 2, (height - min(height, keep)) // 2
    return image.crop((left, top, left + min(width, keep), top + min(height, keep)))


def _open_image(source: Any, channels: int, size: int) -> Image.Image:
    """A fully loaded PIL image from a path, bytes, HF ``{'bytes', 'path'}`` dict, PIL image or
    array (an array-valued column, e.g. HF ``Array3D``)."""
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is None and not path:
            raise ValueError("row holds neither image bytes nor a path")
        source = data if data is not None else path
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        # Read into memory: no handle left open, even for multi-frame files PIL would keep open.
        source = io.BytesIO(Path(source).read_bytes())
    elif not isinstance(source, Image.Image):
        source = Image.fromarray(np.clip(np.asarray(source), 0, 255).astype(np.uint8))
    image = source if isinstance(source, Image.Image) else Image.open(source)
    # JPEG can decode at 1/2, 1/4 or 1/8 scale in the DCT, far faster than full size then resize;
    # draft never goes below the requested size, so the shorter side stays >= size.
    if image.format == "JPEG":
        image.draft("L" if channels == 1 else "RGB", (size, size))
    elif (
        image.format is not None  # a file PIL has not decoded yet (not an array)
        and Image.MAX_IMAGE_PIXELS is not None  # None: the user turned PIL's limit off
        and image.width * image.height > Image.MAX_IMAGE_PIXELS
    ):
        # PIL only warns up to 2x its limit: a 0.5 MB PNG of 13000 x 13000 took 650 MB (per
        # decoding thread) to give a 32 x 32 image. JPEG decodes at up to 1/8 scale (draft).
        raise ValueError(
            f"{image.width} x {image.height} pixels, over PIL's MAX_IMAGE_PIXELS "
            f"({Image.MAX_IMAGE_PIXELS}): skipped as a possible decompression bomb"
        )
    image.load()  # Decode now, inside the caller's try: truncated data raises here.
    # Camera photos store their rotation in EXIF (HF datasets' Image feature applies it too).
    return ImageOps.exif_transpose(image)


def decode_source(
    source: Any, name: str, channels: int, size: int, stats: DecodeStats
) -> Tensor | None:
    """:func:`to_uint8_chw` of any image ``source``; ``None`` (counted in ``stats``) on failure.

    Any exception (zero-byte, truncated, not an image, ``DecompressionBombError``, odd mode) is a
    skip, not an error: one bad file should not end a federated run.
    """
    try:
        tensor = to_uint8_chw(_open_image(source, channels, size), channels, size)
    except Exception as e:  # every decoder failure is a skip, by design
        stats.skip(name, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        return None
    stats.add_loaded()
    return tensor


def decode_file(path: str | Path, channels: int, size: int, stats: DecodeStats) -> Tensor | None:
    """Decode one image file to uint8 ``[channels, size, size]``; ``None`` if it is unreadable."""
    return decode_source(Path(path), str(path), channels, size, stats)


def default_workers() -> int:
    """Threads for decoding: PIL releases the GIL while decoding and resampling."""
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def _decode_all(
    sources: Iterable[tuple[str, Any]],
    total: int,
    channels: int,
    size: int,
    stats: DecodeStats,
    num_workers: int,
) -> tuple[Tensor, list[int]]:
    """Decode ``(name, source)`` pairs into one uint8 ``[K, C, size, size]`` and the index of
    each kept pair.

    The output is allocated once for ``total`` pairs (stacking would double peak memory) and the
    pairs are consumed ``CHUNK`` at a time, so encoded bytes of a Hugging Face table are never
    all in memory.
    """
    out = torch.empty((total, channels, size, size), dtype=torch.uint8)
    kept: list[int] = []

    def work(item: tuple[int, tuple[str, Any]]) -> int | None:
        index, (name, source) = item
        tensor = decode_source(source, name, channels, size, stats)
        if tensor is None:
            return None
        out[index].copy_(tensor)
        return index

    numbered = enumerate(sources)
    with ThreadPoolExecutor(max_workers=num_workers or default_workers()) as pool:
        while chunk := list(itertools.islice(numbered, CHUNK)):
            if chunk[-1][0] >= total:
                raise ValueError(f"more than total={total} sources")
            kept.extend(i for i in pool.map(work, chunk) if i is not None)
    # Compact in place: rows of skipped images are overwritten by the ones after them.
    for dst, src in enumerate(kept):
        if dst != src:
            out[dst] = out[src]
    return out[: len(kept)], kept


def decode_train_test(
    sources: Iterable[tuple[str, Any]],
    labels: Tensor,
    num_train: int,
    channels: int,
    size: int,
    description: str,
    num_workers: int = 0,
) -> tuple[ImageSet, ImageSet, DecodeStats]:
    """Decode ``(name, source)`` pairs, the first ``num_train`` of them training images, into a
    train and a test :class:`ImageSet` (views of one buffer: no copy of all images).

    Args:
        sources: One pair per entry of ``labels``, train pairs first.
        labels: ``[N]`` int64 label of each pair (``-1``: unlabelled).
        num_train: How many leading pairs are training images.
        channels, size: Output ``[channels, size, size]`` per image.
        description: The source, in the log line and in errors.
        num_workers: Decoding threads; 0 = one per available CPU (at most 16).

    Raises:
        ValueError: No training image decodes.
    """
    if num_train == 0 and len(labels):  # before decoding: the split left no training file
        raise ValueError(
            f"No training image in {description}: all {len(labels)} images are in its test "
            "split (its own test/ folder, or test-fraction of each class: allowed [0, 1), "
            "lower it)."
        )
    stats = DecodeStats()
    start = time.perf_counter()
    images, kept = _decode_all(sources, len(labels), channels, size, stats, num_workers)
    seconds = time.perf_counter() - start
    num_train_kept = sum(1 for i in kept if i < num_train)
    if num_train_kept == 0:
        first = "; ".join(stats.skipped_files[:3])
        raise ValueError(
            f"No decodable training image in {description}: tried {len(labels)} images, "
            f"skipped {stats.skipped}{f' (first: {first})' if first else ''}."
        )
    rate = len(labels) / max(seconds, 1e-9)
    log(INFO, "%s: %s in %.1f s (%.0f images/s)", description, stats.summary(), seconds, rate)
    labels = labels[torch.tensor(kept, dtype=torch.long)]
    train = ImageSet(images[:num_train_kept], labels[:num_train_kept])
    test = ImageSet(images[num_train_kept:], labels[num_train_kept:])
    return train, test, stats
