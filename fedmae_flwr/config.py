"""The run configuration: one typed schema in sections, merged from three sources, checked at start.

Sources, later wins: the schema defaults below <- ``conf/<preset>.yaml`` (run-config key
``preset``) <- Flower run-config overrides (``flwr run . --run-config "depth=6 mask-ratio=0.9"``).

Run-config keys are the field names in kebab-case (``rounds_per_stage`` -> ``rounds-per-stage``),
flat: each key names one field of one section (``depth`` -> ``cfg.model.depth``). Flower only
accepts override keys that pyproject.toml's ``[tool.flwr.app.config]`` lists, and hands the app
that table fused with the overrides. The table therefore lists every key with the value ``""``,
"not set": the defaults live here only, and any value that is not ``""`` is the user's, so a
run-config value wins over a preset even where it equals the schema default.

Each section checks its own values in ``__post_init__``; checks that span sections live in
:class:`FedMAEConfig`. A bad key or value raises :class:`ConfigError` naming the key and what is
allowed. Models, training and evaluation take only their section.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
UNSET = ""  # pyproject's value for every run-config key: "not set by the user"

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A configuration key or value that is not allowed; the message names both."""


class Algorithm(enum.StrEnum):
    FEDMAE = "fedmae"
    FEDAVG_MAE = "fedavg-mae"
    CENTRALIZED = "centralized"
    LOCAL = "local"
    RANDOM_INIT = "random-init"


class Dataset(enum.StrEnum):
    FASHION_MNIST = "fashion-mnist"
    IMAGEFOLDER = "imagefolder"
    HUGGINGFACE = "huggingface"


