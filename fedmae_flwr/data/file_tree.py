"""Walking an image folder the way torchvision does, but through each folder only once.

torchvision's ``make_dataset`` walks with ``os.walk(followlinks=True)``: a link back up the tree
(``cats/all -> ..``) is followed until the OS gives up (~40 levels), so every image under the
link's target is listed dozens of times, under the class of the folder holding the link (a
review's 6 images became 246, 243 of them labelled 'cats'). :func:`walk_files` follows links
too (a class folder on another disk is common), but enters each real folder once: a link to a
folder already entered, or to one of the folders the caller says are its own (the root and
every class folder), is skipped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path


def walk_files(
    top: Path, seen: set[str], keep: Callable[[str], bool] = lambda _: True
) -> tuple[list[Path], int]:
    """The files under ``top`` that ``keep`` accepts, in torchvision's order (sorted by folder,
    then name), and how many linked folders were skipped as already entered.

    ``seen`` holds real paths (``os.path.realpath``) not to enter (the caller's own folders);
    the folders entered here are added to it."""
    found: list[tuple[str, list[str]]] = []
    skipped = 0
    seen.add(os.path.realpath(top))
    for folder, dirs, names in os.walk(top, followlinks=True):
        entered = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, name))
            if real in seen:
                skipped += 1
                continue
            seen.add(real)
            entered.append(name)
        dirs[:] = entered
        found.append((folder, sorted(names)))
    files = [Path(folder) / name for folder, names in sorted(found) for name in names]
    return [f for f in files if keep(str(f))], skipped


def real_paths(folders: Iterable[Path]) -> set[str]:
    """The real paths of ``folders`` (for ``seen``)."""
    return {os.path.realpath(folder) for folder in folders}
