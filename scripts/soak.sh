#!/usr/bin/env bash
# Soak test: mixed valid, invalid, expired, revoked, login, refresh and logout traffic against
# the release keycard binary for SECONDS (default 60, at most 900), on loopback only.
#
#   scripts/soak.sh [SECONDS] [extra generator flags, e.g. --concurrency 64 --keep]
#
# Starts a throwaway redis-server (installed with apt-get if missing, like scripts/test.sh) on
# a free loopback port, builds keycard and the generator (examples/soak.rs) in release mode,
# and runs the generator, which prints a table of responses by kind and status with p50/p99
# latency, keycard's RSS over time, and a verdict. Exit status: 0 pass, 1 fail (unexpected
# responses, 5xx for valid traffic, RSS growth, crash), 2 setup error, 124 overall timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-60}"
shift || true
if ! [[ "$DURATION" =~ ^[0-9]+$ ]] || [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 900 ]; then
  echo "usage: $0 [SECONDS 1..900] [generator flags]" >&2
  exit 2
fi
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "==> installing redis-server (Debian package)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

REDIS_PID=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  if [ -n "$REDIS_PID" ]; then
    kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port: a few random tries, each confirmed by PING.
start_redis() {
  local port
  for _ in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 30000))
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize no >/dev/null 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 1 100); do
      if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
        REDIS_PORT="$port"
        return 0
      fi
      kill -0 "$REDIS_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
  done
  echo "could not start redis-server on a loopback port" >&2
  return 1
}

echo "==> cargo build --release --locked --bin keycard --example soak"
timeout 1800 cargo build --release --locked --bin keycard --example soak

start_redis
echo "==> redis-server on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"

echo "==> soak for ${DURATION}s"
status=0
# Setup, the load, a 5 s idle sample and the drain fit well inside DURATION + 240 s.
timeout --kill-after=10 $((DURATION + 240)) \
  "$TARGET_DIR/release/examples/soak" soak \
  --keycard "$TARGET_DIR/release/keycard" \
  --redis "redis://127.0.0.1:$REDIS_PORT/0" \
  --duration "$DURATION" "$@" || status=$?
exit "$status"
