#!/bin/sh
# One-time secrets of the compose stack (its `secrets` service runs this; it also runs on
# a host with openssl and lorafleet-coordinator: SECRETS_DIR=deploy/.secrets sh deploy/compose/make-secrets.sh).
# Makes, each only if missing (delete a file to remake it):
#   ca.crt/ca.key                 a CA for this stack
#   coordinator.crt/.key          the coordinator's server certificate: DNS coordinator, localhost, IP 127.0.0.1
#   worker.crt/.key               the workers' client certificate (the coordinator's --worker-ca is ca.crt)
#   auth.yaml                     token hashes (--auth), with worker.token (role worker) and admin.token (role admin)
# Files are owned by uid/gid 10001 (the images' user); keys and tokens are not readable
# by others. LORAFLEET_HOST_UID=<your uid> makes admin.token and ca.crt yours, for the
# lorafleet CLI on the host.
set -eu
D="${SECRETS_DIR:-/secrets}"
OWNER="${LORAFLEET_SECRETS_OWNER:-10001:10001}"
HOST_UID="${LORAFLEET_HOST_UID:-}"
DAYS="${LORAFLEET_CERT_DAYS:-825}"
mkdir -p "$D"
cd "$D"
umask 077

ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

if [ ! -f ca.crt ] || [ ! -f ca.key ]; then
    ec_key ca.key
    openssl req -x509 -new -key ca.key -sha256 -days "$DAYS" -subj /CN=lorafleet-compose-ca -out ca.crt
    rm -f coordinator.crt worker.crt
    echo "made ca.crt"
fi
if [ ! -f coordinator.crt ] || [ ! -f coordinator.key ]; then
    ec_key coordinator.key
    openssl req -new -key coordinator.key -subj /CN=coordinator -out coordinator.csr
    printf 'subjectAltName=DNS:coordinator,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n' > coordinator.ext
    openssl x509 -req -in coordinator.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" -sha256 \
        -extfile coordinator.ext -out coordinator.crt
    rm -f coordinator.csr coordinator.ext
    echo "made coordinator.crt"
fi
if [ ! -f worker.crt ] || [ ! -f worker.key ]; then
    ec_key worker.key
    openssl req -new -key worker.key -subj /CN=lorafleet-worker -out worker.csr
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n' > worker.ext
    openssl x509 -req -in worker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" -sha256 \
        -extfile worker.ext -out worker.crt
    rm -f worker.csr worker.ext
    echo "made worker.crt"
fi
if [ ! -f auth.yaml ] || [ ! -s worker.token ] || [ ! -s admin.token ]; then
    rm -f auth.yaml worker.token admin.token
    lorafleet-coordinator token create --auth auth.yaml --id compose-workers --role worker > worker.token
    lorafleet-coordinator token create --auth auth.yaml --id admin --role admin > admin.token
    echo "made auth.yaml, worker.token, admin.token"
fi

chmod 0644 ca.crt coordinator.crt worker.crt
chmod 0640 ca.key coordinator.key worker.key auth.yaml worker.token admin.token
rm -f ca.srl
if [ "$(id -u)" = 0 ]; then
    chown "$OWNER" ca.crt ca.key coordinator.crt coordinator.key worker.crt worker.key auth.yaml worker.token admin.token
    if [ -n "$HOST_UID" ]; then
        chown "$HOST_UID" admin.token ca.crt
    fi
    chmod 0755 .
fi
echo "secrets ready in $D"
