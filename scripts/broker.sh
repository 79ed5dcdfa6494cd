#!/usr/bin/env bash
# Install (once) and start the Kafka-protocol test broker, noida-db 0.2.3, pinned.
#   scripts/broker.sh start   start it in the background (no-op if already listening)
#   scripts/broker.sh stop    stop it
#   scripts/broker.sh clean   stop it and delete its data and log
# Environment: SAGA_BROKER_PORT (default 19092), SAGA_CACHE (default ~/.cache/saga-runtime),
# SAGA_BROKER_KEEP=1 to start on the data a stop saved (a broker restart) instead of afresh.
# Any Kafka works instead: point SAGA_KAFKA_BROKERS at it and skip this script.
set -euo pipefail
port="${SAGA_BROKER_PORT:-19092}"
cache="${SAGA_CACHE:-$HOME/.cache/saga-runtime}"
venv="$cache/noida-venv"
data="$cache/broker-$port"
log="$cache/broker-$port.log"
pidfile="$cache/broker-$port.pid"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

case "${1:-start}" in
start)
  if listening; then echo "broker already listening on 127.0.0.1:$port"; exit 0; fi
  mkdir -p "$cache"
  if [ ! -x "$venv/bin/noida-db" ]; then
    echo "installing noida-db 0.2.3 into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check noida-db==0.2.3
  fi
  if [ "${SAGA_BROKER_KEEP:-0}" != 1 ]; then rm -rf "$data"; fi
  mkdir -p "$data"
  # The binary prints a harmless "GLIBC_2.39 not found" warning on Debian 12.
  nohup "$venv/bin/noida-db" start --only kafka --kafka-port "$port" --data-dir "$data" >"$log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 100); do
    if listening; then echo "broker listening on 127.0.0.1:$port (log: $log)"; exit 0; fi
    sleep 0.1
  done
  echo "broker did not start; log follows:" >&2; cat "$log" >&2; exit 1
  ;;
stop)
  # The launcher may leave the server as a child process: stop whatever serves this port.
  if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  pkill -f "noida-db start --only kafka --kafka-port $port " 2>/dev/null || true
  for _ in $(seq 1 100); do listening || exit 0; sleep 0.1; done
  # A broker with a large state can take long to save it: its state is thrown away at the
  # next start anyway.
  pkill -9 -f "noida-db start --only kafka --kafka-port $port " 2>/dev/null || true
  for _ in $(seq 1 50); do listening || exit 0; sleep 0.1; done
  echo "broker on port $port did not stop" >&2; exit 1
  ;;
clean)
  "$0" stop
  rm -rf "$data" "$log" "$pidfile"
  ;;
*) echo "usage: $0 start|stop|clean" >&2; exit 2 ;;
esac
