#!/usr/bin/env bash
# A private CA and the SuperLink's TLS certificate, signed by it (openssl, ECDSA P-384 keys).
#
#   deploy/make_certs.sh [OUT_DIR] [HOST ...]
#
# OUT_DIR (default deploy/certificates, git-ignored) receives:
#   ca.crt      the CA certificate: give it to every SuperNode (--root-certificates) and to the
#               flwr CLI (root-certificates in $FLWR_HOME/config.toml); it is not secret
#   ca.key      the CA's private key: keep it offline, it signs server certificates
#   server.pem  the SuperLink's certificate (--ssl-certfile)
#   server.key  the SuperLink's private key (--ssl-keyfile); stays on the SuperLink
# The certificate's names (SANs) are localhost, 127.0.0.1, ::1 and every HOST given (or
# $SUPERLINK_HOST): the names and addresses the SuperNodes and the CLI use to reach the
# SuperLink. An existing CA is reused (so devices keep trusting it); the server certificate is
# always re-issued. Validity: CA 10 years, server certificate $SERVER_DAYS days (default 825).
set -euo pipefail

out=${1:-$(dirname "$0")/certificates}
shift || true
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || [ -z "${SUPERLINK_HOST:-}" ] || hosts=("$SUPERLINK_HOST")
days=${SERVER_DAYS:-825}

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "${hosts[@]}"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then sans+=",IP:$host"; else sans+=",DNS:$host"; fi
done
cn=${hosts[0]:-localhost}

mkdir -p "$out"
chmod 700 "$out"
umask 077 # private keys readable by their owner only
cd "$out"

if [ -s ca.crt ] && [ ! -s ca.key ]; then
    # The CA key kept offline, as advised: a new CA would leave every device's ca.crt unable to
    # verify the SuperLink.
    echo "[certs] $out/ca.crt is here but not its ca.key: put the CA key back to sign a new" \
        "server certificate (or remove ca.crt to start a new CA, then give it to every device)" >&2
    exit 1
fi
if [ ! -s ca.key ] || [ ! -s ca.crt ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes -days 3650 \
        -subj "/O=fedmae-flwr/CN=fedmae-flwr federation CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout ca.key -out ca.crt
    echo "[certs] new CA: $out/ca.crt"
else
    echo "[certs] reusing the CA in $out"
fi

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes \
    -subj "/O=fedmae-flwr/CN=$cn" -keyout server.key -out server.csr
printf '%s\n' "subjectAltName=$sans" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
    >server.ext
openssl x509 -req -sha384 -days "$days" -in server.csr -CA ca.crt -CAkey ca.key \
    -CAcreateserial -extfile server.ext -out server.pem
rm -f server.csr server.ext
chmod 644 ca.crt server.pem
openssl verify -CAfile ca.crt server.pem >/dev/null
echo "[certs] SuperLink certificate $out/server.pem for $sans"
