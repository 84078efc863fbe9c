#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian machine with Rust:
# installs Nix if missing, starts a loopback S3 server (SeaweedFS from PyPI), builds a small
# closure, generates a signing key, publishes the closure to a private bucket with cachepush,
# serves the bucket with `cachepush gateway` (HTTP Basic auth from a netrc file), and has
# the real Nix substitute through it into a fresh store with signatures checked.
# Everything lives under .cache/demo and is kept for inspection; the server is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_nix

say "building cachepush"
cargo build --release --locked -q
CACHEPUSH=$PWD/target/release/cachepush

work=$PWD/.cache/demo
rm -rf "$work" && mkdir -p "$work"

say "starting SeaweedFS on 127.0.0.1"
export CACHEPUSH_SEAWEED_PORT=${CACHEPUSH_SEAWEED_PORT:-9410}
trap 'scripts/s3-servers.sh stop "$work/s3"' EXIT
scripts/s3-servers.sh start "$work/s3" seaweedfs
. "$work/s3/env"
endpoint=$CACHEPUSH_TEST_SEAWEEDFS
# The standard AWS variables carry the credentials, as in CI; never on a command line.
export AWS_ACCESS_KEY_ID=$CACHEPUSH_TEST_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$CACHEPUSH_TEST_SECRET_KEY
export AWS_EC2_METADATA_DISABLED=true
make_bucket "$endpoint" private-cache

say "building a small closure with Nix"
# A new salt each run gives store paths that no cache has seen yet.
top=$(nix-build tests/fixtures/closure.nix --no-out-link --argstr salt "demo-$(date +%s)" \
  --option substituters "")
echo "$top"

say "generating a signing key"
pubkey=$("$CACHEPUSH" keygen demo-cache-1 "$work/secret.key")
echo "$pubkey"

cache="s3://private-cache?endpoint=$endpoint&region=us-east-1"
say "publishing the closure to $cache"
"$CACHEPUSH" copy --to "$cache" --signing-key "$work/secret.key" "$top"

say "publishing it again: everything is already there"
"$CACHEPUSH" copy --to "$cache" --signing-key "$work/secret.key" "$top"

code=$(curl -s -o /dev/null -w '%{http_code}' "$endpoint/private-cache/nix-cache-info")
[ "$code" = 403 ] || die "the bucket should refuse anonymous reads, got HTTP $code"
say "the bucket is private (anonymous GET: HTTP $code); serving it with cachepush gateway"
# A client account for the gateway, made the way users make them (bcrypt, htpasswd -nB).
command -v htpasswd >/dev/null || apt_install apache2-utils
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
printf %s "$password" | htpasswd -niB demo >"$work/htpasswd" 2>/dev/null
printf 'machine localhost login demo password %s\n' "$password" >"$work/netrc"
chmod 600 "$work/netrc"
port=${CACHEPUSH_DEMO_GATEWAY_PORT:-9480}
"$CACHEPUSH" gateway --from "$cache" --listen "127.0.0.1:$port" \
  --htpasswd "$work/htpasswd" 2>"$work/gateway.log" &
gateway_pid=$!
trap 'kill $gateway_pid 2>/dev/null || true; scripts/s3-servers.sh stop "$work/s3"' EXIT
for _ in $(seq 1 50); do
  curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
  sleep 0.1
done

say "substituting it with the real Nix through the gateway into a fresh store (signatures checked)"
# A narinfo disk cache of its own: Nix remembers narinfos by URL, and an earlier run on
# this port served another bucket.
XDG_CACHE_HOME="$work/nix-cache" nix --extra-experimental-features nix-command copy \
  --from "http://localhost:$port" --to "$work/fresh-store" "$top" \
  --option trusted-public-keys "$pubkey" --option require-sigs true \
  --option netrc-file "$work/netrc"
test -e "$work/fresh-store$top" || die "$top was not substituted"
kill -TERM $gateway_pid && wait $gateway_pid || die "the gateway did not stop cleanly"
echo "gateway log:" && sed 's/^/  /' "$work/gateway.log"

say "done: $top substituted from a private bucket through cachepush gateway"
