#!/bin/sh
# The coordinator image's HEALTHCHECK: GET /metrics on the port of
# LORAFLEET_METRICS_LISTEN (default 9090). The coordinator serves /metrics over TLS when
# it has --tls-cert (then any certificate is accepted: this checks that the process
# serves, not who it is), else plain http.
set -eu
addr="${LORAFLEET_METRICS_LISTEN:-0.0.0.0:9090}"
port="${addr##*:}"
curl -fsS -o /dev/null --max-time 4 --insecure "https://127.0.0.1:${port}/metrics" 2>/dev/null \
    || curl -fsS -o /dev/null --max-time 4 "http://127.0.0.1:${port}/metrics"