class Partitioner(enum.StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    PATHOLOGICAL = "pathological"
    SHARDS = "shards"


class NextBlockInit(enum.StrEnum):
    FRESH = "fresh"
    COPY = "copy"


class DecoderPerStage(enum.StrEnum):
    KEEP = "keep"
    RESET = "reset"


class SampleBy(enum.StrEnum):
    """What the strategy orders nodes by before a seeded sample (strategies.node_keys)."""

    NODE_KEY = "node-key"  # asks each node once: the same data at one seed in every run
    NODE_ID = "node-id"  # Flower's ids: no queries, but a new sample in every simulation


class HeadNorm(enum.StrEnum):
    """Feature normalization before the fine-tuning head (evaluation.finetune.head_norm_layer)."""

    BATCHNORM = "batchnorm"
    LAYERNORM = "layernorm"
    NONE = "none"


class Aggregation(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"
    KRUM = "krum"
    MULTIKRUM = "multikrum"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDPROX = "fedprox"


# The algorithms that train through federated rounds (the others are in-process baselines).
FEDERATED = (Algorithm.FEDMAE, Algorithm.FEDAVG_MAE)


class Device(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def to_kebab(name: str) -> str:
    return name.replace("_", "-")


Section = typing.TypeVar("Section")  # a config section dataclass: ModelConfig, TrainConfig, ...


def as_section(cls: type[Section], value: Section | typing.Mapping[str, Any]) -> Section:
    """``value`` as the config section ``cls`` (a mapping's keys in snake_ or kebab-case).

    Raises:
        ConfigError: a key that is no field of ``cls``, or a value its checks refuse.
    """
    if isinstance(value, cls):
        return value
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = {str(k).replace("-", "_"): v for k, v in value.items()}  # type: ignore[union-attr]
    if unknown := sorted(set(given) - fields):
        raise ConfigError(f"Unknown {cls.__name__} fields {unknown}. Allowed: {sorted(fields)}.")
    return cls(**given)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(
        f"Bad value for config key '{to_kebab(key)}': {value!r}. Allowed: {allowed}."
    )


def _check(section: Any, rules: dict[str, tuple[typing.Callable[[Any], bool], str]]) -> None:
    """Raise on the first field of ``section`` whose value breaks its rule."""
    for key, (ok, allowed) in rules.items():
        value = getattr(section, key)
        if not ok(value):
            raise _bad(key, value, allowed)


AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
AT_LEAST_0 = (lambda v: v >= 0, "an integer >= 0")
# run-name is one folder under output-dir: a path ('a/b', '/etc', '..', '.') would put the run,
# and the moving aside of an earlier run of that name, outside it or onto output-dir itself.
# Names starting with '.' are output-dir's own folders (.previous-runs, .locks).
PLAIN_NAME = (
    lambda v: (
        v != "" and not v.startswith(".") and "/" not in v and "\\" not in v and len(v) <= 200
    ),  # room for the suffix of a run moved aside (file names: 255 bytes)
    "a plain folder name (no '/' or '\\', not starting with '.', at most 200 characters), "
    "e.g. fedmae-fmnist",
)
POSITIVE = (lambda v: 0 < v < math.inf, "a finite number > 0")
# seed + partition id seeds torch generators (int64): 2**64 overflowed in the split
SEED = (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
# inf passed ">= 0" and, e.g. as dp-noise-multiplier, turned the whole model into NaN
NON_NEGATIVE = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
OPEN_UNIT = (lambda v: 0 < v < 1, "a number in (0, 1)")
HALF_OPEN_UNIT = (lambda v: 0 < v <= 1, "a number in (0, 1]")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split over nodes."""

    dataset: Dataset = _opt(
        Dataset.FASHION_MNIST,
        "Image source: built-in Fashion-MNIST, a folder of images, a Hugging Face dataset "
        "(hub id or save_to_disk folder).",
    )
    data_path: str = _opt(
        "",
        "fashion-mnist: folder of the idx files ('' = /usr/share/datasets/fashion-mnist); "
        "imagefolder: the folder; huggingface: hub id or local folder.",
    )
    image_column: str = _opt("", "Hugging Face image column ('' = detect).")
    label_column: str = _opt(
        "",
        "Hugging Face label column ('' = detect; no column detected: unlabelled). Negative ids "
        "count as unlabelled images; a test split without labels gives way to test-fraction "
        "of train.",
    )
    test_fraction: float = _opt(0.1, "Share held out as test set when a source has none.")
    partitioner: Partitioner = _opt(
        Partitioner.IID, "How training images are split over nodes (flwr-datasets partitioners)."
    )
    dirichlet_alpha: float = _opt(0.5, "Dirichlet concentration over labels (smaller: more skew).")
    classes_per_partition: int = _opt(2, "pathological: classes per node.")
    shards_per_partition: int = _opt(2, "shards: shards per node.")
    num_partitions: int = _opt(
        0, "Partitions of the training set; 0 = one per node (num-partitions of the node)."
    )
    heldout_fraction: float = _opt(
        0.1,
        "Share of each node's images kept for federated evaluation (rounded; a node keeps at "
        "least one image to train on).",
    )

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "test_fraction": OPEN_UNIT,
                "dirichlet_alpha": POSITIVE,
                "classes_per_partition": AT_LEAST_1,
                "shards_per_partition": AT_LEAST_1,
                "num_partitions": AT_LEAST_0,
                "heldout_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
            },
        )
        if self.dataset != Dataset.FASHION_MNIST and not self.data_path:
            raise _bad(
                "data_path",
                self.data_path,
                f"a folder (or, for huggingface, a hub id) when dataset is '{self.dataset}'",
            )


@dataclass(frozen=True)
class ModelConfig:
    """The ViT backbone and its MAE decoder; ``depth`` is K, the number of stages."""

    img_size: int = _opt(28, "Input image side (pixels).")
    patch_size: int = _opt(4, "Patch side (pixels); divides img-size.")
    in_chans: int = _opt(1, "Image channels.")
    embed_dim: int = _opt(192, "Encoder width.")
    num_heads: int = _opt(3, "Encoder attention heads.")
    mlp_ratio: float = _opt(4.0, "Encoder MLP hidden / width.")
    depth: int = _opt(4, "K: blocks of the final backbone (= stages).")
    decoder_embed_dim: int = _opt(128, "Decoder width.")
    decoder_depth: int = _opt(1, "Decoder blocks.")
    decoder_num_heads: int = _opt(4, "Decoder attention heads.")
    mask_ratio: float = _opt(0.75, "Share of patches masked.")
    norm_pix_loss: bool = _opt(False, "Per-patch normalized pixel targets (MAE's norm-pix).")

    def __post_init__(self) -> None:
        positive = ("img_size", "patch_size", "in_chans", "embed_dim", "num_heads", "depth",
                    "decoder_embed_dim", "decoder_depth", "decoder_num_heads")  # fmt: skip
        _check(self, {key: AT_LEAST_1 for key in positive} | {"mlp_ratio": POSITIVE})
        _check(
            self,
            {
                "mask_ratio": OPEN_UNIT,
                "patch_size": (
                    lambda v: self.img_size % v == 0,
                    f"a divisor of img-size ({self.img_size})",
                ),
                "num_heads": (
                    lambda v: self.embed_dim % v == 0,
                    f"a divisor of embed-dim ({self.embed_dim})",
                ),
                "decoder_num_heads": (
                    lambda v: self.decoder_embed_dim % v == 0,
                    f"a divisor of decoder-embed-dim ({self.decoder_embed_dim})",
                ),
                "embed_dim": (
                    lambda v: v % 4 == 0,
                    "a multiple of 4 (2-D sin-cos position table)",
                ),
                "decoder_embed_dim": (
                    lambda v: v % 4 == 0,
                    "a multiple of 4 (2-D sin-cos position table)",
                ),
            },
        )
        if int(self.num_patches * (1 - self.mask_ratio)) < 1:
            raise _bad(
                "mask_ratio",
                self.mask_ratio,
                f"a ratio that keeps >= 1 of {self.num_patches} patches",
            )

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ScheduleConfig:
    """R rounds per stage, who takes part, and what happens at a stage change."""

    rounds_per_stage: int = _opt(5, "R: rounds that train one block.")
    clients_per_round: int = _opt(10, "Nodes sampled per train round.")
    evaluate_clients: int = _opt(
        5,
        "Nodes that evaluate at each stage end (at most: fewer where fewer are connected); "
        "0 disables.",
    )
    min_available_clients: int = _opt(
        0,
        "Usable nodes a round waits for (0 = clients-per-round). Below clients-per-round a round "
        "trains on whoever is connected, at least this many, up to clients-per-round; above it, "
        "it waits for this many and samples clients-per-round.",
    )
    sample_by: SampleBy = _opt(
        SampleBy.NODE_KEY,
        "Order nodes are sampled in: node-key (each node asked its key once per run: a "
        "simulation +0.2 / +6.7 / +11.8 s at 100 / 1,000 / 2,000 nodes on 2 cores, "
        "docs/node-keys.md; one seed samples the same data in every run) or node-id "
        "(Flower's ids, which a simulation draws anew: no queries, runs "
        "differ).",
    )
    next_block_init: NextBlockInit = _opt(NextBlockInit.FRESH, "Init of the next stage's block.")
    decoder_per_stage: DecoderPerStage = _opt(DecoderPerStage.KEEP, "Decoder at a stage change.")
    node_wait_timeout: float = _opt(
        300.0,
        "Seconds a round waits for enough connected nodes; then the run fails naming the counts.",
    )
    round_timeout: float = _opt(
        3600.0,
        "Seconds a round waits for replies; nodes that have not replied by then are left out.",
    )

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "rounds_per_stage": AT_LEAST_1,
                "clients_per_round": AT_LEAST_1,
                "evaluate_clients": AT_LEAST_0,
                "min_available_clients": AT_LEAST_0,
                "node_wait_timeout": POSITIVE,
                "round_timeout": POSITIVE,
            },
        )


@dataclass(frozen=True)
class TrainConfig:
    """A node's local MAE training (AdamW as MAE: betas 0.9/0.95, no decay on biases/norms)."""

    local_epochs: int = _opt(1, "E: local epochs per round.")
    batch_size: int = _opt(64, "Local batch size.")
    lr: float = _opt(1e-3, "Local AdamW learning rate.")
    weight_decay: float = _opt(0.05, "Local AdamW weight decay.")
    crop_scale_min: float = _opt(
        1.0, "MAE random-resized-crop: smallest area share (MAE: 0.2); 1 = no crop."
    )
    horizontal_flip: bool = _opt(False, "Random left-right flips in local training.")
    client_threads: int = _opt(1, "torch threads per client process (match client num-cpus).")

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "local_epochs": AT_LEAST_1,
                "batch_size": AT_LEAST_1,
                "client_threads": AT_LEAST_1,
                "lr": POSITIVE,
                "weight_decay": NON_NEGATIVE,
                "crop_scale_min": HALF_OPEN_UNIT,
            },
        )


@dataclass(frozen=True)
class EvalConfig:
    """Server-side evaluation: reconstructions per stage, then probe, k-NN and fine-tune.

    The defaults are sized so that ``make run`` evaluates in a few minutes on 2 CPU cores:
    reconstructions, linear probe and k-NN, no fine-tuning. ``preset='full-eval'`` adds the
    fine-tuning protocol of docs/eval-protocol.md (label subsets, lr chosen on validation)."""

    eval_images: int = _opt(1000, "Held-out images for reconstruction PSNR per stage.")
    grid_images: int = _opt(8, "Images in each reconstruction PNG.")
    probe_train_images: int = _opt(5000, "Labelled training images for the linear probe.")
    probe_epochs: int = _opt(50, "Linear-probe epochs.")
    probe_lr_grid: str = _opt(
        "0.1,0.3,1.0",
        "Comma-separated linear-probe lrs chosen between by validation top-1 (a single lr: "
        "no choice); lr 0.1 alone under-trained FedMAE's probe by 1.2-2.0 points at the 5 x 4 "
        "budget, random init's by -0.3 to +1.4 (docs/probe-lr.md).",
    )
    probe_val_fraction: float = _opt(
        0.2, "Share of the probe's training images held out to choose its lr (never the test set)."
    )
    stage_knn_images: int = _opt(
        0, "Labelled images for a k-NN accuracy at each stage end; 0 = off."
    )
    evaluate_random_init: bool = _opt(True, "Also evaluate a random-init backbone downstream.")
    probe_per_block: bool = _opt(False, "Also probe the features after each block.")
    finetune_labels: int = _opt(
        0,
        "Labelled images for fine-tuning; 0 (default: make run's evaluation stays at a few "
        "minutes on 2 CPU cores) skips it; preset='full-eval' fine-tunes 1,000.",
    )
    finetune_epochs: int = _opt(30, "Fine-tuning epochs.")
    finetune_lr: float = _opt(1e-3, "Fine-tuning AdamW learning rate.")
    finetune_layer_decay: float = _opt(
        1.0, "Fine-tuning lr scale per block towards the input (MAE: 0.75); 1 = off."
    )
    finetune_augment: bool = _opt(
        False,
        "Random crop + flip of the fine-tuning batches. Off by default: at 1,000 labels x 30 "
        "epochs it kept the ViT from fitting its labels (docs/finetune-recipe.md).",
    )
    finetune_head_norm: HeadNorm = _opt(
        HeadNorm.BATCHNORM,
        "Normalization of the pooled features before the fine-tuning head (batchnorm: without "
        "affine, as MAE's probe; layernorm: MAE's fc_norm; none).",
    )
    finetune_subsets: int = _opt(
        1, "Disjoint seeded subsets of finetune-labels images; > 1 reports mean and std over them."
    )
    finetune_val_fraction: float = _opt(
        0.0,
        "Share of each fine-tuning subset held out for validation (selects the lr; never the "
        "test set); 0 = none.",
    )
    finetune_lr_grid: str = _opt(
        "",
        "Comma-separated fine-tuning lrs chosen between by validation accuracy "
        "('' = finetune-lr only); more than one needs finetune-val-fraction > 0.",
    )
    test_images: int = _opt(5000, "Labelled test images for accuracy; 0 = the whole test set.")

    def __post_init__(self) -> None:
        at_least_1 = ("eval_images", "grid_images", "probe_train_images", "probe_epochs",
                      "finetune_epochs", "finetune_subsets")  # fmt: skip
        at_least_0 = ("stage_knn_images", "finetune_labels", "test_images")
        _check(
            self,
            {key: AT_LEAST_1 for key in at_least_1}
            | {key: AT_LEAST_0 for key in at_least_0}
            | {"finetune_lr": POSITIVE, "finetune_layer_decay": HALF_OPEN_UNIT}
            | {"finetune_val_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)")}
            | {"finetune_lr_grid": (_lr_grid_ok, "'' or comma-separated numbers > 0")}
            | {"probe_lr_grid": (_probe_grid_ok, "comma-separated numbers > 0")}
            | {"probe_val_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)")},
        )
        if len(self.probe_lrs) > 1 and self.probe_val_fraction == 0:
            raise _bad(
                "probe_lr_grid",
                self.probe_lr_grid,
                "a single lr while probe-val-fraction is 0 (a grid is chosen on validation)",
            )
        if len(self.lr_grid) > 1 and self.finetune_val_fraction == 0:
            raise _bad(
                "finetune_lr_grid",
                self.finetune_lr_grid,
                "a single lr while finetune-val-fraction is 0 (a grid is chosen on validation)",
            )
        # The validation shares need 2 images (one to fit, one to score): accepted before, a
        # probe or fine-tune on 1 failed after the whole pretraining, with no summary.
        if len(self.probe_lrs) > 1 and self.probe_train_images < 2:
            raise _bad(
                "probe_train_images",
                self.probe_train_images,
                "at least 2 while probe-lr-grid holds several lrs (a validation share picks one)",
            )
        if self.finetune_labels == 1 and self.finetune_val_fraction > 0:
            raise _bad("finetune_labels", 1, "0, or at least 2 while finetune-val-fraction > 0")

    def check_labelled_images(self, count: int) -> None:
        """ConfigError where the downstream evaluation cannot run on a source of ``count``
        labelled training images (0: it is skipped), as it would find out after the whole
        pretraining: validation shares of fewer than 2 images, more disjoint fine-tuning
        subsets than the images hold."""
        if count == 0:
            return
        have = f"the source has {count} labelled training images"
        if len(self.probe_lrs) > 1 and min(self.probe_train_images, count) < 2:
            raise ConfigError(
                f"{have}: the linear probe chooses its lr from probe-lr-grid "
                f"'{self.probe_lr_grid}' on a validation share, which needs at least 2. "
                "Set a single lr (probe-lr-grid='0.1') or add labelled images."
            )
        if not self.finetune_labels:
            return
        if self.finetune_subsets > 1 and self.finetune_subsets * self.finetune_labels > count:
            raise ConfigError(
                f"{have}: finetune-subsets={self.finetune_subsets} disjoint subsets of "
                f"finetune-labels={self.finetune_labels} need "
                f"{self.finetune_subsets * self.finetune_labels}. Lower either (allowed: "
                f"subsets x labels <= {count}), or finetune-labels=0 to skip fine-tuning."
            )
        if self.finetune_val_fraction > 0 and min(self.finetune_labels, count) < 2:
            raise ConfigError(
                f"{have}: fine-tuning holds out finetune-val-fraction="
                f"{self.finetune_val_fraction} of its labels for validation, which needs at "
                "least 2. Set finetune-val-fraction=0 or finetune-labels=0, or add images."
            )

    @property
    def probe_lrs(self) -> tuple[float, ...]:
        """The linear-probe lrs to choose between."""
        return _parse_lr_grid(self.probe_lr_grid)

    @property
    def lr_grid(self) -> tuple[float, ...]:
        """The fine-tuning lrs to choose between: the grid, or ``finetune_lr`` alone."""
        return _parse_lr_grid(self.finetune_lr_grid) or (self.finetune_lr,)


