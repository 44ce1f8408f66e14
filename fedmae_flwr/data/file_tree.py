"""Walking an image folder as torchvision does, without going round a loop of links.

torchvision's ``make_dataset`` walks with ``os.walk(followlinks=True)``: a link back up the tree
(``cats/all -> ..``) is followed until the OS gives up (~40 levels), so every image under the
link's target is listed dozens of times, under the class of the folder holding the link (a
review's 6 images became 246, 243 of them labelled 'cats'). :func:`walk_files` lists what
``make_dataset`` lists, in its order, except:

- a linked folder whose real path is already on the way down to it (a loop) is not entered;
- a linked folder that is one of the caller's ``class_roots`` (a link from one class into
  another) is not entered: its images belong to that class, not to the one linking to it;
- with ``skip_hidden``, folders whose name starts with '.' are not entered (the image folder
  ignores their files anyway).

Other links are followed, as torchvision does (a class folder on another disk, a folder linked
from two classes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def walk_files(
    top: Path,
    keep: Callable[[str], bool] = lambda _: True,
    class_roots: frozenset[str] = frozenset(),
    skip_hidden: bool = False,
    inside: tuple[str, ...] = (),
) -> tuple[list[Path], int]:
    """The files under ``top`` that ``keep`` accepts, in torchvision's order (sorted by folder
    path, then name), and how many linked folders were skipped (loops, links to a class root).

    ``class_roots`` and ``inside`` (the folders ``top`` is in: the image folder of a class
    folder) are real paths (``os.path.realpath``)."""
    found: list[tuple[str, list[str]]] = []
    skipped = 0
    # The real paths from top down to each folder walked: a folder whose real path is among
    # them is one the walk is already inside.
    chains: dict[str, tuple[str, ...]] = {str(top): (*inside, os.path.realpath(top))}
    for folder, dirs, names in os.walk(top, followlinks=True):
        chain = chains.pop(folder)
        entered = []
        for name in sorted(dirs):
            if skip_hidden and name.startswith("."):
                continue
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if real in chain or (os.path.islink(path) and real in class_roots):
                skipped += 1
                continue
            chains[path] = (*chain, real)
            entered.append(name)
        dirs[:] = entered
        found.append((folder, sorted(names)))
    files = [Path(folder) / name for folder, names in sorted(found) for name in names]
    return [f for f in files if keep(str(f))], skipped
