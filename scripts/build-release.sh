#!/usr/bin/env bash
# Release build of what the container image ships (the Dockerfile runs this, and CI runs it
# without Docker): the example guests and the `runtime` binary, copied to OUT_DIR as
#   OUT_DIR/runtime  OUT_DIR/guests/{order,point,exchange,shop,payment,stock}.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/build-release.sh OUT_DIR}"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --quiet --locked --release --target wasm32-wasip2 \
  --manifest-path guests/Cargo.toml --target-dir guests/target
cargo build --quiet --locked --release -p runtime
mkdir -p "$out/guests"
cp "${CARGO_TARGET_DIR:-target}/release/runtime" "$out/runtime"
for g in order point exchange shop payment stock; do
  cp "guests/target/wasm32-wasip2/release/$g.wasm" "$out/guests/"
done
echo "built $out/runtime and $(ls "$out/guests" | wc -l) guests"
