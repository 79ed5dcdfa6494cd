#!/usr/bin/env bash
# The runtime's main job, end to end: build everything, start the broker and one runtime on
# SQLite with both example sagas' guests (order, point, exchange; shop, payment, stock), then
# run the deadline saga's happy and point-limit paths and the outbox saga's happy path and a
# compensation over HTTP, then hot-swap point to 0.2.0 with `runtime deploy --verify` and roll
# it back, printing what happened.
# Environment: SAGA_DEMO_PORT (default 8088), SAGA_BROKER_PORT (default 19092).
set -euo pipefail
source "$(dirname "$0")/common.sh"
port="${SAGA_DEMO_PORT:-8088}"
build_guests
cargo build --quiet -p runtime
bin="${CARGO_TARGET_DIR:-target}/debug/runtime"
work="$(mktemp -d)"
guests=guests/target/wasm32-wasip2/release
export SAGA_ADMIN_TOKEN="demo-$RANDOM$RANDOM" SAGA_DEMO_BIN="$bin" SAGA_DEMO_GUESTS="$guests"
"$bin" run \
  --database-url "sqlite://$work/saga.db" \
  --brokers "127.0.0.1:$SAGA_BROKER_PORT" \
  --http "127.0.0.1:$port" \
  --service "$guests/order.wasm" --service "$guests/point.wasm" --service "$guests/exchange.wasm" \
  --service "$guests/shop.wasm" --service "$guests/payment.wasm" --service "$guests/stock.wasm" \
  >"$work/runtime.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; echo "runtime log: $work/runtime.log"' EXIT
python3 scripts/demo.py "http://127.0.0.1:$port" "$pid"