def _parse_lr_grid(text: str) -> tuple[float, ...]:
    """``"3e-4, 1e-3"`` -> ``(3e-4, 1e-3)``; ``""`` -> ``()``; ValueError on anything else."""
    return tuple(float(part) for part in text.split(",")) if text.strip() else ()


def _probe_grid_ok(text: str) -> bool:
    """A non-empty lr grid (the probe has no single-lr key to fall back on)."""
    return bool(text.strip()) and _lr_grid_ok(text)


def _lr_grid_ok(text: str) -> bool:
    """A grid string :func:`_parse_lr_grid` reads, with only finite lrs > 0."""
    try:
        lrs = _parse_lr_grid(text)
    except ValueError:
        return False
    return all(0 < lr < float("inf") for lr in lrs)


@dataclass(frozen=True)
class RobustConfig:
    """How the server combines replies, and what it refuses before it does."""

    aggregation: Aggregation = _opt(
        Aggregation.FEDAVG,
        "How the active tensors of sound replies are combined (Flower's strategy of that name).",
    )
    trim_fraction: float = _opt(
        0.2,
        "fedtrimmedavg: share of values cut at each end (beta); 0, or at least "
        "1 / clients-per-round (Flower cuts int(beta x replies)).",
    )
    byzantine_nodes: int = _opt(1, "krum, multikrum: nodes per round assumed malicious.")
    krum_keep: int = _opt(
        0, "multikrum: replies averaged (0 = each round's sound replies - byzantine-nodes)."
    )
    server_lr: float = _opt(0.01, "fedadam, fedyogi: server learning rate (eta).")
    server_tau: float = _opt(1e-3, "fedadam, fedyogi: adaptivity (tau).")
    proximal_mu: float = _opt(
        0.01,
        "fedprox: mu of the proximal term each node adds to its loss (mu/2 x squared L2 "
        "distance to the round's model).",
    )
    dp_noise_multiplier: float = _opt(
        0.0, "Server-side DP: Gaussian noise std as a multiple of the clipping norm; 0 = off."
    )
    dp_clipping_norm: float = _opt(
        1.0, "Server-side DP: L2 bound of each node's update of the active tensors."
    )
    max_update_norm: float = _opt(
        10.0,
        "Reject a reply whose update of the active tensors is longer (L2) than this multiple of "
        "their norm when the stage began; 0 = no bound.",
    )
    max_examples: int = _opt(
        0, "Largest num-examples a node may claim; 0 = the largest partition (none if unknown)."
    )

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "trim_fraction": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
                "byzantine_nodes": AT_LEAST_0,
                "krum_keep": AT_LEAST_0,
                "server_lr": POSITIVE,
                "server_tau": POSITIVE,
                "proximal_mu": NON_NEGATIVE,
                "dp_noise_multiplier": NON_NEGATIVE,
                "dp_clipping_norm": POSITIVE,
                "max_update_norm": NON_NEGATIVE,
                "max_examples": AT_LEAST_0,
            },
        )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "robust": RobustConfig,
}


