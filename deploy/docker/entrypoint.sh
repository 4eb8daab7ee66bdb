#!/bin/sh
# The images' entrypoint (under tini): LORAFLEET_TOKEN_FILE names a file holding the
# bearer token (a mounted secret) for processes that read LORAFLEET_TOKEN, so that the
# token is never in the container's environment definition; then runs the command.
set -eu
if [ -n "${LORAFLEET_TOKEN_FILE:-}" ] && [ -z "${LORAFLEET_TOKEN:-}" ]; then
    LORAFLEET_TOKEN="$(cat "$LORAFLEET_TOKEN_FILE")"
    export LORAFLEET_TOKEN
fi
exec "$@"
