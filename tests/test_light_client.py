"""A light ClientApp: what a deployed SuperNode's process per message imports, reads and reports.

Flower 1.41 starts a fresh ClientApp process for every message on a deployed SuperNode, so the
app's import path must not pull the server's heavy libraries, and a node's decoded images must
come from its on-disk cache from the second message on (docs/client-overhead.md). A node started
without the node-config it needs (or whose data cannot be read) fails its first message with an
error naming the keys, which the server rejects, counts and stops sampling.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from PIL import Image

from fedmae_flwr import client_app
from fedmae_flwr.config import ConfigError, resolve_config
from fedmae_flwr.data import _load, load_node_data, node_cache
from fedmae_flwr.server_app import run
from fedmae_flwr.strategies import NODE_UNUSABLE

from .local_grid import InProcessGrid

# What the server side needs and a node reading idx files or an image folder must not import.
HEAVY = ("matplotlib", "pandas", "pyarrow", "datasets", "flwr_datasets", "seaborn", "ray",
         "flwr.superlink")  # fmt: skip

# A fresh interpreter: import the ClientApp, load one node's images, report what it did.
CHILD = rf"""
import hashlib, json, sys, time
HEAVY = {HEAVY!r}
t = time.perf_counter()
from fedmae_flwr import client_app
import_seconds = time.perf_counter() - t
after_import = sorted(m for m in HEAVY if m in sys.modules)
from flwr.app import Context, RecordDict
spec = json.loads(sys.argv[1])
context = Context(run_id=1, node_id=7, node_config=spec["node_config"], state=RecordDict(),
                  run_config={{}})