@dataclass(frozen=True)
class FedMAEConfig:
    """Every setting of a run: what runs where (top level) and one section per concern."""

    preset: str = _opt("", "Name of a conf/<preset>.yaml to merge.")
    run_name: str = _opt("fedmae-fmnist", "Folder under output-dir.")
    output_dir: str = _opt("outputs", "Root folder of run outputs.")
    seed: int = _opt(0, "Seed of init, partitions, masks, sampling.")
    algorithm: Algorithm = _opt(
        Algorithm.FEDMAE,
        "fedmae (one-block cascade); baselines on the same data and schedule: fedavg-mae (full "
        "depth end to end), centralized (pooled data, one model), local (each node alone), "
        "random-init (no pretraining).",
    )
    resume: bool = _opt(
        False,
        "Continue output-dir/run-name from its newest readable checkpoint (fedmae, fedavg-mae) "
        "if its config matches (else an error naming the keys); without one, start fresh. A "
        "fresh run moves an earlier run of its name to output-dir/.previous-runs/.",
    )
    local_clients: int = _opt(2, "local: nodes trained alone (downstream averaged over them).")
    device: Device = _opt(
        Device.AUTO, "Where clients train and the server evaluates; auto = cuda if available."
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)

    def __post_init__(self) -> None:
        _check(self, {"local_clients": AT_LEAST_1, "run_name": PLAIN_NAME, "seed": SEED})
        if self.model.in_chans not in (1, 3):  # ModelConfig alone (the plugin's) takes any
            raise _bad(
                "in-chans",
                self.model.in_chans,
                "1 or 3 (every image source decodes to grey or RGB)",
            )
        trim, per_round = self.robust.trim_fraction, self.schedule.clients_per_round
        if self.robust.aggregation == "fedtrimmedavg" and 0 < trim * per_round < 1:
            # Flower trims int(beta x replies) at each end: 0 here, so any one node moves the mean.
            raise _bad(
                "trim-fraction",
                trim,
                f"0, or at least 1 / clients-per-round = {1 / per_round:.3g} (FedTrimmedAvg cuts "
                f"int(trim-fraction x replies) at each end: {trim:g} x {per_round} cuts none)",
            )
        if self.resume and self.algorithm not in FEDERATED:
            raise _bad(
                "resume",
                self.resume,
                f"false for algorithm '{self.algorithm}' (resume: fedmae | fedavg-mae)",
            )

    @property
    def num_rounds(self) -> int:
        """Server rounds of the whole run: one stage of R rounds per block."""
        return self.model.depth * self.schedule.rounds_per_stage


