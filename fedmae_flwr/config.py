"""The run configuration: one typed schema, merged from three sources, validated at start.

Sources, later wins: the schema defaults below <- ``conf/<preset>.yaml`` (run-config key
``preset``) <- Flower run-config overrides (``flwr run . --run-config "depth=6 mask-ratio=0.9"``).

Run-config keys are the field names in kebab-case (``rounds_per_stage`` -> ``rounds-per-stage``).
Flower fuses ``[tool.flwr.app.config]`` of pyproject.toml (which lists every key with its schema
default) with the user's overrides before the app sees them, so the app cannot tell an explicit
override from a default: a run-config value counts as an override when it differs from the schema
default. To set a key back to its default under a preset that changes it, edit the preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration key or value that is not allowed; the message names both."""


@dataclass
class FedMAEConfig:
    """Every setting of a run. Field docs live in ``metadata['help']`` (shown in the README)."""

    # --- run -------------------------------------------------------------------------------
    preset: str = field(default="", metadata={"help": "Name of a conf/<preset>.yaml to merge."})
    run_name: str = field(default="fedmae-fmnist", metadata={"help": "Folder under output-dir."})
    output_dir: str = field(default="outputs", metadata={"help": "Root folder of run outputs."})
    seed: int = field(default=0, metadata={"help": "Seed of init, partitions, masks, sampling."})
    algorithm: str = field(
        default="fedmae",
        metadata={
            "help": "fedmae (one-block cascade); baselines on the same data and schedule: "
            "fedavg-mae (full depth end to end), centralized (pooled data, one model), "
            "local (each node alone), random-init (no pretraining).",
            "choices": ("fedmae", "fedavg-mae", "centralized", "local", "random-init"),
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue output-dir/run-name from its last checkpoint (fedmae, fedavg-mae); "
            "a run without one starts fresh."
        },
    )
    local_clients: int = field(
        default=2, metadata={"help": "local: nodes trained alone (downstream averaged over them)."}
    )
    # --- data ------------------------------------------------------------------------------
    dataset: str = field(
        default="fashion-mnist",
        metadata={
            "help": "Image source: built-in Fashion-MNIST, a folder of images, a Hugging Face "
            "dataset (hub id or save_to_disk folder).",
            "choices": ("fashion-mnist", "imagefolder", "huggingface"),
        },
    )
    data_path: str = field(
        default="",
        metadata={
            "help": "fashion-mnist: folder of the idx files ('' = /usr/share/datasets/"
            "fashion-mnist); imagefolder: the folder; huggingface: hub id or local folder."
        },
    )
    image_column: str = field(
        default="", metadata={"help": "Hugging Face image column ('' = detect)."}
    )
    label_column: str = field(
        default="", metadata={"help": "Hugging Face label column ('' = detect; none = unlabelled)."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Share held out as test set when a source has none."}
    )
    partitioner: str = field(
        default="iid",
        metadata={
            "help": "How training images are split over nodes (flwr-datasets partitioners).",
            "choices": ("iid", "dirichlet", "pathological", "shards"),
        },
    )
    dirichlet_alpha: float = field(
        default=0.5, metadata={"help": "Dirichlet concentration over labels (smaller: more skew)."}
    )
    classes_per_partition: int = field(
        default=2, metadata={"help": "pathological: classes per node."}
    )
    shards_per_partition: int = field(default=2, metadata={"help": "shards: shards per node."})
    num_partitions: int = field(
        default=0,
        metadata={
            "help": "Partitions of the training set; 0 = one per node (num-partitions of the node)."
        },
    )
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "Share of each node's images kept for federated evaluation."}
    )
    # --- model -----------------------------------------------------------------------------
    img_size: int = field(default=28, metadata={"help": "Input image side (pixels)."})
    patch_size: int = field(default=4, metadata={"help": "Patch side (pixels); divides img-size."})
    in_chans: int = field(default=1, metadata={"help": "Image channels."})
    embed_dim: int = field(default=192, metadata={"help": "Encoder width."})
    num_heads: int = field(default=3, metadata={"help": "Encoder attention heads."})
    mlp_ratio: float = field(default=4.0, metadata={"help": "Encoder MLP hidden / width."})
    depth: int = field(default=4, metadata={"help": "K: blocks of the final backbone (= stages)."})
    decoder_embed_dim: int = field(default=128, metadata={"help": "Decoder width."})
    decoder_depth: int = field(default=1, metadata={"help": "Decoder blocks."})
    decoder_num_heads: int = field(default=4, metadata={"help": "Decoder attention heads."})
    mask_ratio: float = field(default=0.75, metadata={"help": "Share of patches masked."})
    norm_pix_loss: bool = field(
        default=False, metadata={"help": "Per-patch normalized pixel targets (MAE's norm-pix)."}
    )
    # --- federation schedule ---------------------------------------------------------------
    rounds_per_stage: int = field(default=5, metadata={"help": "R: rounds that train one block."})
    clients_per_round: int = field(default=10, metadata={"help": "Nodes sampled per train round."})
    evaluate_clients: int = field(
        default=5, metadata={"help": "Nodes that evaluate at each stage end; 0 disables."}
    )
    min_available_clients: int = field(
        default=0, metadata={"help": "Nodes to wait for before a round; 0 = clients-per-round."}
    )
    next_block_init: str = field(
        default="fresh",
        metadata={"help": "Init of the next stage's block.", "choices": ("fresh", "copy")},
    )
    decoder_per_stage: str = field(
        default="keep",
        metadata={"help": "Decoder at a stage change.", "choices": ("keep", "reset")},
    )
    # --- local training --------------------------------------------------------------------
    local_epochs: int = field(default=1, metadata={"help": "E: local epochs per round."})
    batch_size: int = field(default=64, metadata={"help": "Local batch size."})
    lr: float = field(default=1e-3, metadata={"help": "Local AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "Local AdamW weight decay."})
    crop_scale_min: float = field(
        default=1.0,
        metadata={"help": "MAE random-resized-crop: smallest area share (MAE: 0.2); 1 = no crop."},
    )
    horizontal_flip: bool = field(
        default=False, metadata={"help": "Random left-right flips in local training."}
    )
    client_threads: int = field(
        default=1, metadata={"help": "torch threads per client process (match client num-cpus)."}
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "Where clients train and the server evaluates; auto = cuda if available.",
            "choices": ("auto", "cpu", "cuda"),
        },
    )
    # --- server-side evaluation ------------------------------------------------------------
    eval_images: int = field(
        default=1000, metadata={"help": "Held-out images for reconstruction PSNR per stage."}
    )
    grid_images: int = field(default=8, metadata={"help": "Images in each reconstruction PNG."})
    probe_train_images: int = field(
        default=10000, metadata={"help": "Labelled training images for the linear probe."}
    )
    probe_epochs: int = field(default=100, metadata={"help": "Linear-probe epochs."})
    stage_knn_images: int = field(
        default=0,
        metadata={"help": "Labelled images for a k-NN accuracy at each stage end; 0 = off."},
    )
    evaluate_random_init: bool = field(
        default=True, metadata={"help": "Also evaluate a random-init backbone downstream."}
    )
    probe_per_block: bool = field(
        default=False, metadata={"help": "Also probe the features after each block."}
    )
    finetune_labels: int = field(
        default=1000, metadata={"help": "Labelled images for fine-tuning; 0 skips fine-tuning."}
    )
    finetune_epochs: int = field(default=30, metadata={"help": "Fine-tuning epochs."})
    finetune_lr: float = field(default=1e-3, metadata={"help": "Fine-tuning AdamW learning rate."})
    finetune_layer_decay: float = field(
        default=1.0,
        metadata={"help": "Fine-tuning lr scale per block towards the input (MAE: 0.75); 1 = off."},
    )
    test_images: int = field(
        default=0, metadata={"help": "Labelled test images for accuracy; 0 = the whole test set."}
    )

    @property
    def num_rounds(self) -> int:
        """Server rounds of the whole run: one stage of R rounds per block."""
        return self.depth * self.rounds_per_stage

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def to_kebab(name: str) -> str:
    return name.replace("_", "-")


def schema_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(FedMAEConfig))


