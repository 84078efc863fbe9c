# Shared shell helpers for scripts/demo.sh and scripts/test.sh. Sourced, not run.

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs apt-get as root, or through sudo when we are not root.
apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ -z "${CACHEPUSH_APT_UPDATED:-}" ]; then
    $sudo apt-get update -q >/dev/null || die "apt-get update failed"
    export CACHEPUSH_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}

# Nix 2.8 from Debian: the real client that judges what cachepush writes.
ensure_nix() {
  if ! command -v nix-store >/dev/null || ! command -v nix >/dev/null; then
    say "installing nix-bin from Debian"
    apt_install nix-bin
  fi
  # The fixtures build with the host's /bin/sh and /usr/bin, so outside Nix's sandbox
  # (Debian's nix-bin turns it on where the kernel allows). Debian's package creates no
  # nixbld group, and root's default build-users-group is nixbld, so without the group
  # root builds as itself. Set for the processes these scripts start only: nothing is
  # written to /etc/nix, and a configured multi-user Nix keeps its own settings.
  local conf="sandbox = false"
  if [ "$(id -u)" = 0 ] && ! getent group nixbld >/dev/null; then
    conf="$conf
build-users-group ="
  fi
  export NIX_CONFIG="${NIX_CONFIG:+$NIX_CONFIG
}$conf"
  nix-store --version >/dev/null || die "nix-store does not run"
}

# Creates a bucket with a SigV4-signed PUT (curl, no SDK needed): make_bucket ENDPOINT NAME.
# Reads the credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY through a config
# file, so that they never appear on a command line.
make_bucket() {
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -K - -X PUT "$1/$2" <<CURL
aws-sigv4 = "aws:amz:us-east-1:s3"
user = "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
header = "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
CURL
  )
  case $code in
    200|409) ;;
    *) die "creating bucket $2 at $1 failed with HTTP $code" ;;
  esac
}
