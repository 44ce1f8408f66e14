"""What a lent GPU machine needs carried to run scripts/gpu_check.sh (docs/gpu.md, "Running the
GPU checks on a lent machine"): it has Python 3.12, PyTorch and timm but no Flower, Ray,
omegaconf or datasets, and no network.

Writes, under ``outputs/device-carry/`` (git-ignored):

- ``site.tar.xz``: the cp312 manylinux wheels of the pinned Flower and Ray and of the
  dependencies that machine lacks (``PACKAGES``), unzipped into one folder (dist-info kept: the
  console-script shims of scripts/gpu_check.sh come from it), Ray's parts the simulation engine
  never imports (``PRUNE``) and every ``*.pyc`` / ``__pycache__`` dropped;
- ``fashion-mnist.tar.xz``: the four Fashion-MNIST idx files, decompressed and packed with xz
  (xz packs them to about two thirds of their gzip size); scripts/device_check.sh gzips them
  again under the idx names.

    .venv/bin/python scripts/pack_device_carry.py      # or: make device-carry

Needs PyPI (``pip download``). Fails when the two files together exceed ``LIMIT_BYTES``: the
carry holds 64 MiB, and the working tree travels with it.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = REPO_ROOT / "pyproject.toml"
OUT_DIR = REPO_ROOT / "outputs" / "device-carry"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
SITE_NAME, DATA_NAME = "site.tar.xz", "fashion-mnist.tar.xz"
LIMIT_BYTES = 60 * 2**20
PYTHON_VERSION = "3.12"  # the lent machine's interpreter
# Wheels for glibc up to 2.28, as PyTorch's own there are (greenlet has no manylinux2014 one).
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")

# Every distribution unzipped into site.tar.xz, and why. The version is pyproject.toml's pin
# where it has one, else the one installed in this venv (what the tests here ran with), else
# pip's newest. The lent machine (2026-12-01) had PyTorch, timm, numpy, grpcio, protobuf,
# pyarrow, pandas, aiohttp, matplotlib, requests, pyyaml, msgpack, ... already; what it lacked
# is listed. scripts/device_check.sh reports any requirement still missing there.
PACKAGES: dict[str, str] = {
    "flwr": "the framework: flwr CLI, SuperLink, SuperExec, simulation engine",
    "ray": "flwr's simulation backend (clients packed on the GPU)",
    "omegaconf": "fedmae_flwr.config (2.4 has no antlr4 dependency any more)",
    "datasets": "flwr-datasets' Hugging Face datasets",
    "flwr-datasets": "partitioners used by fedmae_flwr.data",
    "dill": "datasets",
    "multiprocess": "datasets",
    # flwr's own requirements missing there
    "cryptography": "flwr (SuperLink/SuperNode auth)",
    "cffi": "cryptography",
    "pycparser": "cffi",
    "pycryptodome": "flwr",
    "grpcio-health-checking": "flwr (grpcio itself is there)",
    "iterators": "flwr",
    "tomli": "flwr (pyproject parsing)",
    "tomli-w": "flwr",
    "prompt_toolkit": "flwr CLI",
    "wcwidth": "prompt_toolkit",
    "SQLAlchemy": "flwr SuperLink state database",
    "greenlet": "SQLAlchemy[asyncio]",
    "alembic": "flwr SuperLink database migrations",
    "mako": "alembic",
    "fastapi": "flwr SuperLink's HTTP side",
    "starlette": "fastapi",
    "annotated-doc": "fastapi",
    "pydantic": "fastapi",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic, fastapi",
    "uvicorn": "flwr SuperLink's HTTP server",
    # the `flwr` CLI (scripts/run.py calls `flwr run`, `flwr list`, `flwr stop`): typer and its
    # needs, not needed by the 2026-12-01 run (run_simulation, no CLI), so not known to be there
    "typer": "flwr CLI",
    "shellingham": "typer",
    "rich": "typer, flwr CLI, flwr-datasets",
    "markdown-it-py": "rich",
    "mdurl": "markdown-it-py",
    "pygments": "rich",
    "pathspec": "flwr (FAB building for `flwr run`)",
    # ray's own requirements (click, filelock, jsonschema, msgpack, packaging, protobuf,
    # pyyaml, requests): only jsonschema and its needs were missing there
    "jsonschema": "ray",
    "jsonschema-specifications": "jsonschema",
    "referencing": "jsonschema",
    "rpds-py": "referencing",
}

# Parts of the unzipped tree no run imports: Ray's Java jars, the dashboard's web client and
# its libraries besides core (RLlib, Serve, LLM, Data, Train, Tune, AIR), ~3/4 of its size.
PRUNE = (
    "ray/jars",
    "ray/dashboard/client",
    "ray/rllib",
    "ray/serve",
    "ray/llm",
    "ray/data",
    "ray/train",
    "ray/tune",
    "ray/air",
)


# name, [extras], == version, ; marker
PIN = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*(;.*)?")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_pins(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``name==version`` pins of pyproject.toml's dependencies and extras, by normalized name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    pins = {}
    for spec in specs:
        match = PIN.fullmatch(spec)
        if match:
            pins[normalize(match[1])] = match[3]
    return pins


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements(
    packages: Iterable[str] = PACKAGES,
    pins: dict[str, str] | None = None,
    installed: Callable[[str], str | None] = installed_version,
) -> list[str]:
    """pip requirements for ``packages``: pyproject's pin, else ``installed(name)``, else bare."""
    pins = pyproject_pins() if pins is None else pins
    reqs = []
    for name in packages:
        version = pins.get(normalize(name)) or installed(name)
        reqs.append(f"{name}=={version}" if version else name)
    return reqs


