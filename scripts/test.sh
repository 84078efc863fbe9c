#!/usr/bin/env bash
# Installs the test prerequisites and runs the whole test suite. CI runs exactly this.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -- NAME    # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_nix

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

say "cargo test"
[ "${1:-}" = "--" ] && shift
cargo test --all-targets --locked "$@"
