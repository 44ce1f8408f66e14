"""The config schema: defaults, presets, run-config overrides and the errors users see."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmae_flwr.config import (
    FORMER_DEFAULTS,
    UNSET,
    Algorithm,
    ConfigError,
    default_run_config,
    load_config_yaml,
    resolve_config,
    to_yaml,
)

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_key_as_not_set():
    # Flower rejects overrides of keys absent from [tool.flwr.app.config]; the defaults live in
    # the schema only, so every key there is "" (not set).
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == dict.fromkeys(default_run_config(), UNSET)


def test_defaults_and_overrides():
    cfg = resolve_config({})
    assert (cfg.model.depth, cfg.model.mask_ratio, cfg.num_rounds) == (4, 0.75, 20)
    cfg = resolve_config({"depth": 6, "rounds-per-stage": 2, "mask-ratio": 0.9})
    assert (
        cfg.model.depth,
        cfg.schedule.rounds_per_stage,
        cfg.model.mask_ratio,
        cfg.num_rounds,
    ) == (6, 2, 0.9, 12)


def test_unknown_key_names_it_and_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"Unknown config key 'dept'.*Allowed keys:.*depth"):
        resolve_config({"dept": 3})
    for typo, meant in (("dept", "depth"), ("mask_ratio", "mask-ratio"), ("Depth", "depth")):
        with pytest.raises(ConfigError, match=f"'{typo}' in .*did you mean '{meant}'"):
            resolve_config({typo: 3})
    with pytest.raises(ConfigError) as refused:
        resolve_config({"zzzz": 3})
    assert "did you mean" not in str(refused.value)


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
        # run-name is one folder under output-dir, never a path to move aside or write into
        ({"run-name": "."}, r"'run-name': '.'. Allowed: a plain folder name"),
        ({"run-name": ".."}, r"'run-name': '..'. Allowed: a plain folder name"),
        ({"run-name": "/etc"}, r"'run-name': '/etc'. Allowed: a plain folder name"),
        ({"run-name": "a/b"}, r"'run-name': 'a/b'. Allowed: a plain folder name"),
        ({"run-name": "r" * 201}, r"'run-name': 'rrr.*Allowed: .*at most 200 characters"),
        ({"seed": -1}, r"'seed': -1. Allowed: an integer in \[0, 2\*\*32\)"),
        ({"seed": 2**64}, r"'seed': 18446744073709551616. Allowed: an integer in \[0, 2"),
        ({"decoder-embed-dim": 6, "decoder-num-heads": 2}, r"'decoder-embed-dim': 6. Allowed: a"),
        # output-dir's own folders; a run named so would be moved aside into itself
        ({"run-name": ".locks"}, r"'run-name': '.locks'. Allowed: .*not starting with '\.'"),
        # accepted before: every image was skipped ('channels must be 1 or 3'), then 'No
        # decodable training image', which read as a data problem
        ({"in-chans": 2}, r"'in-chans': 2. Allowed: 1 or 3 \(every image source decodes"),
        ({"lr": float("inf")}, r"'lr': inf. Allowed: a finite number > 0"),
        # inf passed '>= 0': the run ended with a NaN backbone, or failed blaming the nodes
        ({"dp-noise-multiplier": float("inf")}, r"'dp-noise-multiplier': inf. Allowed: a finite"),
        ({"weight-decay": float("inf")}, r"'weight-decay': inf. Allowed: a finite number >= 0"),
        # a validation share of 1 image failed after the whole pretraining
        ({"probe-train-images": 1}, r"'probe-train-images': 1. Allowed: at least 2 while"),
        (
            {"finetune-labels": 1, "finetune-val-fraction": 0.5},
            r"'finetune-labels': 1. Allowed: 0, or at least 2 while finetune-val-fraction > 0",
        ),
        # Flower trims int(0.2 x 3) = 0 replies at each end: a plain mean that one node moves
        (
            {"aggregation": "fedtrimmedavg", "trim-fraction": 0.2, "clients-per-round": 3},
            r"'trim-fraction': 0.2. Allowed: 0, or at least 1 / clients-per-round = 0.333",
        ),
    ],
)
def test_bad_values_fail_with_key_and_allowed_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve_config(override)


def test_preset_sits_between_defaults_and_overrides():
    cfg = resolve_config({"preset": "smoke"})
    assert cfg.model.depth == 2 and cfg.schedule.rounds_per_stage == 1
    cfg = resolve_config({"preset": "smoke", "depth": 3})
    assert cfg.model.depth == 3 and cfg.schedule.rounds_per_stage == 1
    # Flower hands the app pyproject's table ("" = not set) fused with the overrides.
    fused = {**dict.fromkeys(default_run_config(), UNSET), "preset": "smoke"}
    assert resolve_config(fused).model.depth == 2


def test_an_override_sets_a_key_back_to_the_schema_default_under_a_preset():
    assert resolve_config({"preset": "smoke"}).model.depth == 2
    fused = {**dict.fromkeys(default_run_config(), UNSET), "preset": "smoke", "depth": 4}
    assert resolve_config(fused).model.depth == 4 == default_run_config()["depth"]


def test_sections_hold_typed_values_and_enums_compare_as_their_strings():
    cfg = resolve_config({"algorithm": "fedavg-mae", "lr": 1, "next-block-init": "copy"})
    assert cfg.algorithm is Algorithm.FEDAVG_MAE and cfg.algorithm == "fedavg-mae"
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.schedule.next_block_init == "copy"
    with pytest.raises(ConfigError, match=r"'lr' in run-config: True. Expected type: float"):
        resolve_config({"lr": True})


def test_the_written_config_reads_back_equal(tmp_path):
    cfg = resolve_config({"preset": "smoke", "mask-ratio": 0.5, "algorithm": "local"})
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_config_yaml(tmp_path / "config.yaml") == cfg


def test_a_config_yaml_from_before_a_key_reads_back_as_its_run_ran(tmp_path):
    """Runs saved before finetune-head-norm / finetune-augment fine-tuned with a bare head and
    crop + flip; today's defaults (batchnorm, no augmentation) must not be read into them."""
    cfg = resolve_config({"preset": "smoke"})
    flat = [line for line in to_yaml(cfg).splitlines()
            if not line.startswith(("finetune-head-norm:", "finetune-augment:",
                                    "finetune_head_norm:", "finetune_augment:"))]  # fmt: skip
    (tmp_path / "config.yaml").write_text("\n".join(flat) + "\n")
    old = load_config_yaml(tmp_path / "config.yaml")
    assert str(old.eval.finetune_head_norm) == "none" and old.eval.finetune_augment is True
    assert (cfg.eval.finetune_head_norm, cfg.eval.finetune_augment) == ("batchnorm", False)
    assert old == resolve_config({"preset": "smoke", **FORMER_DEFAULTS})


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"Unknown preset 'nope'.*Available presets:.*smoke"):
        resolve_config({"preset": "nope"})


