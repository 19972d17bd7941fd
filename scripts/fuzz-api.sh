#!/usr/bin/env bash
# Property-based fuzzing of the endpoints keycard answers itself, driven by openapi.yaml.
#
# Starts a throwaway redis-server and keycard on free loopback ports, then runs schemathesis
# (from PyPI, in a venv under target/) against http://127.0.0.1:PORT. Fails on any 5xx, any
# status, header, content type or body the document does not allow, and any method the
# document does not list that is not refused 405 with a matching Allow. All traffic stays on
# 127.0.0.1; every process it starts is stopped on exit.
#
# Environment (all optional):
#   FUZZ_API_TIMEOUT        seconds for the fuzzing run itself, from starting redis to the
#                           last schemathesis request (default 120)
#   FUZZ_API_SETUP_TIMEOUT  seconds for each setup step: venv + pip, cargo build (default 900)
#   FUZZ_API_MAX_EXAMPLES   schemathesis --max-examples per operation (default 100)
#   FUZZ_API_SEED           hypothesis seed, for reproducible runs (default 20240601)
#   FUZZ_API_SCHEMATHESIS   pip requirement (default the pinned, tested version below)
#   KEYCARD_BIN             a keycard binary to test instead of building one
#   FUZZ_API_REPORT_DIR     where the JUnit report and keycard's log go (default
#                           target/fuzz-api-report)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

FUZZ_API_TIMEOUT=${FUZZ_API_TIMEOUT:-120}
FUZZ_API_SETUP_TIMEOUT=${FUZZ_API_SETUP_TIMEOUT:-900}
MAX_EXAMPLES=${FUZZ_API_MAX_EXAMPLES:-100}
SEED=${FUZZ_API_SEED:-20240601}
# Pinned: the CLI flags and checks below are those of this version.
SCHEMATHESIS=${FUZZ_API_SCHEMATHESIS:-schemathesis==4.32.5}
REPORT_DIR=${FUZZ_API_REPORT_DIR:-$ROOT/target/fuzz-api-report}
VENV=$ROOT/target/fuzz-api-venv

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'fuzz-api: %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------- setup (bounded)

# Debian packages this script needs, installed when missing (a fresh machine may lack them).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]} (Debian packages)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The venv is reused while it holds the requested version; the system Python is untouched.
if [ ! -x "$VENV/bin/st" ] || [ "$(cat "$VENV/.requirement" 2>/dev/null)" != "$SCHEMATHESIS" ]; then
  log "installing $SCHEMATHESIS into $VENV"
  rm -rf "$VENV"
  timeout "$FUZZ_API_SETUP_TIMEOUT" python3 -m venv "$VENV"
  timeout "$FUZZ_API_SETUP_TIMEOUT" "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$SCHEMATHESIS"
  printf '%s' "$SCHEMATHESIS" >"$VENV/.requirement"
fi
log "$("$VENV/bin/st" --version)"

if [ -n "${KEYCARD_BIN:-}" ]; then
  KEYCARD=$KEYCARD_BIN
else
  log "cargo build --locked"
  timeout "$FUZZ_API_SETUP_TIMEOUT" cargo build --locked --quiet --bin keycard
  KEYCARD=${CARGO_TARGET_DIR:-$ROOT/target}/debug/keycard
fi
[ -x "$KEYCARD" ] || die "no keycard binary at $KEYCARD"

# --------------------------------------------------------------------------- fuzzing run

