#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink started with --enable-supernode-auth.
#
#   deploy/register_supernodes.sh CONNECTION KEY.pub ...
#
# CONNECTION names a [superlink.CONNECTION] table in $FLWR_HOME/config.toml (see config.toml
# here). Flower 1.41 keeps the registered keys in the SuperLink's --database: a SuperLink
# restarted on the same file still knows them; one without --database forgets them.
# Each key gets a node id, printed here. A key that is already registered is reported and
# skipped, so the script can be run again with one more device; any other failure is reported
# and the remaining keys are still tried (exit 1 at the end). `flwr supernode list CONNECTION`
# shows the registered nodes.
set -uo pipefail

conn=${1:?usage: $0 CONNECTION KEY.pub ...}
shift
[ $# -gt 0 ] || { echo "usage: $0 CONNECTION KEY.pub ..." >&2; exit 2; }
flwr=${FLWR:-flwr}
failed=0
for key in "$@"; do
    name=$(basename "$key" .pub)
    if out=$("$flwr" supernode register --name "$name" "$key" "$conn" 2>&1); then
        echo "$out"
    elif grep -qi "already in use" <<<"$out"; then
        echo "$name: already registered, skipped ($key)"
    else
        echo "$out" >&2
        echo "$name: NOT registered ($key)" >&2
        failed=$((failed + 1))
    fi
done
[ "$failed" -eq 0 ] || { echo "$failed of $# keys not registered" >&2; exit 1; }
