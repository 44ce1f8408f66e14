"""scripts/pack_device_carry.py's logic without the network, and the built bundle's contents."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from scripts import pack_device_carry as pack

BUNDLE = pack.OUT_DIR / pack.SITE_NAME


def test_prune_removes_rays_unused_parts_and_bytecode(tmp_path):
    for rel in [*pack.PRUNE, "ray/_private", "flwr/cli", "flwr/__pycache__"]:
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "mod.py").write_text("")
    (tmp_path / "ray" / "_private" / "mod.pyc").write_bytes(b"")
    removed = pack.prune(tmp_path, [*pack.PRUNE, "ray/not-there"])
    assert removed == list(pack.PRUNE)
    assert not any((tmp_path / rel).exists() for rel in pack.PRUNE)
    assert (tmp_path / "ray" / "_private" / "mod.py").is_file()
    assert (tmp_path / "ray" / "dashboard").is_dir()  # only its web client goes
    assert not list(tmp_path.rglob("__pycache__")) and not list(tmp_path.rglob("*.pyc"))
    assert (tmp_path / "flwr" / "cli" / "mod.py").is_file()


def test_size_check_names_each_file_and_the_limit(tmp_path):
    a, b = tmp_path / "site.tar.xz", tmp_path / "fashion-mnist.tar.xz"
    a.write_bytes(b"x" * 700)
    b.write_bytes(b"x" * 400)
    assert pack.check_sizes([a, b], limit=1100) == 1100
    with pytest.raises(ValueError, match=r"over the 0\.0 MiB limit") as err:
        pack.check_sizes([a, b], limit=1000)
    assert "site.tar.xz" in str(err.value) and "fashion-mnist.tar.xz" in str(err.value)
    assert "64 MiB" in str(err.value)


def test_requirements_take_pyproject_pins_then_installed_versions():
    pins = pack.pyproject_pins()
    assert pins["flwr"] == "1.41.0"  # flwr[simulation]==1.41.0 too: same pin
    assert {"ray", "omegaconf", "datasets", "flwr-datasets"} <= pins.keys()
    reqs = pack.requirements(
        ["flwr", "Flwr_Datasets", "tomli", "no-such-dist"],
        pins=pins,
        installed=lambda name: "9.9" if name == "tomli" else None,
    )
    assert reqs == [
        "flwr==1.41.0",
        f"Flwr_Datasets=={pins['flwr-datasets']}",
        "tomli==9.9",
        "no-such-dist",
    ]


def test_pyproject_pins_skip_unpinned_and_read_extras(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\n'
        'dependencies = ["a==1", "b>=2", "c[x,y]==3 ; python_version>\'3\'"]\n'
        '[project.optional-dependencies]\nserver = ["Ray==2.55.1"]\n'
    )
    assert pack.pyproject_pins(pyproject) == {"a": "1", "c": "3", "ray": "2.55.1"}


def test_packages_leave_torch_and_timm_to_the_device():
    names = {pack.normalize(n) for n in pack.PACKAGES}
    assert {"flwr", "ray", "omegaconf", "datasets", "flwr-datasets"} <= names
    assert not names & {"torch", "timm", "torchvision", "numpy"}


@pytest.mark.skipif(not BUNDLE.is_file(), reason="no bundle: make device-carry")
def test_bundle_has_the_packages_and_not_the_pruned_parts(tmp_path):
    with tarfile.open(BUNDLE) as tar:
        tar.extractall(tmp_path, filter="tar")
    for package in ("flwr", "ray", "omegaconf", "datasets", "flwr_datasets", "typer"):
        assert (tmp_path / package / "__init__.py").is_file(), package
    assert not any((tmp_path / rel).exists() for rel in pack.PRUNE)
    assert not list(tmp_path.rglob("__pycache__"))
    assert list(tmp_path.glob("flwr-*.dist-info/entry_points.txt"))  # gpu_check.sh's shims
    raylet = next(Path(tmp_path, "ray").rglob("raylet"))
    assert raylet.stat().st_mode & 0o111, "Ray's raylet lost its exec bit"
    data = pack.OUT_DIR / pack.DATA_NAME
    with tarfile.open(data) as tar:
        names = sorted(tar.getnames())
    assert names == sorted(n.removesuffix(".gz") for n in pack.IDX_FILES)