# --- the flat run-config view ------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One run-config key: the section it lives in ('' = top level) and its field."""

    section: str
    field: dataclasses.Field

    @property
    def name(self) -> str:
        return to_kebab(self.field.name)

    @property
    def type(self) -> Any:
        return _TYPES[(self.section, self.field.name)]

    @property
    def default(self) -> Any:
        owner = SECTIONS[self.section]() if self.section else FedMAEConfig()
        return getattr(owner, self.field.name)

    @property
    def help(self) -> str:
        return self.field.metadata["help"]

    @property
    def choices(self) -> tuple[str, ...]:
        return (
            tuple(self.type)
            if isinstance(self.type, type) and issubclass(self.type, enum.Enum)
            else ()
        )


def _keys() -> dict[str, Key]:
    keys = {
        to_kebab(f.name): Key("", f)
        for f in dataclasses.fields(FedMAEConfig)
        if f.name not in SECTIONS
    }
    for section, cls in SECTIONS.items():
        keys.update({to_kebab(f.name): Key(section, f) for f in dataclasses.fields(cls)})
    return keys


_TYPES = {
    (section, name): hint
    for section, cls in {"": FedMAEConfig, **SECTIONS}.items()
    for name, hint in typing.get_type_hints(cls).items()
}
KEYS: dict[str, Key] = _keys()


