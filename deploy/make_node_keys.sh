#!/usr/bin/env bash
# One ECDSA P-384 key pair per SuperNode, in the OpenSSH formats Flower's node authentication
# reads (flwr 1.41: `flower-supernode --auth-supernode-private-key` loads an OpenSSH private key;
# `flwr supernode register` loads an OpenSSH public key on a NIST curve).
#
#   deploy/make_node_keys.sh [OUT_DIR] NAME ...      e.g. deploy/make_node_keys.sh deploy/keys pi-1 pi-2
#
# OUT_DIR (default deploy/keys, git-ignored) receives NAME (private: copy it to that device only,
# mode 600) and NAME.pub (public: register it with the SuperLink, see register_supernodes.sh).
# An existing pair is kept: its public key may already be registered.
set -euo pipefail

out=${1:-$(dirname "$0")/keys}
shift || true
[ $# -gt 0 ] || { echo "usage: $0 [OUT_DIR] NAME ..." >&2; exit 2; }

mkdir -p "$out"
chmod 700 "$out"
for name in "$@"; do
    if [ -s "$out/$name" ] && [ -s "$out/$name.pub" ]; then
        echo "[keys] keeping $out/$name(.pub)"
        continue
    fi
    rm -f "$out/$name" "$out/$name.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedmae-supernode-$name" -f "$out/$name"
    echo "[keys] $out/$name (private) and $out/$name.pub (public)"
done
