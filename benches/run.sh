#!/usr/bin/env bash
# The benchmark command: installs what it needs (zstd, wrk, htpasswd from Debian; awscli
# from PyPI into .tools/bench; SeaweedFS from PyPI), builds cachepush in release mode,
# creates the workloads in the local Nix store (cached between runs), runs every contender
# against a loopback SeaweedFS and writes docs/benchmarks.md and docs/benchmarks.json.
#
#   benches/run.sh           # full: W1-W4 and the gateway, 3 runs each (~15 min here)
#   benches/run.sh --short   # CI smoke run: small workloads, one run; report under .cache/bench/short
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_nix
for tool in zstd:zstd wrk:wrk htpasswd:apache2-utils curl:curl; do
  command -v "${tool%%:*}" >/dev/null || apt_install "${tool#*:}"
done
[ -x /usr/bin/time ] || apt_install time
if [ ! -x .tools/bench/bin/aws ]; then
  say "installing awscli from PyPI into .tools/bench"
  python3 -m venv .tools/bench 2>/dev/null || { apt_install python3-venv; python3 -m venv .tools/bench; }
  .tools/bench/bin/pip install -q 'awscli==1.*'
fi

say "building cachepush (release), the upload-floor client and the gc filler"
cargo build --release --locked -q
for b in put_floor gc_fill wan_proxy cpu_floor; do
  cargo bench --bench "$b" --no-run --locked -q 2>/dev/null || cargo bench --bench "$b" --no-run --locked
done

export AWS_EC2_METADATA_DISABLED=true
exec python3 benches/bench.py "$@"
