#!/usr/bin/env bash
# keycard against the proxies operators already run, side by side in one run (see
# benches/peers.py for the method): nginx `return 200` as the upstream; the upstream
# directly, nginx as a plain reverse proxy, HAProxy with jwt_verify, and keycard with a valid
# HS256 token and the Redis revocation check, in alternation over several rounds. Then keycard
# with 1000 keep-alive connections (peak RSS), and logins/s against raw argon2id hashes/s.
#
#   scripts/bench.sh [--rounds 3] [--secs 10] [--conns 50] [--workers 1] [--only keycard]
#
# Loopback only; every wrk run is bounded by its -d. Installs nginx, haproxy, wrk and
# redis-server from Debian when missing. On a shared 2-core machine only the ratios within
# one run mean anything. Exit status: 0; 1 if a run saw non-2xx answers or socket errors;
# 2 setup.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
missing=()
for tool in nginx:nginx haproxy:haproxy wrk:wrk redis-server:redis-server python3:python3; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "${tool%%:*}" \
    >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]} (Debian packages)"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
# Debian starts the packaged services; the bench runs its own on free ports.
for svc in nginx haproxy redis-server; do
  $SUDO systemctl stop "$svc" >/dev/null 2>&1 || true
done
# 1000 keep-alive connections need more than the default 1024 descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n 4096 || true

echo "==> cargo build --release --locked --bin keycard --example hash_rate"
timeout 1800 cargo build --release --locked --bin keycard --example hash_rate

exec timeout --kill-after=10 1800 python3 benches/peers.py \
  --keycard "$TARGET_DIR/release/keycard" \
  --hash-rate "$TARGET_DIR/release/examples/hash_rate" "$@"