cfg = client_app.node_config(context, spec["overrides"])
t = time.perf_counter()
data = client_app.node_data(context, cfg)
seconds = time.perf_counter() - t
tensors = (data.train.images, data.train.labels, data.heldout.images, data.heldout.labels)
print(json.dumps({{
    "import-seconds": import_seconds,
    "seconds": seconds,
    "after-import": after_import,
    "after-load": sorted(m for m in HEAVY if m in sys.modules),
    "loaders": [m for m in ("fedmae_flwr.data.imagefolder", "fedmae_flwr.data.partition")
                if m in sys.modules],
    "sizes": [len(data.train), len(data.heldout)],
    "digest": hashlib.sha256(b"".join(x.numpy().tobytes() for x in tensors)).hexdigest(),
}}))
"""


def fresh_process(node_config: dict, overrides: dict) -> dict:
    spec = json.dumps({"node_config": node_config, "overrides": overrides})
    env = {k: v for k, v in os.environ.items() if k != node_cache.ENV_VAR}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, spec], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def image_folder(folder: Path, count: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % 2}" / f"{i}.png")
    return folder


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_importing_the_client_app_loads_no_server_library():
    code = (
        "import sys, json; import fedmae_flwr.client_app; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_a_device_folder_is_decoded_once_then_read_from_the_cache(tmp_path, tiny_overrides):
    """Two fresh processes, one device: the second reads the cache file the first wrote."""
    folder = image_folder(tmp_path / "own")
    overrides = {**tiny_overrides, "dataset": "imagefolder", "data-path": str(folder),
                 "in-chans": 3, "img-size": 16, "patch-size": 4}  # fmt: skip
    cache = tmp_path / "cache"
    node_config = {"data-path": str(folder), "cache-dir": str(cache)}
    cold = fresh_process(node_config, overrides)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns
    warm = fresh_process(node_config, overrides)
    print(f"device folder: cold {cold['seconds']:.3f} s, warm {warm['seconds']:.3f} s")
    assert cold["after-import"] == cold["after-load"] == []  # no heavy library, even decoding
    assert cold["loaders"] == ["fedmae_flwr.data.imagefolder"]
    assert warm["loaders"] == []  # nothing decoded: the images came from the file
    assert list(cache.glob("*.safetensors")) == files and files[0].stat().st_mtime_ns == written
    assert (warm["sizes"], warm["digest"]) == (cold["sizes"], cold["digest"])
    assert warm["after-load"] == []


def test_a_partition_is_computed_once_then_read_from_the_cache(tmp_path, tiny_overrides):
    """A node holding partition 2 of 4: the second process neither decodes nor partitions."""
    cache = tmp_path / "cache"
    node_config = {"partition-id": 2, "num-partitions": 4, "cache-dir": str(cache)}
    cold = fresh_process(node_config, tiny_overrides)
    warm = fresh_process(node_config, tiny_overrides)
    print(f"partition: cold {cold['seconds']:.3f} s, warm {warm['seconds']:.3f} s")
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert cold["after-import"] == []
    assert "fedmae_flwr.data.partition" in cold["loaders"]  # flwr-datasets split it, once
    assert warm["loaders"] == [] and warm["after-load"] == []
    assert (warm["sizes"], warm["digest"]) == (cold["sizes"], cold["digest"])
    assert cold["sizes"] == [180, 20]  # 800 / 4 nodes, 10 % held out
    assert warm["seconds"] < cold["seconds"]


def _clear_process_caches() -> None:
    _load.cache_clear()
    node_cache.source_fingerprint.cache_clear()


def _same(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in (
            (a.train.images, b.train.images),
            (a.train.labels, b.train.labels),
            (a.heldout.images, b.heldout.images),
        )
    ) and (a.mean, a.std, a.num_classes, a.skipped) == (b.mean, b.std, b.num_classes, b.skipped)


def test_the_cache_holds_what_decoding_gives_and_follows_the_source(tmp_path, tiny_overrides):
    folder = image_folder(tmp_path / "own")
    cfg = resolve_config({**tiny_overrides, "dataset": "imagefolder", "data-path": str(folder),
                          "in-chans": 3, "img-size": 16, "patch-size": 4})  # fmt: skip
    cache = tmp_path / "cache"
    decoded = load_node_data(cfg, 0, 1, node_data_path=str(folder))
    first = load_node_data(cfg, 0, 1, node_data_path=str(folder), cache_dir=cache)
    _clear_process_caches()
    again = load_node_data(cfg, 0, 1, node_data_path=str(folder), cache_dir=cache)
    assert _same(decoded, first) and _same(first, again)
    assert len(list(cache.glob("*.safetensors"))) == 1
    # an image rewritten on disk is a new key: decoded again, not served stale
    Image.new("RGB", (24, 20), (255, 0, 0)).save(folder / "c0" / "0.png")
    _clear_process_caches()
    changed = load_node_data(cfg, 0, 1, node_data_path=str(folder), cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not _same(changed, first)
    # another held-out share or seed is another key too
    _clear_process_caches()
    other = resolve_config({**tiny_overrides, "dataset": "imagefolder", "data-path": str(folder),
                            "in-chans": 3, "img-size": 16, "patch-size": 4, "seed": 1})  # fmt: skip
    load_node_data(other, 0, 1, node_data_path=str(folder), cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_a_device_trains_and_evaluates_on_every_image_of_its_own_folder(tmp_path, tiny_overrides):
    """The source's test split (test-fraction of the folder) was cut off and thrown away: a
    device with 10 images trained on 8 and held out 1; README says all of them are its own."""
    folder = image_folder(tmp_path / "own", count=20)
    (folder / "test" / "c0").mkdir(parents=True)  # a test/ folder is the device's too
    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "test" / "c0" / "t.png")
    cfg = resolve_config({**tiny_overrides, "dataset": "imagefolder", "in-chans": 3,
                          "img-size": 16, "patch-size": 4, "heldout-fraction": 0.1})  # fmt: skip
    node = load_node_data(cfg, 0, 1, node_data_path=str(folder))
    assert (len(node.train), len(node.heldout)) == (19, 2)  # 21 images: 2 held out


def test_the_held_out_share_leaves_a_small_device_an_image_to_train_on(tmp_path, tiny_overrides):
    """heldout-fraction 0.9 on 3 images held out all 3: the device replied with 0 examples each
    round and the stage failed at its end, for want of a sound reply."""
    cfg = resolve_config({**tiny_overrides, "dataset": "imagefolder", "in-chans": 3,
                          "img-size": 16, "patch-size": 4, "heldout-fraction": 0.9})  # fmt: skip
    for count, split in ((3, (1, 2)), (1, (1, 0)), (20, (2, 18))):
        folder = image_folder(tmp_path / f"images-{count}", count=count)
        node = load_node_data(cfg, 0, 1, node_data_path=str(folder))
        assert (len(node.train), len(node.heldout)) == split, count


def test_a_damaged_cache_file_is_decoded_again_and_rewritten(tmp_path, tiny_overrides, caplog):
    cfg = resolve_config(tiny_overrides)
    cache = tmp_path / "cache"
    good = load_node_data(cfg, 1, 4, cache_dir=cache)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # cut off, as by a full disk
    with caplog.at_level(logging.WARNING):
        again = load_node_data(cfg, 1, 4, cache_dir=cache)
    assert _same(good, again)
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert node_cache.read(path, 1, 28) is not None  # written whole again
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind


def test_where_the_cache_is(monkeypatch, tmp_path):
    monkeypatch.delenv(node_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert node_cache.resolve_cache_dir() == tmp_path / "xdg" / "fedmae-flwr" / "node-data"
    monkeypatch.setenv(node_cache.ENV_VAR, str(tmp_path / "env"))
    assert node_cache.resolve_cache_dir() == tmp_path / "env"
    assert node_cache.resolve_cache_dir(str(tmp_path / "node")) == tmp_path / "node"
    assert node_cache.resolve_cache_dir("off") is None
    monkeypatch.setenv(node_cache.ENV_VAR, "off")
    assert node_cache.resolve_cache_dir() is None


def test_the_cache_can_be_turned_off_per_node(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv(node_cache.ENV_VAR, str(tmp_path / "env-cache"))
    context = _context({"partition-id": 0, "num-partitions": 4, "cache-dir": "off"})
    data = client_app.node_data(context, resolve_config(tiny_overrides))
    assert len(data.train) == 180 and not (tmp_path / "env-cache").exists()


# --- a node started without the node-config it needs ---------------------------------------------
@pytest.mark.parametrize(
    ("node_config", "named"),
    [
        ({}, ["'partition-id' and 'num-partitions'", "it has: nothing"]),
        ({"partition-id": 3}, ["lacks 'num-partitions'", "partition-id=3"]),
        ({"partition-id": "three", "num-partitions": 4}, ["must be whole numbers"]),
    ],
)
def test_a_node_without_its_node_config_fails_naming_the_keys(node_config, named, tiny_overrides):
    cfg = resolve_config(tiny_overrides)
    with pytest.raises(ConfigError) as err:
        client_app.node_data(_context(node_config), cfg)
    text = str(err.value)
    for part in [*named, "data-path='/folder/of/its/images'", "partition-id=0 num-partitions=10"]:
        assert part in text, text
    assert "KeyError" not in text
    assert text.startswith(f"{NODE_UNUSABLE} Node 7:")  # the marker the server looks for


@pytest.mark.parametrize(
    ("node_config", "named"),
    [
        ({"partition-id": 4, "num-partitions": 4}, "partition-id 4 is outside [0, 4)"),
        ({"data-path": "/nonexistent/fedmae-images"}, "'/nonexistent/fedmae-images' is not a"),
        ({"data-path": "EMPTY"}, "No image file in image folder"),
    ],
)
def test_a_node_whose_data_cannot_be_read_says_it_cannot_take_part(
    node_config, named, tiny_overrides, tmp_path
):
    if node_config.get("data-path") == "EMPTY":
        node_config = {"data-path": str(tmp_path), "cache-dir": "off"}
    with pytest.raises(client_app.NodeUnusable) as err:
        client_app.node_data(_context(node_config), resolve_config(tiny_overrides))
    assert NODE_UNUSABLE in str(err.value) and named in str(err.value)


class FlowerErrorsGrid(InProcessGrid):
    """Like Flower's runtimes: a handler's exception becomes the node's Error reply."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            try:
                replies.extend(super().send_and_receive([msg], timeout=timeout))
            except Exception as ex:
                # flwr/supernode/runtime/run_clientapp.py builds the reason this way.
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
                replies.append(Message(error, reply_to=msg))
        return replies


