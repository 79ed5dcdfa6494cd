#!/usr/bin/env bash
# Benchmarks (release build), against the broker started here and, for PostgreSQL runs, the
# machine's PostgreSQL. Numbers are printed, never asserted.
#   scripts/bench.sh saga [options]        the deadline saga over HTTP (runtime/benches/saga.rs):
#       --backend sqlite,postgres  --clients 8,128  --sagas 3000  --rate R  --seconds 10
#       --find-rate  --poll (poll instead of a held GET)  --config TOML (more runtime config,
#       e.g. '[kafka]\nfetch_wait_ms = 100')  --short (CI's quick form);
#       ends with one RESULT_JSON line
#   scripts/bench.sh foundation [filter]   guest call, one saga, deadline lag, hot swap
#                                          (runtime/benches/foundation.rs)
set -euo pipefail
source "$(dirname "$0")/common.sh"
export SAGA_TEST_BROKERS="127.0.0.1:$SAGA_BROKER_PORT"
build_guests
case "${1:-foundation}" in
saga) shift; ensure_postgres; cargo bench -p runtime --bench saga -- "$@" ;;
foundation) shift || true; cargo bench -p runtime --bench foundation -- "$@" ;;
# `scripts/bench.sh hot-swap`: one foundation benchmark by name.
*) cargo bench -p runtime --bench foundation -- "$@" ;;
esac
