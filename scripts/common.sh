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

# promtool (Debian's prometheus package): integration_metrics validates /metrics with it.
ensure_promtool() {
  command -v promtool >/dev/null && return
  echo "installing promtool (Debian package prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends prometheus >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }
}

# Chromium (Debian's chromium package): integration_ui loads the /ui page in it, headless.
ensure_chromium() {
  command -v chromium >/dev/null && return
  echo "installing chromium (Debian package chromium)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends chromium >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; }
}

build_guests() {
  cargo build --quiet --release --target wasm32-wasip2 \
    --manifest-path guests/Cargo.toml --target-dir guests/target
}

scripts/broker.sh start
