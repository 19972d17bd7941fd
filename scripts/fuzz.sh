#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time: scripts/fuzz.sh [SECONDS_PER_TARGET]
# (default 30). Installs cargo-fuzz if it is missing. The stable toolchain is used with
# RUSTC_BOOTSTRAP=1 (libFuzzer needs -Z sanitizer/coverage flags); set FUZZ_SANITIZER=none if
# AddressSanitizer is unavailable (Rust code is memory-safe without it; it only adds checks
# for unsafe code and C dependencies).
#
# The checked-in seeds in fuzz/corpus/<target> are read, never written: new inputs the fuzzer
# finds go to fuzz/corpus-run/<target> (git-ignored). A crash is saved by libFuzzer under
# fuzz/artifacts/<target>/ and makes this script exit non-zero after all targets have run
# (so do timeouts and out-of-memory inputs).
# Reproduce one with: RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# CI does not run this (it needs minutes of build with instrumentation); it replays the
# corpus instead in tests/fuzz_corpus.rs, as part of `cargo test`. The first build with
# instrumentation takes about 10 minutes on 2 cores; later runs start in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS_PER_TARGET]" >&2
  exit 2
fi
sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

root="$(pwd)"
targets=$(cargo fuzz list)
echo "==> building fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build --sanitizer "$sanitizer"

failed=()
for target in $targets; do
  run_dir="$root/fuzz/corpus-run/$target"
  seeds="$root/fuzz/corpus/$target"
  mkdir -p "$run_dir" "$seeds"
  log="$root/fuzz/corpus-run/$target.log"
  extra=()
  if [ -f "$root/fuzz/dicts/$target.dict" ]; then
    extra+=("-dict=$root/fuzz/dicts/$target.dict")
  fi
  start=$(date +%s)
  if cargo fuzz run --sanitizer "$sanitizer" "$target" "$run_dir" "$seeds" -- \
    -max_total_time="$seconds" -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
    status=ok
  else
    status=FAIL
    failed+=("$target")
  fi
  elapsed=$(($(date +%s) - start))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)
  printf '%-14s %-5s %4ss  %10s execs  %7s execs/s  cov %s\n' \
    "$target" "$status" "$elapsed" "${runs:-?}" "${speed:-?}" "${cov:-?}"
  if [ "$status" != ok ]; then
    grep -E '^(thread .* panicked|.*(panicked at|ERROR: |SUMMARY: ))|Test unit written to' "$log" \
      | head -n 8 | sed 's/^/    /' || true
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "==> failures (crash, panic, timeout or OOM) in: ${failed[*]} (logs in fuzz/corpus-run/<target>.log, inputs in fuzz/artifacts/)"
  exit 1
fi
echo "==> no crashes"