def default_run_config() -> dict[str, Scalar]:
    """Every run-config key with its schema default (plain scalars, enums as their values)."""
    return {name: _plain(key.default) for name, key in KEYS.items()}


def _plain(value: Any) -> Scalar:
    return value.value if isinstance(value, enum.Enum) else value


def _coerce(key: Key, value: Any, source: str) -> Any:
    """``value`` as the key's type; ConfigError naming the key, the source and the type."""
    kind = key.type
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        if value in set(kind):
            return kind(value)
        raise _bad(key.name, value, " | ".join(kind))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(
            f"Bad value for config key '{key.name}' in {source}: {value!r}. "
            f"Expected type: {kind.__name__}."
        )
    return float(value) if kind is float else value


def _check_keys(values: dict[str, Any], source: str) -> None:
    for name in values:
        if name not in KEYS:
            near = difflib.get_close_matches(str(name).lower().replace("_", "-"), KEYS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(
                f"Unknown config key '{name}' in {source}{hint}. "
                f"Allowed keys: {', '.join(sorted(KEYS))}."
            )


def load_preset(name: str) -> dict[str, Any]:
    """Read ``conf/<name>.yaml``: a flat mapping of run-config keys (kebab- or snake_case)."""
    available = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    if name not in available:  # a name, never a path ('../x', '/tmp/x'): the app's own presets
        raise ConfigError(
            f"Unknown preset '{name}' (no conf/{name}.yaml in the app). Available presets: "
            f"{', '.join(available)}."
        )
    path = CONF_DIR / f"{name}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Preset {path} must be a mapping of config keys to values.")
    values = {to_kebab(str(k)): v for k, v in raw.items()}
    _check_keys(values, f"conf/{name}.yaml")
    if "preset" in values:
        raise ConfigError(f"Preset {path} may not name another preset.")
    return values


