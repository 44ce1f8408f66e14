"""A secure federation on loopback: TLS, SuperNode authentication, a SuperLink database.

The end-to-end test runs tests/secure_deployment.py (real flower-superlink and flower-supernode
processes, deploy/*.sh for certificates and keys) as a subprocess under a marker, as
tests/test_flwr_run.py does, and judges its report; the others check the deploy/ scripts alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.test_flwr_run import _watched

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def _sans(cert: Path) -> str:
    cmd = ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_certificates_name_loopback_and_the_host_and_reuse_the_ca(tmp_path: Path) -> None:
    subprocess.run([DEPLOY / "make_certs.sh", tmp_path, "link.example.org", "10.1.2.3"],
                   check=True, capture_output=True)  # fmt: skip
    sans = _sans(tmp_path / "server.pem")
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:link.example.org", "10.1.2.3"):
        assert name in sans
    verify = ["openssl", "verify", "-CAfile", tmp_path / "ca.crt", tmp_path / "server.pem"]
    assert subprocess.run(verify, capture_output=True, check=False).returncode == 0
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0  # private keys: owner only
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    ca = (tmp_path / "ca.crt").read_bytes()
    subprocess.run([DEPLOY / "make_certs.sh", tmp_path], check=True, capture_output=True)
    assert (tmp_path / "ca.crt").read_bytes() == ca  # devices keep trusting the same CA
    assert "link.example.org" not in _sans(tmp_path / "server.pem")
    # the CA key kept offline, as advised: refused (it made a new CA no device trusted)
    (tmp_path / "ca.key").rename(tmp_path.parent / "ca.key.offline")
    done = subprocess.run([DEPLOY / "make_certs.sh", tmp_path], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 1 and "not its ca.key: put the CA key back" in done.stderr
    assert (tmp_path / "ca.crt").read_bytes() == ca


def test_node_keys_are_what_flower_loads(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    make_keys = [DEPLOY / "make_node_keys.sh", tmp_path, "pi-1"]
    subprocess.run(make_keys, check=True, capture_output=True)
    private = load_ssh_private_key((tmp_path / "pi-1").read_bytes(), password=None)
    assert private.curve.name == "secp384r1"  # ECDSA P-384
    assert try_load_public_key(tmp_path / "pi-1.pub")  # what `flwr supernode register` reads
    assert (tmp_path / "pi-1").stat().st_mode & 0o077 == 0
    before = (tmp_path / "pi-1.pub").read_bytes()
    subprocess.run(make_keys, check=True, capture_output=True)
    assert (tmp_path / "pi-1.pub").read_bytes() == before  # a registered key is kept


def test_the_cli_connection_example_uses_tls() -> None:
    links = tomllib.loads((DEPLOY / "config.toml").read_text())["superlink"]
    conn = links[links["default"]]
    assert conn["root-certificates"].endswith("ca.crt") and not conn.get("insecure", False)


def test_registering_again_with_a_new_device_skips_the_registered_keys(tmp_path: Path) -> None:
    """`set -e` stopped at the first key already registered: a new device listed after it was
    never registered. The stand-in answers as Flower 1.41 does ("[code: 23] Public key already
    in use."); tests/secure_deployment.py registers through the real CLI."""
    fake = tmp_path / "flwr"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$5" in *pi-1.pub) echo "[code: 23] Public key already in use."; exit 1;;\n'
        '  *broken.pub) echo "not a key" >&2; exit 1;;\n'
        '  *) echo "Node $4 registered";; esac\n'
    )
    fake.chmod(0o755)
    keys = [str(tmp_path / f"{name}.pub") for name in ("pi-1", "broken", "pi-4")]
    script = [DEPLOY / "register_supernodes.sh", "fedmae", *keys]
    done = subprocess.run(script, capture_output=True, text=True, env={"FLWR": str(fake),
                          "PATH": "/usr/bin:/bin"}, check=False)  # fmt: skip
    assert done.returncode == 1
    assert "pi-1: already registered, skipped" in done.stdout
    assert "Node pi-4 registered" in done.stdout  # tried after both failures
    assert "broken: NOT registered" in done.stderr and "1 of 3 keys not registered" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_secure_federation_survives_a_dead_and_a_restarted_device(tmp_path: Path) -> None:
    """3 registered devices and 1 unregistered one; the SuperLink restarted on its database;
    one device shut down for good and one restarted mid-run; then a run needing more devices
    than are alive (~3 min on 2 cores)."""
    report_path = tmp_path / "report.json"
    rc, out, seen, left = _watched(
        ["-m", "tests.secure_deployment", "--root", str(tmp_path / "fed"),
         "--report", str(report_path), "--timeout", "300"],
        tmp_path,
        timeout=420,
    )  # fmt: skip
    assert rc == 0, out[-4000:]
    report = json.loads(report_path.read_text())
    timeline = "\n".join(report["timeline"])
    assert report["run"]["status"] == "finished:completed", (report["run"], timeline)

    # The key nobody registered is refused: its SuperNode exits, the SuperLink says why.
    assert report["rogue-exit"] not in (None, 0)
    assert "Failed to activate SuperNode" in report["rogue-log"]
    assert "No SuperNode found with the given public key" in report["superlink-log"]

    # The SuperLink restarted on its --database kept the 3 registered keys (no new node ids);
    # at the end 2 devices are online and the one shut down for good is offline.
    assert sorted(report["nodes-at-end"]) == sorted(report["registered"])
    assert sorted(report["nodes-at-end"].values()) == ["offline", "online", "online"]
    assert report["dead-exit"] == 0

    # 2 blocks x 3 rounds, 2 of the 2 live devices each round. Block 2 (round 4) sends the
    # prefix to both. Where the stop lands is timing: the device's round-4 reply may still be
    # lost (an error reply, then the prefix goes with its next message), or it says in round 5
    # that it lacks the prefix. Either way it gets the prefix again and is back by round 6.
    rows = report["metrics"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6], timeline
    assert all(r["sampled"] == 2 for r in rows), rows
    assert all(r["rejected"] == 0 for r in rows[:3]), rows[:3]
    assert report["crashed"], timeline
    assert rows[3]["prefix-sends"] == 2, rows[3]
    assert rows[4]["prefix-sends"] + rows[5]["prefix-sends"] >= 1, rows[4:]
    assert (rows[5]["clients"], rows[5]["rejected"], rows[5]["prefix-missing"]) == (2, 0, 0)
    # What the devices hold is what they reported: 16 images each (less the held-out part).
    outputs = tmp_path / "fed" / "outputs" / "faults"
    nodes = json.loads((outputs / "summary.json").read_text())["data"]["nodes"]
    assert 2 <= len(nodes) <= 3 and set(nodes) <= set(report["registered"]), nodes
    assert len({n["images"] for n in nodes.values()}) == 1 and 0 < nodes.popitem()[1]["images"] < 16
    partitions = json.loads((outputs / "partitions.json").read_text())
    assert partitions["source"].startswith("reported by the nodes"), partitions

    # A run that needs more devices than are alive ends, failed, with the counts (not a hang).
    too_few = report["too-few"]
    assert too_few["run"]["status"] == "finished:failed", too_few
    assert too_few["seconds"] < 120, too_few  # node-wait-timeout=10 s, plus start and polling
    assert "2 nodes connected but 3 needed" in too_few["log"], too_few["log"]

    # Every Flower process ran under the marker, and none is left.
    for command in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-clientapp"):
        assert command in seen, f"{command} never seen"
    assert left == {}, f"processes survived: {left}"
