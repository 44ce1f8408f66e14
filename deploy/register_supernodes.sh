#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink started with --enable-supernode-auth.
#
#   deploy/register_supernodes.sh CONNECTION KEY.pub ...
#
# CONNECTION names a [superlink.CONNECTION] table in $FLWR_HOME/config.toml (see config.toml
# here). Flower 1.41 keeps the registered keys in the SuperLink's --database: a SuperLink
# restarted on the same file still knows them; one without --database forgets them.
# Each key gets a node id, printed here; a key that is already registered fails
# (PUBLIC_KEY_ALREADY_IN_USE): `flwr supernode list CONNECTION` shows the registered nodes.
set -euo pipefail

conn=${1:?usage: $0 CONNECTION KEY.pub ...}
shift
[ $# -gt 0 ] || { echo "usage: $0 CONNECTION KEY.pub ..." >&2; exit 2; }
flwr=${FLWR:-flwr}
for key in "$@"; do
    name=$(basename "$key" .pub)
    "$flwr" supernode register --name "$name" "$key" "$conn"
done
