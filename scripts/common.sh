# Shared set-up of scripts/test.sh and scripts/demo.sh: toolchain target, PostgreSQL, broker.
# Sourced, not run.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SAGA_CACHE="${SAGA_CACHE:-$HOME/.cache/saga-runtime}"
export SAGA_BROKER_PORT="${SAGA_BROKER_PORT:-19092}"
mkdir -p "$SAGA_CACHE"

# The pinned toolchain (rust-toolchain.toml) and its wasm32-wasip2 target.
rustup show active-toolchain >/dev/null
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# PostgreSQL (tests only; the demo runs on SQLite): start the machine's cluster if it stopped.
ensure_postgres() {
  if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null; then
      echo "starting PostgreSQL"
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    fi
  fi
}

# A Debian package the tests need, if its command is missing: ensure_debian COMMAND PACKAGE.
ensure_debian() {
  command -v "$1" >/dev/null && return
  echo "installing $1 (Debian package $2)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "$2" >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$2" >/dev/null; }
}

# promtool: integration_metrics validates /metrics with it, check.sh the compose rules.
ensure_promtool() { ensure_debian promtool prometheus; }

# Chromium: integration_ui loads the /ui page in it, headless.
ensure_chromium() { ensure_debian chromium chromium; }

build_guests() {
  cargo build --quiet --release --target wasm32-wasip2 \
    --manifest-path guests/Cargo.toml --target-dir guests/target
}

scripts/broker.sh start
