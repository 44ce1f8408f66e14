"""A deployment on this machine, for the tests: a SuperLink without the simulation engine, one
real ``flower-supernode`` per ``--node-config``, and ``flwr run`` against them.

    .venv/bin/python -m tests.local_deployment --flwr-home /tmp/flwr-home \\
        --node-config "data-path='/data/device-a'" --node-config "data-path='/data/device-b'" \\
        --run-config "dataset='imagefolder' data-path='/data/server-eval' in-chans=3 img-size=32"

Exits 0 only when Flower reports the run ``finished:completed``. Ends every process it started
with scripts/processes.py (this process is a child subreaper; all below it ends, by PID).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from scripts.processes import ProcessTree, free_port, wait_for_port
from scripts.run import NAME, REPO, flwr_env, flwr_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flwr-home", type=Path, required=True)
    parser.add_argument("--node-config", action="append", required=True, help="one per SuperNode")
    parser.add_argument("--run-config", default="")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    home = args.flwr_home.resolve()
    env = flwr_env(home)
    log, port = home / "deployment.log", free_port()  # the SuperLink's and SuperNodes' logs
    with ProcessTree() as tree:
        superlink = tree.start(
            ["flower-superlink", "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
             "--disable-runtime-dependency-installation", "--port", str(port)],
            log, env, REPO,
        )  # fmt: skip
        wait_for_port(port, superlink, timeout=args.timeout)
        for node_config in args.node_config:  # its Fleet API is on the same port
            tree.start(
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(free_port()), "--node-config", node_config],
                log, env, REPO,
            )  # fmt: skip
        conn = f'[superlink.{NAME}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        (home / "config.toml").write_text(conn)
        cmd = ["flwr", "run", str(REPO), NAME, "--run-config", args.run_config, "--stream"]
        subprocess.run(cmd, env=env, timeout=args.timeout, check=False)
        row = (flwr_runs(env) or [{"status": "never submitted"}])[0]
        print(f"[deployment] the run ended {row['status']} {row.get('status-details', '')}")
        return 0 if row["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
