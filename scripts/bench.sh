#!/usr/bin/env bash
# Foundation benchmarks (release build): per-event guest call cost and happy-path saga time.
set -euo pipefail
source "$(dirname "$0")/common.sh"
export SAGA_TEST_BROKERS="127.0.0.1:$SAGA_BROKER_PORT"
build_guests
cargo bench -p runtime --bench foundation "$@"