def prune(site: Path, paths: Iterable[str] = PRUNE) -> list[str]:
    """Removes ``paths`` (relative to ``site``) and every ``__pycache__`` / ``*.pyc`` under it;
    returns the ``paths`` that were there."""
    removed = []
    for rel in paths:
        path = site / rel
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(rel)
        elif path.exists():
            path.unlink()
            removed.append(rel)
    for cache in sorted(site.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache, ignore_errors=True)
    for pyc in site.rglob("*.pyc"):
        pyc.unlink()
    return removed


def check_sizes(files: Iterable[Path], limit: int = LIMIT_BYTES) -> int:
    """Their total size in bytes; a ValueError naming each when it exceeds ``limit``."""
    files = list(files)
    total = sum(f.stat().st_size for f in files)
    if total > limit:
        each = ", ".join(f"{f.name} {mib(f.stat().st_size)}" for f in files)
        raise ValueError(
            f"the device carry is {mib(total)} ({each}), over the {mib(limit)} limit (the carry "
            "holds 64 MiB and the working tree travels with it): prune more in PRUNE or drop "
            "packages the lent machine has from PACKAGES"
        )
    return total


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def download_wheels(reqs: list[str], dest: Path) -> list[Path]:
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
        "--dest", str(dest), *reqs,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def xz_tar(source: Path, target: Path) -> None:
    """``source``'s contents (not the folder itself) as ``target``, an xz tarball."""
    tmp = target.with_name(target.name + ".part")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=path.name)
    tmp.replace(target)


def unzip(wheel: Path, dest: Path) -> None:
    """``wheel`` into ``dest``, with the mode bits it records (Ray's raylet and GCS server must
    stay executable; ZipFile.extractall drops them)."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, dest))
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                path.chmod(mode)


def pack_site(out: Path, work: Path) -> Path:
    wheels = download_wheels(requirements(), work / "wheels")
    site = work / "site"
    site.mkdir()
    for wheel in wheels:
        unzip(wheel, site)
    removed = prune(site)
    print(f"[device-carry] {len(wheels)} wheels, pruned {', '.join(removed)}")
    xz_tar(site, out / SITE_NAME)
    return out / SITE_NAME


def pack_data(data_dir: Path, out: Path, work: Path) -> Path:
    raw = work / "fashion-mnist"
    raw.mkdir()
    for name in IDX_FILES:
        source = data_dir / name
        if not source.is_file():
            raise FileNotFoundError(f"{source} missing (make data installs Fashion-MNIST)")
        with gzip.open(source) as src, open(raw / name.removesuffix(".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    xz_tar(raw, out / DATA_NAME)
    return out / DATA_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = [pack_site(args.out, work), pack_data(args.data_dir, args.out, work)]
    for f in files:
        print(f"[device-carry] {f} {mib(f.stat().st_size)}")
    try:
        total = check_sizes(files)
    except ValueError as err:
        print(f"[device-carry] error: {err}", file=sys.stderr)
        return 1
    print(f"[device-carry] {mib(total)} in all, {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
