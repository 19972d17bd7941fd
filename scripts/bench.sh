#!/usr/bin/env bash
# Benchmark: requests/s, p50 and p99 latency and keycard's RSS for
#   a) a proxied GET with a valid token (keycard -> echo upstream)
#   b) the same GET straight to the echo upstream (baseline: keycard's overhead is a - b)
#   c) an invalid token (bad signature, 401)   d) the public route   e) a revoked token (401)
#   f) logins (argon2id, bounded by the hashing pool)
# on loopback only, SECONDS per scenario (default 10, at most 120) plus a 1 s warm-up each.
#
#   scripts/bench.sh [SECONDS] [extra flags, e.g. --concurrency 64 --no-wrk --wrk-threads 1]
#
# Uses wrk (Debian package, installed with apt-get if missing) for the load, falling back to
# the generator's built-in client (examples/soak.rs) when wrk cannot be installed. The client,
# keycard and the upstream share this machine's CPUs: compare rows, not absolute numbers
# across machines. Exit status: 0, 1 if a scenario saw unexpected answers or errors, 2 setup.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-10}"
shift || true
if ! [[ "$SECS" =~ ^[0-9]+$ ]] || [ "$SECS" -lt 1 ] || [ "$SECS" -gt 120 ]; then
  echo "usage: $0 [SECONDS 1..120] [generator flags]" >&2
  exit 2
fi
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]} (Debian packages)"
  $SUDO apt-get update -qq || true
  for pkg in "${missing[@]}"; do
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$pkg" >/dev/null \
      || echo "    could not install $pkg"
  done
fi
command -v redis-server >/dev/null 2>&1 || { echo "redis-server is required" >&2; exit 2; }
command -v wrk >/dev/null 2>&1 || echo "==> wrk not available: using the built-in client"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
build_and_start_redis

status=0
# 6 scenarios x (SECS + 1 s warm-up) plus setup and shutdown.
timeout --kill-after=10 $((6 * (SECS + 1) + 180)) \
  "$TARGET_DIR/release/examples/soak" bench \
  --keycard "$TARGET_DIR/release/keycard" \
  --redis "redis://127.0.0.1:$REDIS_PORT/0" \
  --scenario-secs "$SECS" "$@" || status=$?
exit "$status"
