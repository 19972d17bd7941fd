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

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
build_and_start_redis

echo "==> soak for ${DURATION}s"
status=0
# Setup, the load, a 5 s idle sample and the drain fit well inside DURATION + 240 s.
timeout --kill-after=10 $((DURATION + 240)) \
  "$TARGET_DIR/release/examples/soak" soak \
  --keycard "$TARGET_DIR/release/keycard" \
  --redis "redis://127.0.0.1:$REDIS_PORT/0" \
  --duration "$DURATION" "$@" || status=$?
exit "$status"
