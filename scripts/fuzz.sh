#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time (default 20 s each) from the
# committed corpus, and fails on any crash. CI runs this from scripts/test.sh.
#
#   scripts/fuzz.sh            # every target, 20 s each
#   FUZZ_SECS=300 scripts/fuzz.sh narinfo
#
# Needs a nightly toolchain (cargo-fuzz uses sanitizers) and cargo-fuzz, which this
# script installs from crates.io into .tools/fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

secs=${FUZZ_SECS:-20}
rustup run nightly rustc --version >/dev/null 2>&1 \
  || die "the fuzz targets need a nightly toolchain: run \`rustup toolchain install nightly\`"
if [ ! -x .tools/fuzz/bin/cargo-fuzz ]; then
  say "installing cargo-fuzz from crates.io into .tools/fuzz"
  cargo install --locked --quiet --root .tools/fuzz cargo-fuzz
fi
export PATH=$PWD/.tools/fuzz/bin:$PATH

# Runs one target; its exit status is the fuzzer's own (not grep's, which only picks the
# lines worth showing from the log).
run_target() { # target input-dir-or-file extra-args...
  local t=$1 input=$2 log status
  shift 2
  log=$(mktemp)
  set +e
  cargo +nightly fuzz run "$t" "$input" -- "$@" >"$log" 2>&1
  status=$?
  set -e
  grep -E 'stat::number_of_executed_units|ERROR|panicked|SUMMARY|Done|error' "$log" || true
  rm -f "$log"
  return "$status"
}

cd fuzz
# Self-check: a known crashing input (kept outside the corpus) must fail its run, or this
# step could not fail at all.
say "fuzz self-check: the canary input must crash the narinfo target"
if CACHEPUSH_FUZZ_CANARY=1 run_target narinfo canary/crash -runs=1 >/dev/null; then
  die "the fuzz self-check passed a crashing input: scripts/fuzz.sh cannot detect crashes"
fi
rm -rf artifacts/narinfo/crash-*

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(narinfo store_path keys cache_info)
for t in "${targets[@]}"; do
  say "fuzzing $t for ${secs}s"
  # A scratch copy of the corpus, so that new inputs found in CI do not dirty the checkout.
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  status=0
  run_target "$t" "$work" -max_total_time="$secs" -print_final_stats=1 || status=$?
  rm -rf "$work"
  [ "$status" -eq 0 ] || die "fuzz target $t failed with status $status (artifacts in fuzz/artifacts/$t)"
done