def default_run_config() -> dict[str, bool | int | float | str]:
    """The schema defaults as a flat, kebab-case Flower run-config."""
    defaults = FedMAEConfig()
    return {to_kebab(f.name): getattr(defaults, f.name) for f in schema_fields()}


def _from_kebab(run_config: dict[str, Any]) -> dict[str, Any]:
    known = {to_kebab(f.name): f.name for f in schema_fields()}
    out = {}
    for key, value in run_config.items():
        if key not in known:
            raise ConfigError(
                f"Unknown config key '{key}'. Allowed keys: {', '.join(sorted(known))}."
            )
        out[known[key]] = value
    return out


def _merge(base: Any, update: dict[str, Any], source: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        field_type = {f.name: f.type for f in schema_fields()}.get(str(key), "?")
        raise ConfigError(
            f"Bad value for config key '{to_kebab(str(key))}' in {source}: {err.msg}. "
            f"Expected type: {field_type}."
        ) from None


def load_preset(name: str) -> dict[str, Any]:
    """Read ``conf/<name>.yaml`` as a snake_case dict (keys may be written in kebab-case)."""
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise ConfigError(
            f"Unknown preset '{name}' (no file {path}). Available presets: {', '.join(available)}."
        )
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Preset {path} must be a mapping of config keys to values.")
    if "preset" in raw:
        raise ConfigError(f"Preset {path} may not name another preset.")
    return _from_kebab({to_kebab(str(k)): v for k, v in raw.items()})


def resolve_config(run_config: dict[str, Any] | None = None) -> FedMAEConfig:
    """Build the validated config of a run from Flower's run-config.

    Args:
        run_config: Flower's fused run-config (kebab-case keys, scalar values), or None/empty for
            the schema defaults (``flwr.simulation.run_simulation`` passes an empty one).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value outside what is allowed;
            the message names the key and the allowed values.
    """
    overrides = _from_kebab(dict(run_config or {}))
    defaults = FedMAEConfig()
    # Flower hands us defaults and overrides fused: only values that differ from the schema
    # default are overrides, so that a preset is not undone by pyproject's copy of the defaults.
    overrides = {k: v for k, v in overrides.items() if v != getattr(defaults, k)}
    cfg = OmegaConf.structured(FedMAEConfig)
    preset = overrides.get("preset", "")
    if preset:
        cfg = _merge(cfg, load_preset(str(preset)), f"conf/{preset}.yaml")
    cfg = _merge(cfg, overrides, "run-config")
    resolved: FedMAEConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(resolved)
    return resolved


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(
            f"Bad value for config key '{to_kebab(key)}': {value!r}. Allowed: {allowed}."
        )


def validate(cfg: FedMAEConfig) -> None:
    """Check values against what each key allows; raises ConfigError naming the key."""
    for f in schema_fields():
        choices = f.metadata.get("choices")
        if choices:
            value = getattr(cfg, f.name)
            _require(value in choices, f.name, value, " | ".join(choices))
    positive = (
        "img_size", "patch_size", "in_chans", "embed_dim", "num_heads", "depth",
        "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "rounds_per_stage",
        "clients_per_round", "local_epochs", "batch_size", "client_threads", "eval_images",
        "grid_images", "probe_train_images", "probe_epochs", "finetune_epochs",
        "classes_per_partition", "shards_per_partition", "local_clients",
    )  # fmt: skip
    for key in positive:
        value = getattr(cfg, key)
        _require(value >= 1, key, value, "an integer >= 1")
    for key in ("evaluate_clients", "min_available_clients", "finetune_labels", "test_images",
                "num_partitions", "stage_knn_images"):  # fmt: skip
        value = getattr(cfg, key)
        _require(value >= 0, key, value, "an integer >= 0")
    for key in ("lr", "finetune_lr", "dirichlet_alpha", "mlp_ratio"):
        value = getattr(cfg, key)
        _require(value > 0, key, value, "a number > 0")
    _require(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "a number >= 0")
    _require(
        0 < cfg.finetune_layer_decay <= 1,
        "finetune_layer_decay",
        cfg.finetune_layer_decay,
        "a number in (0, 1]",
    )
    _require(
        0 < cfg.crop_scale_min <= 1, "crop_scale_min", cfg.crop_scale_min, "a number in (0, 1]"
    )
    _require(0 < cfg.mask_ratio < 1, "mask_ratio", cfg.mask_ratio, "a number in (0, 1)")
    _require(
        0 <= cfg.heldout_fraction < 1,
        "heldout_fraction",
        cfg.heldout_fraction,
        "a number in [0, 1)",
    )
    _require(0 < cfg.test_fraction < 1, "test_fraction", cfg.test_fraction, "a number in (0, 1)")
    _require(
        cfg.dataset == "fashion-mnist" or bool(cfg.data_path),
        "data_path",
        cfg.data_path,
        f"a folder (or, for huggingface, a hub id) when dataset is '{cfg.dataset}'",
    )
    _require(
        cfg.img_size % cfg.patch_size == 0,
        "patch_size",
        cfg.patch_size,
        f"a divisor of img-size ({cfg.img_size})",
    )
    _require(
        cfg.embed_dim % cfg.num_heads == 0,
        "num_heads",
        cfg.num_heads,
        f"a divisor of embed-dim ({cfg.embed_dim})",
    )
    _require(
        cfg.decoder_embed_dim % cfg.decoder_num_heads == 0,
        "decoder_num_heads",
        cfg.decoder_num_heads,
        f"a divisor of decoder-embed-dim ({cfg.decoder_embed_dim})",
    )
    _require(
        cfg.embed_dim % 4 == 0 and cfg.decoder_embed_dim % 4 == 0,
        "embed_dim",
        cfg.embed_dim,
        "a multiple of 4 (2-D sin-cos position table), as is decoder-embed-dim",
    )
    _require(
        not cfg.resume or cfg.algorithm in ("fedmae", "fedavg-mae"),
        "resume",
        cfg.resume,
        f"false for algorithm '{cfg.algorithm}' (resume: fedmae | fedavg-mae)",
    )
    keep = int(cfg.num_patches * (1 - cfg.mask_ratio))
    _require(
        keep >= 1,
        "mask_ratio",
        cfg.mask_ratio,
        f"a ratio that keeps >= 1 of {cfg.num_patches} patches",
    )


def to_yaml(cfg: FedMAEConfig) -> str:
    """The fully resolved config, as written to ``outputs/<run>/config.yaml``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
