#!/usr/bin/env bash
# The fault suite, long form (release build): the deadline saga on several runtime processes
# on PostgreSQL under a SIGKILL storm, a broker restart and a PostgreSQL restart mid-load, a ×3
# duplicate storm, hostile records on every topic and a hostile guest; then every saga must be terminal, points conserved, exchanges exactly
# for approved orders, the outbox drained. Prints FAULT_RESULT {…} (figures and violations).
#   scripts/faults.sh                       4000 sagas at 50/s, kills every 2–6 s
#   FAULT_SAGAS=… FAULT_RATE=… FAULT_INSTANCES=… FAULT_KILL_MS=min,max TEST_SEED=… scripts/faults.sh
# CI runs the short form (the test's defaults) as part of scripts/test.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ensure_postgres
export SAGA_TEST_BROKERS="127.0.0.1:$SAGA_BROKER_PORT"
export FAULT_SAGAS="${FAULT_SAGAS:-4000}" FAULT_RATE="${FAULT_RATE:-50}"
export FAULT_KILL_MS="${FAULT_KILL_MS:-2000,6000}" SAGA_TEST_LOG="${SAGA_TEST_LOG:-error}"
build_guests
cargo test --release -p runtime --test integration_faults -- --nocapture
