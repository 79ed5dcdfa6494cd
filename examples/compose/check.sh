#!/usr/bin/env bash
# Check the compose stack without a container engine (none runs on CI machines): validate the
# file with docker-compose 1.29.2 from PyPI (installed once into SAGA_CACHE; it needs
# pyyaml 5.3.1 first, 5.4.1 does not build on Python 3.11), then build what the Dockerfile
# builds, with the same script, into SAGA_CACHE/image.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${SAGA_CACHE:-$HOME/.cache/saga-runtime}"
venv="$cache/compose-venv"
if [ ! -x "$venv/bin/docker-compose" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check pyyaml==5.3.1
  "$venv/bin/pip" install --quiet --disable-pip-version-check docker-compose==1.29.2
fi
"$venv/bin/docker-compose" -f examples/compose/docker-compose.yml config -q
services="$("$venv/bin/docker-compose" -f examples/compose/docker-compose.yml config --services | sort | tr '\n' ' ')"
[ "$services" = "kafka postgres prometheus runtime-1 runtime-2 " ] || { echo "unexpected services: $services" >&2; exit 1; }
echo "compose file valid: $services"
# Prometheus: its config, the recording and alerting rules, and their unit tests.
source scripts/common.sh
ensure_promtool
promtool check config examples/compose/prometheus.yml
promtool test rules examples/compose/rules.test.yml
# What the Dockerfile's build stage runs, and the files its final stage copies.
grep -q 'RUN scripts/build-release.sh /out' Dockerfile
scripts/build-release.sh "$cache/image"
for g in order point exchange shop payment stock; do
  grep -q "/opt/saga/guests/$g.wasm" examples/compose/docker-compose.yml
  test -s "$cache/image/guests/$g.wasm"
done
"$cache/image/runtime" --version
