"""A secure federation on this machine: TLS, SuperNode authentication, a SuperLink database.

    .venv/bin/python -m scripts.deploy_local --supernodes 3      (make deploy-local N=3)

Generates a CA, the SuperLink's certificate and one key pair per SuperNode (deploy/*.sh) under
--root (default .deploy-local/, git-ignored), starts `flower-superlink` with TLS,
--enable-supernode-auth and --database, registers the SuperNodes' public keys with
`flwr supernode register`, starts N `flower-supernode`s that each read their own folder of
synthetic images, submits a tiny run with `flwr run` and asks `flwr list` for its outcome.
Exits 0 only on `finished:completed`. Every process it started ends, by PID
(scripts/processes.py: this process is a child subreaper).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.processes import ProcessTree, free_port, wait_for_port
from scripts.run import REPO, flwr_env, run_config_string

NAME = "fedmae-secure"  # the connection's name in $FLWR_HOME/config.toml
DEPLOY = REPO / "deploy"


def tiny_run_config(root: Path, clients: int) -> dict[str, Any]:
    """A complete run of 2 blocks x 1 round on 32x32 images, with a small evaluation."""
    return {
        "dataset": "imagefolder", "data-path": str(root / "data" / "server"), "in-chans": 3,
        "img-size": 32, "embed-dim": 32, "num-heads": 2, "decoder-embed-dim": 16,
        "decoder-num-heads": 2, "depth": 2, "rounds-per-stage": 1, "clients-per-round": clients,
        "evaluate-clients": 1, "batch-size": 16, "eval-images": 8, "grid-images": 4,
        "probe-train-images": 16, "probe-epochs": 2, "finetune-labels": 0, "test-images": 8,
        "evaluate-random-init": False, "node-wait-timeout": 120.0, "round-timeout": 120.0,
        "output-dir": str(root / "outputs"), "run-name": "secure-smoke",
    }  # fmt: skip


def image_folders(root: Path, names: list[str], per_node: int = 16) -> dict[str, Path]:
    """A folder of labelled 40x40 PNGs (2 classes) per name; a class decides a bright band."""
    import numpy as np
    from PIL import Image

    folders = {}
    for n, name in enumerate(names):
        rng, folders[name] = np.random.default_rng(n), root / "data" / name
        for label in range(2):
            (folder := folders[name] / f"class-{label}").mkdir(parents=True, exist_ok=True)
            for i in range(per_node // 2):
                pixels = rng.integers(0, 80, (40, 40, 3))
                pixels[4 + 16 * label : 20 + 16 * label] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return folders


class SecureFederation:
    """The SuperLink and SuperNodes of one loopback federation, under ``root``.

    Use it as a context manager in a process of its own: it makes that process a child
    subreaper and, on exit, ends everything below it (but what was there before), by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.certs, self.keys, self.logs = (self.root / d for d in ("certs", "keys", "logs"))
        self.home, self.port = self.root / "flwr-home", free_port()
        self.env = flwr_env(self.home)
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: dict[str, subprocess.Popen[bytes]] = {}
        self._tree = ProcessTree()

    def __enter__(self) -> SecureFederation:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._tree.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._tree.__exit__(*exc)

    def _popen(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        return self._tree.start(cmd, self.logs / log, self.env, REPO)

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["flwr", *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def make_secrets(self, names: list[str]) -> None:
        """The CA and server certificate, and a key pair per name (deploy/*.sh)."""
        run = {"env": self.env, "check": True, "stdout": subprocess.DEVNULL}
        subprocess.run([str(DEPLOY / "make_certs.sh"), str(self.certs)], **run)
        subprocess.run([str(DEPLOY / "make_node_keys.sh"), str(self.keys), *names], **run)

    def start_superlink(self, timeout: float = 60) -> None:
        """TLS on all its APIs, only registered SuperNodes, state (and keys) in a database."""
        self.superlink = self._popen(
            ["flower-superlink", "--ssl-ca-certfile", str(self.certs / "ca.crt"),
             "--ssl-certfile", str(self.certs / "server.pem"),
             "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth",
             "--database", str(self.root / "superlink.db"),
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(self.port)],
            "superlink.log",
        )  # fmt: skip
        if not wait_for_port(self.port, self.superlink, timeout):
            raise RuntimeError(f"the SuperLink did not start; see {self.logs}/superlink.log")
        # The CLI's connection: TLS, trusting our CA (deploy/config.toml is the example).
        conn = f'[superlink.{NAME}]\naddress = "127.0.0.1:{self.port}"\n'
        conn += f'root-certificates = "{self.certs / "ca.crt"}"\n'
        (self.home / "config.toml").write_text(conn)

    def register(self, names: list[str]) -> None:
        keys = [str(self.keys / f"{name}.pub") for name in names]
        subprocess.run([str(DEPLOY / "register_supernodes.sh"), NAME, *keys], env=self.env,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip

    def start_supernode(self, name: str, data_path: Path, key: str | None = None) -> None:
        """A SuperNode that signs with keys/``key`` (default: its own) and reads ``data_path``."""
        # node-key: the server samples devices by name, whatever node ids the SuperLink gives
        node_config = f"data-path='{data_path}' node-key='{name}'"
        self.supernodes[name] = self._popen(
            ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
             "--root-certificates", str(self.certs / "ca.crt"),
             "--auth-supernode-private-key", str(self.keys / (key or name)),
             "--port", str(free_port()), "--node-config", node_config],
            f"{name}.log",
        )  # fmt: skip

    def submit(self, run_config: dict[str, Any]) -> int:
        """`flwr run` this app; returns the run id."""
        out = self.flwr("run", str(REPO), NAME, "--format", "json",
                        "--run-config", run_config_string(run_config)).stdout  # fmt: skip
        return int(json.loads(out[out.find("{") :])["run-id"])

    def run_row(self, run_id: int) -> dict[str, Any]:
        """The run's row of `flwr list` ({} when the SuperLink does not answer)."""
        out = self.flwr("list", NAME, "--run-id", str(run_id), "--format", "json", check=False)
        with contextlib.suppress(ValueError, IndexError):
            return dict(json.loads(out.stdout[out.stdout.find("{") :])["runs"][0])
        return {}

    def wait(self, run_id: int, timeout: float) -> dict[str, Any]:
        """The run's row once it has finished, or after ``timeout`` s (then it is stopped)."""
        deadline = time.monotonic() + timeout
        while not (row := self.run_row(run_id)).get("status", "").startswith("finished"):
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), NAME, check=False)
                return {**row, "status": f"timeout after {timeout:g} s"}
            time.sleep(5)  # each `flwr list` costs about a second of CPU
        return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--root", type=Path, default=REPO / ".deploy-local")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the run")
    args = parser.parse_args(argv)
    if args.supernodes < 1:
        parser.error(f"--supernodes must be >= 1, got {args.supernodes}")
    try:
        return deploy(args.root, args.supernodes, args.timeout)
    except KeyboardInterrupt:
        print("[deploy] interrupted: every process it started has ended", flush=True)
        return 130


def deploy(root: Path, supernodes: int, timeout: float) -> int:
    """The whole round trip (see the module's docstring); 0 on ``finished:completed``."""
    names = [f"supernode-{i}" for i in range(1, supernodes + 1)]
    for suffix in ("", "-wal", "-shm"):  # a fresh federation each time, with the same keys
        (root / f"superlink.db{suffix}").unlink(missing_ok=True)
    with SecureFederation(root) as fed:
        fed.make_secrets(names)
        folders = image_folders(fed.root, [*names, "server"])
        fed.start_superlink()
        fed.register(names)
        print(f"[deploy] SuperLink on 127.0.0.1:{fed.port} (TLS, node auth); logs: {fed.logs}")
        for name in names:
            fed.start_supernode(name, folders[name])
        run_id = fed.submit(tiny_run_config(fed.root, clients=supernodes))
        print(f"[deploy] run {run_id} submitted to {supernodes} SuperNodes; waiting")
        row = fed.wait(run_id, timeout)
        print(fed.flwr("supernode", "list", NAME, check=False).stdout)
        print(f"[deploy] run {run_id}: {row.get('status')} {row.get('status-details', '')}")
        return 0 if row.get("status") == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
