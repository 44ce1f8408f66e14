"""The config schema: defaults, presets, run-config overrides and the errors users see."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmae_flwr.config import ConfigError, default_run_config, resolve_config

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_key_with_the_schema_default():
    # Flower rejects overrides of keys absent from [tool.flwr.app.config]: keep them in step.
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == default_run_config()


def test_defaults_and_overrides():
    cfg = resolve_config({})
    assert (cfg.depth, cfg.mask_ratio, cfg.num_rounds) == (4, 0.75, 20)
    cfg = resolve_config({"depth": 6, "rounds-per-stage": 2, "mask-ratio": 0.9})
    assert (cfg.depth, cfg.rounds_per_stage, cfg.mask_ratio, cfg.num_rounds) == (6, 2, 0.9, 12)


def test_unknown_key_names_it_and_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"Unknown config key 'dept'.*Allowed keys:.*depth"):
        resolve_config({"dept": 3})


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"partitioner": "zipf"}, r"'partitioner': 'zipf'. Allowed: iid \| dirichlet"),
        ({"next-block-init": "clone"}, r"'next-block-init'.*Allowed: fresh \| copy"),
        ({"mask-ratio": 1.5}, r"'mask-ratio': 1.5. Allowed: a number in \(0, 1\)"),
        ({"depth": 0}, r"'depth': 0. Allowed: an integer >= 1"),
        ({"depth": "deep"}, r"'depth' in run-config"),
        ({"patch-size": 5}, r"'patch-size': 5. Allowed: a divisor of img-size \(28\)"),
        ({"num-heads": 5}, r"'num-heads'.*divisor of embed-dim"),
    ],
)
def test_bad_values_fail_with_key_and_allowed_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve_config(override)


def test_preset_sits_between_defaults_and_overrides():
    cfg = resolve_config({"preset": "smoke"})
    assert cfg.depth == 2 and cfg.rounds_per_stage == 1
    cfg = resolve_config({"preset": "smoke", "depth": 3})
    assert cfg.depth == 3 and cfg.rounds_per_stage == 1
    # Flower hands the app pyproject's defaults fused with overrides: defaults must not undo it.
    fused = {**default_run_config(), "preset": "smoke"}
    assert resolve_config(fused).depth == 2


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"Unknown preset 'nope'.*Available presets:.*smoke"):
        resolve_config({"preset": "nope"})


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in default_run_config() if f"| `{key}` |" not in readme]
    assert not missing, f"README config table lacks {missing}"


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (Path(__file__).parent.parent / "conf").glob("*.yaml"))
)
def test_every_shipped_preset_resolves_and_validates(preset, tmp_path):
    cfg = resolve_config({"preset": preset, "data-path": str(tmp_path)})
    assert cfg.img_size % cfg.patch_size == 0
