# shellcheck shell=bash
# Shared by scripts/soak.sh and scripts/bench.sh; sourced from the repository root once
# redis-server is installed. Sourcing sets the EXIT trap that stops the throwaway redis-server
# and makes INT/TERM exit with 130; build_and_start_redis builds keycard and the generator
# (examples/soak.rs) in release mode and sets REDIS_PORT and REDIS_PID.

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

build_and_start_redis() {
  echo "==> cargo build --release --locked --bin keycard --example soak"
  timeout 1800 cargo build --release --locked --bin keycard --example soak

  start_redis
  echo "==> redis-server on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"
}