def from_flat(values: dict[str, Any], source: str = "run-config") -> FedMAEConfig:
    """The config from flat run-config keys (missing keys take the schema default)."""
    _check_keys(values, source)
    grouped: dict[str, dict[str, Any]] = {"": {}, **{s: {} for s in SECTIONS}}
    for name, value in values.items():
        key = KEYS[name]
        grouped[key.section][key.field.name] = _coerce(key, value, source)
    sections = {s: cls(**grouped[s]) for s, cls in SECTIONS.items()}
    return FedMAEConfig(**grouped[""], **sections)


def resolve_config(run_config: dict[str, Any] | None = None) -> FedMAEConfig:
    """Build the checked config of a run from Flower's run-config.

    Args:
        run_config: Flower's fused run-config (kebab-case keys, scalar values; ``""`` = not set),
            or None/empty for the schema defaults (``flwr.simulation.run_simulation`` passes an
            empty one).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value outside what is allowed;
            the message names the key and the allowed values.
    """
    overrides = {k: v for k, v in (run_config or {}).items() if v != UNSET}
    _check_keys(overrides, "run-config")
    preset = str(overrides.get("preset", ""))
    values = load_preset(preset) if preset else {}
    for name, value in overrides.items():
        # The source is named in type errors: the run-config value, else the preset's.
        _coerce(KEYS[name], value, "run-config")
    return from_flat({**values, **overrides}, f"conf/{preset}.yaml" if preset else "run-config")


def to_flat(cfg: FedMAEConfig) -> dict[str, Scalar]:
    """The config as flat run-config keys and plain values (the inverse of :func:`from_flat`)."""
    return {
        name: _plain(getattr(getattr(cfg, key.section) if key.section else cfg, key.field.name))
        for name, key in KEYS.items()
    }


def to_yaml(cfg: FedMAEConfig) -> str:
    """The fully resolved config, as written to ``outputs/<run>/config.yaml`` (flat keys)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_flat(cfg)))


# Keys added after runs had been saved, with the behaviour those runs had: a config.yaml without
# the key reads back as the run that wrote it ran, not with today's default.
FORMER_DEFAULTS: dict[str, Any] = {"finetune-head-norm": "none", "finetune-augment": True}


def load_config_yaml(path: str | Path) -> FedMAEConfig:
    """Read back a run's ``config.yaml`` (checked like any other source; keys it predates at
    :data:`FORMER_DEFAULTS`)."""
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    flat = {to_kebab(str(k)): v for k, v in dict(raw).items()}
    return from_flat({**FORMER_DEFAULTS, **flat}, str(path))