def test_an_unconfigured_node_is_rejected_once_then_no_longer_sampled(tiny_overrides, caplog):
    """Node 1000 has an empty node-config: its first message comes back an Error reply with the
    node-unusable marker, rejected, logged and counted; the node is not sampled again and the
    run completes on the other five."""
    config = {**tiny_overrides, "run-name": "unconfigured", "evaluate-random-init": False,
              "finetune-labels": 0}  # fmt: skip
    grid = FlowerErrorsGrid(6, config)
    grid.contexts[1000].node_config = {}
    with caplog.at_level(logging.INFO):
        run(grid, resolve_config(config))
    metrics = Path(config["output-dir"]) / "unconfigured" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    to_1000 = [(int(m.content["config"]["server-round"]), m.metadata.message_type)
               for m in grid.sent if m.metadata.dst_node_id == 1000]  # fmt: skip
    assert to_1000 == [(2, "train")], to_1000  # seed 0 samples it first in round 2; then never
    for row in rows:
        if row["round"] < 2:
            assert (row["rejected"], row["clients"], row["excluded-nodes"]) == (0, 3, 0), row
        elif row["round"] == 2:
            assert row["rejected"] == row["rejected-node-unusable"] == 1, row
            assert (row["clients"], row["excluded-nodes"]) == (2, 1), row
        else:
            assert (row["rejected"], row["clients"], row["excluded-nodes"]) == (0, 3, 1), row
    messages = [r.getMessage() for r in caplog.records]
    rejections = [m for m in messages if "rejected (node-unusable)" in m]
    assert len(rejections) == 1 and "node 1000" in rejections[0]
    assert "node-config sets no 'data-path'" in rejections[0]
    assert any("node 1000 is not sampled again" in m for m in messages)