@pytest.mark.parametrize("name", ["../conf/smoke", str(ROOT / "conf" / "smoke"), "./smoke"])
def test_a_preset_is_a_name_not_a_path(name):
    """A path used to load any YAML file the ServerApp could read."""
    with pytest.raises(ConfigError, match=r"Unknown preset .*Available presets:"):
        resolve_config({"preset": name})


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in default_run_config() if f"| `{key}` |" not in readme]
    assert not missing, f"README config table lacks {missing}"


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (Path(__file__).parent.parent / "conf").glob("*.yaml"))
)
def test_every_shipped_preset_resolves_and_validates(preset, tmp_path):
    cfg = resolve_config({"preset": preset, "data-path": str(tmp_path)})
    assert cfg.model.img_size % cfg.model.patch_size == 0


def test_the_table_sync_script_checks_without_writing_and_rewrites_only_when_asked(
    tmp_path, monkeypatch, capsys
):
    """`sync_config_tables.py --check` (or --help) ignored its arguments and rewrote README.md
    and pyproject.toml."""
    import shutil

    from scripts import sync_config_tables as sync

    root = Path(sync.__file__).resolve().parent.parent
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(root / name, tmp_path / name)
    monkeypatch.setattr(sync, "ROOT", tmp_path)
    assert sync.main(["--check"]) == 0
    readme = tmp_path / "README.md"
    stale = readme.read_text().replace("| `depth` |", "| `depth-old` |", 1)
    readme.write_text(stale)
    assert sync.main(["--check"]) == 1
    assert "README.md is out of date" in capsys.readouterr().out
    assert readme.read_text() == stale  # --check writes nothing
    assert sync.main([]) == 0 and "rewrote README.md" in capsys.readouterr().out
    assert sync.main(["--check"]) == 0
    readme.write_text(stale.replace("| meaning |", "| meaning  |"))  # the table's header lost
    with pytest.raises(ValueError, match=r"README\.md: expected its config table once, found 0"):
        sync.main(["--check"])
