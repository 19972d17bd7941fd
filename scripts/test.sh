#!/usr/bin/env bash
# Installs what the tests need, then runs every check CI runs: fmt, clippy, the deploy lint,
# all tests.
# The integration tests start a real redis-server (and run PyJWT); they fail, never skip,
# without them.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the integration tests use: redis-server, nginx, and PyJWT (tests/keys.rs checks
# that a standard JWT library verifies keycard's tokens against its JWKS).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# tests/forward_auth.rs runs keycard behind a real nginx (auth_request).
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
/usr/bin/python3 -c 'import jwt, cryptography' >/dev/null 2>&1 ||
  missing+=(python3 python3-jwt python3-cryptography)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]} (Debian packages)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
redis-server --version
/usr/bin/python3 -c 'import jwt; print("PyJWT", jwt.__version__)'
{ [ -x /usr/sbin/nginx ] && /usr/sbin/nginx -v; } || nginx -v

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "==> scripts/lint-deploy.sh (Kubernetes manifests: kubernetes-validate; Dockerfile: hadolint)"
scripts/lint-deploy.sh

echo "==> cargo test"
mkdir -p target
cargo test --locked 2>&1 | tee target/test-output.log

echo "==> scripts/fuzz-api.sh (schemathesis against openapi.yaml, bounded)"
scripts/fuzz-api.sh

# One closing line for the whole run (cargo's last line is the doc-tests', which run none).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "total: %d passed, %d failed, %d skipped\n", p, f, i }' \
  target/test-output.log