class DeployedGrid(FlowerErrorsGrid):
    """Nodes that read their own folders (node-config ``data-path``), as on real devices."""

    simulated_partitions = False


def test_a_deployment_describes_the_data_its_devices_reported(tmp_path, tiny_overrides):
    """partitions.json and summary.json's ``data.nodes`` come from the devices' replies (their
    images and skipped files), not from the server's own evaluation data."""
    server = image_folder(tmp_path / "server", count=40)
    config = {**tiny_overrides, "dataset": "imagefolder", "data-path": str(server),
              "in-chans": 3, "img-size": 16, "patch-size": 4, "run-name": "deployed",
              "evaluate-random-init": False, "finetune-labels": 0}  # fmt: skip
    grid = DeployedGrid(3, config)
    for i, node in enumerate(sorted(grid.contexts)):
        folder = image_folder(tmp_path / f"device-{i}", count=12 + 6 * i)
        if i == 2:
            (folder / "c0" / "broken.png").write_bytes(b"not a png")
        grid.contexts[node].node_config = {"data-path": str(folder), "cache-dir": "off"}
    summary = run(grid, resolve_config(config))
    nodes = summary["data"]["nodes"]
    assert sorted(nodes) == [str(n) for n in sorted(grid.contexts)]
    images = [nodes[str(n)]["images"] for n in sorted(grid.contexts)]
    assert images[0] < images[1] < images[2]  # 12, 18, 24 files, less each node's held-out part
    assert [nodes[str(n)]["skipped-images"] for n in sorted(grid.contexts)] == [0, 0, 1]
    assert sum(n["rounds"] for n in nodes.values()) == 4 * 3  # 4 rounds x 3 clients
    report = json.loads((Path(config["output-dir"]) / "deployed" / "partitions.json").read_text())
    assert report["source"].startswith("reported by the nodes")
    assert (report["num-partitions"], report["max-images"]) == (3, images[2])
    assert report["skipped-images"] == 1 and report["nodes"] == nodes
