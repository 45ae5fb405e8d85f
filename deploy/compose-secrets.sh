#!/usr/bin/env bash
# Make the secret files docker-compose.yml reads (random, once): redis_password,
# postgres_password, grafana_admin_password, gateway_admin_token, in $MESH_SECRETS_DIR
# (default ./secrets). An existing file is kept, so re-running never changes a password.
# The folder is 0700 (only you on the host); the files are 0644 because the containers read
# them as their own non-root users (the mesh image runs as 10001).
set -euo pipefail
DIR="${MESH_SECRETS_DIR:-./secrets}"
mkdir -p "$DIR" && chmod 700 "$DIR"
for name in redis_password postgres_password grafana_admin_password gateway_admin_token; do
  f="$DIR/$name"
  if [ -s "$f" ]; then echo "kept $f"; continue; fi
  ( umask 022; python3 -c 'import secrets; print(secrets.token_urlsafe(24), end="")' > "$f" )
  echo "made $f"
done
