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

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(narinfo store_path keys cache_info)
cd fuzz
for t in "${targets[@]}"; do
  say "fuzzing $t for ${secs}s"
  # A scratch copy of the corpus, so that new inputs found in CI do not dirty the checkout.
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  cargo +nightly fuzz run "$t" "$work" -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
    | grep -E 'stat::number_of_executed_units|ERROR|panicked|SUMMARY|Done' || true
  status=${PIPESTATUS[0]}
  rm -rf "$work"
  [ "$status" -eq 0 ] || die "fuzz target $t failed (artifacts in fuzz/artifacts/$t)"
done
