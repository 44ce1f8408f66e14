"""A deployment on this machine, for the tests: a SuperLink without the simulation engine, one
real ``flower-supernode`` per ``--node-config``, and ``flwr run`` against them.

    .venv/bin/python -m tests.local_deployment --flwr-home /tmp/flwr-home \\
        --node-config "data-path='/data/device-a'" --node-config "data-path='/data/device-b'" \\
        --run-config "dataset='imagefolder' data-path='/data/server-eval' in-chans=3 img-size=32"

Exits 0 only when Flower reports the run ``finished:completed``. Ends every process it started
with scripts/run.py's cleanup (this process is a child subreaper; all below it ends, by PID).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from scripts.run import NAME, REPO, _below, _end_all, _runs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flwr-home", type=Path, required=True)
    parser.add_argument("--node-config", action="append", required=True, help="one per SuperNode")
    parser.add_argument("--run-config", default="")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    home = args.flwr_home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_HOME=str(home), MPLCONFIGDIR=str(home / "mpl"))
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER, as in scripts/run.py
    skip, superlink, port = set(_below(set())), None, _free_port()
    log = (home / "deployment.log").open("w")  # the SuperLink's and SuperNodes' own logs
    try:
        superlink = subprocess.Popen(
            ["flower-superlink", "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
             "--disable-runtime-dependency-installation", "--port", str(port)],
            env=env, cwd=REPO, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        while superlink.poll() is None:  # until the port accepts connections
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.2)
        for node_config in args.node_config:  # its Fleet API is on the same port
            subprocess.Popen(
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(_free_port()), "--node-config", node_config],
                env=env, cwd=REPO, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        conn = f'[superlink.{NAME}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        (home / "config.toml").write_text(conn)
        cmd = ["flwr", "run", str(REPO), NAME, "--run-config", args.run_config, "--stream"]
        subprocess.run(cmd, env=env, timeout=args.timeout, check=False)
        row = (_runs(env) or [{"status": "never submitted"}])[0]
        print(f"[deployment] the run ended {row['status']} {row.get('status-details', '')}")
        return 0 if row["status"] == "finished:completed" else 1
    finally:
        _end_all(superlink, skip)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
