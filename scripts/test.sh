#!/usr/bin/env bash
# The whole test suite against a real broker (noida-db, started here), PostgreSQL and SQLite,
# with real guests built from guests/. Extra arguments go to `cargo test`.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ensure_postgres
ensure_promtool
ensure_chromium
export SAGA_TEST_BROKERS="127.0.0.1:$SAGA_BROKER_PORT"
build_guests
cargo test --workspace "$@"
