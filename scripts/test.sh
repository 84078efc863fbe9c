#!/usr/bin/env bash
# Installs the test prerequisites and runs the whole test suite. CI runs exactly this.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -- NAME    # extra arguments go to `cargo test`
#
# Starts SeaweedFS and Ceph RADOS Gateway once for the whole run (on 127.0.0.1 only) and
# stops them by pid on exit; the tests read their endpoints from CACHEPUSH_TEST_*.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# The build and the servers need about 12 GB; below that every later step fails in a way
# that hides why.
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${free_kb:-0}" -lt $((12 * 1024 * 1024)) ]; then
  say "warning: only $((free_kb / 1024)) MiB free on $(df -P . | awk 'NR==2 {print $6}'); the test run needs about 12 GB"
fi

ensure_nix
# htpasswd makes the gateway's bcrypt entries exactly as users do; curl and openssl drive
# the gateway over TLS and unix sockets.
for tool in htpasswd:apache2-utils curl:curl openssl:openssl; do
  command -v "${tool%%:*}" >/dev/null || apt_install "${tool#*:}"
done
export AWS_EC2_METADATA_DISABLED=true

say "cargo fmt --check"
cargo fmt --all -- --check
rustfmt --edition 2024 --check fuzz/src/lib.rs fuzz/fuzz_targets/*.rs

say "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

say "building the tests"
[ "${1:-}" = "--" ] && shift
cargo test --lib --bins --tests --locked --no-run -q

servers=$PWD/.cache/s3
trap 'scripts/s3-servers.sh stop "$servers"' EXIT
say "starting the S3 servers"
scripts/s3-servers.sh start "$servers"
. "$servers/env"

say "cargo test"
# Not --all-targets: benches/put_floor.rs is a tool the benchmark runs, not a test.
cargo test --lib --bins --tests --locked "$@"

# The cargo-fuzz targets, each for a bounded time from the committed corpus.
if [ $# -eq 0 ]; then
  say "fuzzing (scripts/fuzz.sh)"
  FUZZ_SECS=${FUZZ_SECS:-20} scripts/fuzz.sh
fi

# The benchmark's short mode: proves the harness still runs and prints its table. It
# asserts no time (machines here are shared and noisy); `benches/run.sh` is the real run.
if [ $# -eq 0 ]; then
  say "benchmark smoke run (benches/run.sh --short)"
  benches/run.sh --short
fi

# The README's main job, end to end (its release build is the benchmark's), on a port of
# its own next to the test servers.
if [ $# -eq 0 ]; then
  say "the main job end to end (scripts/demo.sh)"
  CACHEPUSH_SEAWEED_PORT=$(( ${CACHEPUSH_SEAWEED_PORT:-9400} + 10 )) scripts/demo.sh
fi
