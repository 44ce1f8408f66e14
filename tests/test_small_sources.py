"""Whole runs (the real ServerApp and client handlers, in process) on image sources a user
brings: unlabelled folders, few images per class, Hugging Face splits without usable labels.
Each of these crashed a run (at its start, after a stage, or after all its training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmae_flwr.config import ConfigError

from .local_grid import run_in_process

# A small imagefolder run: RGB 16x16 images, 2 blocks x 1 round, 2 of 3 nodes per round.
SMALL = {
    "dataset": "imagefolder",
    "in-chans": 3,
    "img-size": 16,
    "patch-size": 4,
    "embed-dim": 24,
    "num-heads": 2,
    "decoder-embed-dim": 16,
    "decoder-num-heads": 2,
    "depth": 2,
    "rounds-per-stage": 1,
    "clients-per-round": 2,
    "evaluate-clients": 2,
    "batch-size": 8,
    "eval-images": 16,
    "grid-images": 2,
    "probe-train-images": 40,
    "probe-epochs": 2,
    "test-images": 20,
    "evaluate-random-init": False,
}


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (18, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def overrides(tmp_path: Path, data: Path, **more) -> dict:
    return {**SMALL, "data-path": str(data), "output-dir": str(tmp_path / "out"),
            "run-name": "small", **more}  # fmt: skip


def test_a_flat_unlabelled_folder_pretrains_and_exports_without_downstream_scores(tmp_path):
    """README: 'a flat folder is unlabelled (no downstream accuracy then)'. It failed at the
    start with 'num_classes must be >= 1, got 0' (the partition report)."""
    write_images(tmp_path / "flat", 60)
    summary = run_in_process(overrides(tmp_path, tmp_path / "flat"), num_nodes=3)
    run = tmp_path / "out" / "small"
    assert (run / "backbone.safetensors").is_file()
    assert len(summary["stages"]) == 2 and all(s["psnr"] > 0 for s in summary["stages"])
    assert summary["linear-probe-accuracy"] == {} and summary["knn-accuracy"] == {}
    assert summary["downstream"]["skipped"] == "unlabelled source: no downstream accuracy"
    partitions = json.loads((run / "partitions.json").read_text())
    assert partitions["labelled"] is False and sum(partitions["images-per-partition"]) > 0


def test_classes_too_small_for_a_test_split_are_refused_at_the_start_naming_test_fraction(
    tmp_path,
):
    """5 images per class at test-fraction 0.1 split off no test image; the run trained its
    first stage and then failed ('pixel_mask selects no pixel')."""
    for label in range(4):
        write_images(tmp_path / "few" / f"class-{label}", 5, seed=label)
    config = overrides(tmp_path, tmp_path / "few")
    with pytest.raises(ConfigError, match=r"20 training images and no test image \(test-fraction"
                       r"=0\.1 of each class rounds to 0 test images where a class holds at most "
                       r"5 images; a test split .*Raise test-fraction"):  # fmt: skip
        run_in_process(config, num_nodes=3)
    assert not (tmp_path / "out" / "small").exists()  # refused before any output
    summary = run_in_process({**config, "test-fraction": 0.2}, num_nodes=3)
    assert summary["data"]["test-images"] == 4 and summary["linear-probe-accuracy"]


def test_a_downstream_evaluation_the_source_cannot_hold_is_refused_at_the_start(tmp_path):
    """finetune-subsets x finetune-labels over the labelled images (full-eval with
    finetune-subsets=61 on Fashion-MNIST) failed after the whole pretraining, with no
    summary.json; so did a validation share of 1 image."""
    for label in range(2):
        write_images(tmp_path / "ds" / f"class-{label}", 10, seed=label)
    config = overrides(tmp_path, tmp_path / "ds", **{"test-fraction": 0.2})
    too_many = {**config, "finetune-labels": 10, "finetune-subsets": 2,
                "finetune-val-fraction": 0.2, "finetune-epochs": 1}  # fmt: skip
    with pytest.raises(ConfigError, match=r"has 16 labelled training images: finetune-subsets=2 "
                       r"disjoint subsets of finetune-labels=10 need 20"):  # fmt: skip
        run_in_process(too_many, num_nodes=3)
    assert not (tmp_path / "out" / "small").exists()  # refused before any output
    one = tmp_path / "one"
    write_images(one / "train" / "a", 1)
    write_images(one / "test" / "a", 2, seed=1)
    with pytest.raises(ConfigError, match=r"has 1 labelled training images: the linear probe"):
        run_in_process({**overrides(tmp_path, one), "clients-per-round": 1,
                        "evaluate-clients": 0}, num_nodes=1)  # fmt: skip


def test_the_downstream_check_spares_a_source_whose_downstream_step_is_skipped():
    """No labelled test image: the downstream evaluation is skipped, so its needs are none (the
    first check refused preset='full-eval' on such a source, which ran to its summary)."""
    import torch

    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.data.images import DatasetSplits, ImageSet
    from fedmae_flwr.server_app import require_test_images

    images = torch.zeros(40, 1, 4, 4, dtype=torch.uint8)
    train = ImageSet(images, torch.arange(40) % 2)
    hidden = ImageSet(images[:10], torch.full((10,), -1))
    cfg = resolve_config({"preset": "full-eval"})  # 3 subsets of 1,000 labels
    require_test_images(cfg, DatasetSplits(train, hidden, (0.0,), (1.0,), 2))
    with pytest.raises(ConfigError, match="need 3000"):
        labelled = ImageSet(images[:10], torch.arange(10) % 2)
        require_test_images(cfg, DatasetSplits(train, labelled, (0.0,), (1.0,), 2))


def test_an_output_dir_that_cannot_be_a_folder_is_named_before_the_data_loads(tmp_path):
    """A file on output-dir's path failed with a bare NotADirectoryError after the data loaded."""
    (tmp_path / "a-file").write_text("not a folder")
    config = overrides(
        tmp_path, tmp_path / "nowhere", **{"output-dir": str(tmp_path / "a-file" / "out")}
    )
    with pytest.raises(ConfigError, match=r"'output-dir': .*a-file/out'. Allowed: a folder this"):
        run_in_process(config, num_nodes=3)  # the data-path does not exist: not reached
    # the run's own folder is checked too (a read-only one, or a file of its name: a bare
    # OSError after the data loaded)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "taken").write_text("a file named as the run")
    config = overrides(tmp_path, tmp_path / "nowhere", **{"output-dir": str(tmp_path / "out"),
                                                           "run-name": "taken"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"The run folder '.*taken' \(output-dir / run-name\)"):
        run_in_process(config, num_nodes=3)


def test_a_hub_dataset_with_hidden_test_labels_and_unlabelled_rows_runs_to_its_summary(
    tmp_path, monkeypatch
):
    """A test split whose labels are -1 (as on many hub datasets) failed after all training,
    before summary.json; train rows labelled -1 failed the same way."""
    import datasets
    from datasets import Dataset, DatasetDict, Features, Value

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(0)
    rows = [Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)) for _ in range(70)]
    features = Features({"image": datasets.Image(), "label": Value("int64")})
    labels = [i % 3 if i % 4 else -1 for i in range(60)]  # a quarter of train unlabelled
    DatasetDict({
        "train": Dataset.from_dict({"image": rows[:60], "label": labels}, features=features),
        "test": Dataset.from_dict({"image": rows[60:], "label": [-1] * 10}, features=features),
    }).save_to_disk(tmp_path / "hub")  # fmt: skip
    config = overrides(tmp_path, tmp_path / "hub", dataset="huggingface", **{"test-fraction": 0.2})
    summary = run_in_process(config, num_nodes=3)
    assert summary["data"]["train-images"] + summary["data"]["test-images"] == 60
    assert set(summary["linear-probe-accuracy"]) == {"fedmae", "pixels"}
    assert (tmp_path / "out" / "small" / "summary.json").is_file()


def test_a_shared_source_s_unreadable_files_are_counted_once_not_once_per_node(tmp_path):
    """Each simulated node reported every skipped file of the shared source as its own: 3 nodes,
    1 broken file, 3 skips in summary.json's nodes."""
    for label in range(2):
        write_images(tmp_path / "shared" / f"class-{label}", 20, seed=label)
    (tmp_path / "shared" / "class-0" / "broken.png").write_bytes(b"not a png")
    summary = run_in_process(overrides(tmp_path, tmp_path / "shared"), num_nodes=3)
    assert summary["data"]["skipped-unreadable"] == 1
    assert [n["skipped-images"] for n in summary["data"]["nodes"].values()] == [0, 0, 0]