WORK=$(mktemp -d "${TMPDIR:-/tmp}/keycard-fuzz-api.XXXXXX")
mkdir -p "$REPORT_DIR"
PIDS=()
cleanup() {
  local status=$?
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

START=$(date +%s)
DEADLINE=$((START + FUZZ_API_TIMEOUT))
remaining() { echo $((DEADLINE - $(date +%s))); }

# A port that was free a moment ago.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)

PORT=$(free_port)
ADMIN_PORT=$(free_port)
CLOSED_PORT=$(free_port) # nothing listens there: the upstream is never reached anyway
# 256 random bits, hex; given to keycard alone, through its environment.
KEYCARD_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')

cat >"$WORK/keycard.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[store]
url = "redis://127.0.0.1:$REDIS_PORT/0"
prefix = "keycard-fuzz:"

[tokens]
algorithm = "HS256"
secret = "\${KEYCARD_SECRET}"
issuer = "keycard"
access_ttl = "15m"
refresh_ttl = "1h"

# Cheap hashing so hundreds of registrations and logins fit the time budget.
[passwords]
memory_kib = 64
iterations = 1
parallelism = 1

# No throttling: otherwise most logins would be 429 after a few generated failures.
[throttle]
user_limit = 0
address_limit = 0

[[routes]]
path = "/"
upstream = "http://127.0.0.1:$CLOSED_PORT"
auth = "required"
EOF

KEYCARD_SECRET=$KEYCARD_SECRET "$KEYCARD" check --config "$WORK/keycard.toml" >/dev/null || die "generated config rejected"

KEYCARD_SECRET=$KEYCARD_SECRET KEYCARD_LOG=${KEYCARD_LOG:-warn} "$KEYCARD" --config "$WORK/keycard.toml" \
  2>"$REPORT_DIR/keycard.log" &
KEYCARD_PID=$!
PIDS+=("$KEYCARD_PID")

log "waiting for keycard on 127.0.0.1:$PORT (readyz on :$ADMIN_PORT)"
until curl -fsS --noproxy '*' -m 1 -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz" 2>/dev/null; do
  kill -0 "$KEYCARD_PID" 2>/dev/null || die "keycard exited during startup (log: $REPORT_DIR/keycard.log)"
  [ $(($(date +%s) - START)) -lt 20 ] || die "keycard not ready within 20s (log: $REPORT_DIR/keycard.log)"
  sleep 0.1
done

# One real user, so logout and refresh are also exercised with valid tokens: schemathesis
# logs in as it (dynamic auth below) whenever it needs a token.
FUZZ_USER=fuzz-user
FUZZ_PASSWORD=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
status=$(curl -sS --noproxy '*' -m 10 -o "$WORK/register.json" -w '%{http_code}' \
  -H 'Content-Type: application/json' \
  -d "{\"username\":\"$FUZZ_USER\",\"password\":\"$FUZZ_PASSWORD\"}" \
  "http://127.0.0.1:$PORT/register")
[ "$status" = 201 ] || die "registering the fuzz user: $status $(cat "$WORK/register.json")"

cat >"$WORK/schemathesis.toml" <<'EOF'
# No state kept between runs (it would make runs depend on earlier ones).
[cache]
enabled = false

# Tokens for the two bearer schemes, fetched from /login. schemathesis logs in again after a
# 401 (its default `retry_on`): logout revokes the access token, and every use of a refresh
# token revokes it (rotation).
[auth.dynamic.openapi.bearerAccess]
path = "/login"
method = "post"
payload = { username = "${FUZZ_USER}", password = "${FUZZ_PASSWORD}" }
extract_selector = "/access_token"

[auth.dynamic.openapi.bearerRefresh]
path = "/login"
method = "post"
payload = { username = "${FUZZ_USER}", password = "${FUZZ_PASSWORD}" }
extract_selector = "/refresh_token"
EOF

# Checks: no 5xx; the conformance family (status, content type, headers, body schema); the
# method rules (an unlisted method must be 405 with an Allow naming the listed ones); and
# that the bearer-protected operations refuse missing or bogus tokens.
# Left out on purpose: negative_data_rejection and positive_data_acceptance. The password
# rule is 8-1024 *bytes* and JSON Schema can only count characters, so openapi.yaml's
# minLength/maxLength are approximations: "?c" plus five 4-byte characters (7 characters,
# 22 bytes) is rightly accepted, and 1024 multi-byte characters are rightly refused.
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance
CHECKS=$CHECKS,response_headers_conformance,response_schema_conformance
CHECKS=$CHECKS,unsupported_method,allow_header_conformance,ignored_auth,missing_required_header

budget=$(remaining)
[ "$budget" -gt 10 ] || die "no time left for schemathesis (FUZZ_API_TIMEOUT=$FUZZ_API_TIMEOUT)"
log "schemathesis: max $MAX_EXAMPLES examples per operation, seed $SEED, ${budget}s left"
set +e
# Run from the scratch directory so nothing schemathesis writes lands in the work tree.
(cd "$WORK" && exec timeout --kill-after=5 "$budget" \
  env NO_COLOR=1 FUZZ_USER="$FUZZ_USER" FUZZ_PASSWORD="$FUZZ_PASSWORD" "$VENV/bin/st" --config-file "$WORK/schemathesis.toml" run "$ROOT/openapi.yaml" \
  --url "http://127.0.0.1:$PORT" \
  --checks "$CHECKS" \
  --mode all \
  --phases examples,coverage,fuzzing \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --generation-database none \
  --workers 1 \
  --request-timeout 10 \
  --report junit --report-dir "$REPORT_DIR" \
  --no-color)
st_status=$?
set -e

kill -0 "$KEYCARD_PID" 2>/dev/null || die "keycard died during the run (log: $REPORT_DIR/keycard.log)"
if grep -q 'panicked' "$REPORT_DIR/keycard.log"; then
  die "keycard panicked during the run (log: $REPORT_DIR/keycard.log)"
fi
case $st_status in
  0) ;;
  124 | 137) die "schemathesis did not finish within FUZZ_API_TIMEOUT=${FUZZ_API_TIMEOUT}s" ;;
  *) die "schemathesis found failures (exit $st_status); report in $REPORT_DIR" ;;
esac
log "no failures in $(($(date +%s) - START))s"
