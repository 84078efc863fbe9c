#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian machine with Rust:
# installs Nix if missing, builds a small closure, generates a signing key, publishes the
# closure with cachepush, and has the real Nix substitute it into a fresh store with
# signatures checked. Everything lives under .cache/demo and is kept for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_nix

say "building cachepush"
cargo build --release --locked -q
CACHEPUSH=$PWD/target/release/cachepush

work=$PWD/.cache/demo
rm -rf "$work" && mkdir -p "$work"

say "building a small closure with Nix"
# A new salt each run gives store paths that no cache has seen yet.
top=$(nix-build tests/fixtures/closure.nix --no-out-link --argstr salt "demo-$(date +%s)" \
  --option substituters "")
echo "$top"

say "generating a signing key"
pubkey=$("$CACHEPUSH" keygen demo-cache-1 "$work/secret.key")
echo "$pubkey"

say "publishing the closure"
"$CACHEPUSH" copy --to "file://$work/cache" --signing-key "$work/secret.key" "$top"

say "substituting it with the real Nix into a fresh store (signatures checked)"
nix --extra-experimental-features nix-command copy \
  --from "file://$work/cache" --to "$work/fresh-store" "$top" \
  --option trusted-public-keys "$pubkey" --option require-sigs true
test -e "$work/fresh-store$top" || die "$top was not substituted"

say "done: $top substituted from a cachepush cache"
