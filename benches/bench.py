#!/usr/bin/env python3
"""cachepush benchmarks: workloads in the local Nix store, a loopback SeaweedFS, each
contender several times in the same run; writes docs/benchmarks.md and
docs/benchmarks.json. Run through benches/run.sh, which installs what this needs.

Reports medians and min-max of several runs, and ratios measured in the same run; never
asserts a time (machines here are shared and noisy).
"""

import argparse
import base64
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "bench"
CP = ROOT / "target" / "release" / "cachepush"
AWS = ROOT / ".tools" / "bench" / "bin" / "aws"
PORT = int(os.environ.get("CACHEPUSH_BENCH_PORT", "9420"))
ENDPOINT = f"http://127.0.0.1:{PORT}"
NIX = ["nix", "--extra-experimental-features", "nix-command"]
LEVEL = 3  # zstd level for every contender
# The request counts of cachepush's JSON (the rest of "requests" is retries, throttling and
# the adaptive limit, reported apart).
KINDS = ("head", "get", "put", "multipart", "delete", "list")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, env=None, stdin=None, check=True, capture=True):
    r = subprocess.run(
        cmd,
        env=env,
        input=stdin,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )
    if check and r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr}")
    return r


# ---------------------------------------------------------------------------- workloads


def sources():
    """Real binaries and libraries on this machine, largest first, deterministic."""
    out = []
    for d in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"]:
        p = Path(d)
        if not p.is_dir():
            continue
        for f in sorted(p.iterdir()):
            try:
                if f.is_file() and not f.is_symlink() and f.stat().st_size >= 256 * 1024:
                    out.append((str(f), f.stat().st_size))
            except OSError:
                pass
    out.sort(key=lambda x: (-x[1], x[0]))
    if not out:
        raise SystemExit("no binaries found to cut workloads from")
    return out


def cut(rng, srcs, size):
    src, n = srcs[rng.randrange(len(srcs))]
    size = min(size, n)
    return [src, rng.randrange(0, max(1, n - size)), size]


def small_paths(rng, srcs, count, prefix, lo_kib, hi_kib, first_index=0):
    entries = []
    for i in range(count):
        total = int(math.exp(rng.uniform(math.log(lo_kib * 1024), math.log(hi_kib * 1024))))
        nfiles = rng.randint(1, 20)
        cuts = sorted(rng.sample(range(1, total), min(nfiles - 1, total - 1))) if nfiles > 1 else []
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [total]) if b - a > 0]
        k = min(first_index + i, rng.randint(0, 3))
        deps = sorted(rng.sample(range(first_index + i), k)) if k else []
        entries.append({"name": f"{prefix}-{i:04d}", "files": [cut(rng, srcs, s) for s in sizes], "deps": deps})
    return entries


def big_path(srcs, name, mib, deps=()):
    """One path of `mib` MiB made of whole binaries and libraries (repeated if needed)."""
    want, files, i = mib << 20, [], 0
    while want > 0:
        src, n = srcs[i % len(srcs)]
        take = min(n, want)
        files.append([src, 0, take])
        want -= take
        i += 1
    return {"name": name, "files": files, "deps": list(deps)}


def specs(short):
    srcs = sources()
    rng = random.Random(20261122)
    w1 = small_paths(rng, srcs, 100 if short else 2000, "w1", 1, 50)
    w2 = [big_path(srcs, "w2", 64 if short else 1024)]
    n3, big3 = (30, [8, 12]) if short else (295, [40, 60, 80, 100, 120])
    w3 = small_paths(rng, srcs, n3, "w3", 1, 200)
    for j, mib in enumerate(big3):
        w3.append(big_path(srcs[j * 7 :], f"w3-big{j}", mib, deps=rng.sample(range(len(w3)), 2)))
    return {"W1": w1, "W2": w2, "W3": w3}


def build(name, spec, short):
    d = WORK / "specs"
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{name}{'-short' if short else ''}.json"
    text = json.dumps(spec)
    if not f.exists() or f.read_text() != text:
        f.write_text(text)
    t = time.time()
    r = run(
        ["nix-build", str(ROOT / "benches" / "workload.nix"), "--arg", "spec", str(f),
         "--no-out-link", "--max-jobs", "8", "--option", "substituters", ""],
    )
    paths = [l for l in r.stdout.split() if l.startswith("/")]
    log(f"{name}: {len(paths)} paths ready in {time.time() - t:.1f}s")
    return paths


def nar_size(paths):
    r = run(NIX + ["path-info", "--json"] + paths)
    data = json.loads(r.stdout)
    items = data if isinstance(data, list) else list(data.values())
    return sum(i["narSize"] for i in items)


# ------------------------------------------------------------------------ measurements


def proc_cpu(pid):
    """CPU seconds used so far by a process (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self):
        self.dir = WORK / "s3"
        env = dict(os.environ, CACHEPUSH_SEAWEED_PORT=str(PORT))
        run([str(ROOT / "scripts" / "s3-servers.sh"), "start", str(self.dir), "seaweedfs"], env=env)
        self.pid = int((self.dir / "seaweed.pid").read_text())
        envfile = (self.dir / "env").read_text()
        vals = dict(re.findall(r"export (\w+)=(\S+)", envfile))
        self.key, self.secret = vals["CACHEPUSH_TEST_ACCESS_KEY"], vals["CACHEPUSH_TEST_SECRET_KEY"]
        self.n = 0

    def env(self):
        return dict(
            os.environ,
            AWS_ACCESS_KEY_ID=self.key,
            AWS_SECRET_ACCESS_KEY=self.secret,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )

    def bucket(self, tag, name=None):
        self.n += 1
        name = name or f"b-{tag.lower()}-{os.getpid()}-{self.n}"
        cmd = f'. scripts/lib.sh; make_bucket {ENDPOINT} {name}'
        run(["bash", "-c", cmd], env=self.env())
        return name

    def stop(self):
        run([str(ROOT / "scripts" / "s3-servers.sh"), "stop", str(self.dir)], check=False)


def timed(cmd, env, stdin=None, server=None):
    """Runs `cmd` under /usr/bin/time; wall, CPU and peak RSS of it, CPU of the server."""
    s0 = proc_cpu(server.pid) if server else 0.0
    t0 = time.time()
    r = run(["/usr/bin/time", "-f", "TIME %e %U %S %M"] + cmd, env=env, stdin=stdin, check=False)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    m = re.search(r"TIME ([\d.]+) ([\d.]+) ([\d.]+) (\d+)", r.stderr)
    return {
        "wall": wall,
        "cpu": float(m.group(2)) + float(m.group(3)),
        "rss_mib": int(m.group(4)) / 1024,
        "server_cpu": (proc_cpu(server.pid) - s0) if server else None,
        "stdout": r.stdout,
    }


def cachepush_push(server, bucket, key, paths, prefix="", endpoint=ENDPOINT):
    url = f"s3://{bucket}{'/' + prefix if prefix else ''}?endpoint={endpoint}&region=us-east-1"
    m = timed([str(CP), "copy", "--to", url, "--signing-key", str(key), "--json", "-q",
               "--compression-level", str(LEVEL), "--stdin"],
              server.env(), stdin="\n".join(paths), server=server)
    j = json.loads(m.pop("stdout"))
    if j["failed"]:
        raise SystemExit(f"cachepush failed: {j['failures'][:3]}")
    m.update(requests=j["requests"], pushed=j["pushed"], sent_bytes=j["sent_bytes"])
    return m


def nix_copy_then_sync(server, bucket, key, paths, cache_dir, endpoint=ENDPOINT):
    """What a user without S3-enabled Nix does: nix copy to a directory, then aws s3 sync."""
    a = timed(NIX + ["copy", "--to", f"file://{cache_dir}?compression=zstd&compression-level={LEVEL}&secret-key={key}"] + paths,
              server.env(), server=server)
    b = timed([str(AWS), "s3", "sync", "--quiet", "--endpoint-url", endpoint, str(cache_dir), f"s3://{bucket}/"],
              server.env(), server=server)
    return {"wall": a["wall"] + b["wall"], "cpu": a["cpu"] + b["cpu"], "rss_mib": max(a["rss_mib"], b["rss_mib"]),
            "server_cpu": a["server_cpu"] + b["server_cpu"], "nix_copy_wall": a["wall"], "sync_wall": b["wall"]}


def cpu_floor(paths):
    """NAR + zstd (same level, every core) + SHA-256 over the same bytes, paths in parallel.
    Many small paths are done in one process (benches/cpu_floor.rs): three processes per path
    would measure mostly process start-up."""
    if len(paths) > 50:
        m = timed([bench_exe("cpu_floor"), str(LEVEL)], None, stdin="\n".join(paths))
        m.pop("stdout")
        return m
    script = f"nix-store --dump \"$1\" | zstd -{LEVEL} -T0 -q -c | sha256sum >/dev/null"
    m = timed(["xargs", "-P", str(os.cpu_count()), "-n", "1", "sh", "-c", script, "sh"], None, stdin="\n".join(paths))
    m.pop("stdout")
    return m


def upload_floor(server, bucket, sizes):
    f = WORK / "sizes.txt"
    f.write_text("\n".join(map(str, sizes)))
    m = timed([bench_exe("put_floor"), ENDPOINT, bucket, str(f), "64"], server.env(), server=server)
    j = json.loads(m.pop("stdout"))
    m["wall"] = j["seconds"]
    return m


def bench_exe(name):
    """The newest build of a benches/*.rs tool."""
    exe = sorted((ROOT / "target" / "release" / "deps").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    exe = [p for p in exe if os.access(p, os.X_OK) and p.suffix == ""]
    return str(exe[-1])


def gc_bench(server, n):
    """gc over a synthetic cache of n narinfos and n NARs (90% pinned): a first run that
    reads every narinfo and deletes the unpinned tenth, and a second that finds nothing to
    do from its index."""
    b = server.bucket("gc")
    log(f"gc: filling a bucket with {n} narinfos and NARs")
    fill = json.loads(run([bench_exe("gc_fill"), ENDPOINT, b, str(n), "64"], env=server.env()).stdout)
    url = f"s3://{b}?endpoint={ENDPOINT}&region=us-east-1"
    out = {"narinfos": n, "fill_seconds": fill["seconds"]}
    for name in ("first", "second"):
        log(f"gc: {name} run")
        m = timed([str(CP), "gc", url, "--keep-days", "0", "--grace", "0s", "--json"], server.env(), server=server)
        j = json.loads(m.pop("stdout"))
        out[name] = {"wall": m["wall"], "cpu": m["cpu"], "rss_mib": m["rss_mib"], "server_cpu": m["server_cpu"],
                     "requests": j["requests"], "deleted_narinfos": j["deleted_narinfos"],
                     "deleted_nars": j["deleted_nars"], "kept_narinfos": j["kept_narinfos"],
                     "fetched_narinfos": j["fetched_narinfos"]}
    return out


def object_sizes(server, bucket):
    r = run([str(AWS), "s3api", "list-objects-v2", "--endpoint-url", ENDPOINT, "--bucket", bucket, "--output", "json"],
            env=server.env())
    return [o["Size"] for o in json.loads(r.stdout or "{}").get("Contents", [])]


def summary(samples, key="wall"):
    v = [s[key] for s in samples if s.get(key) is not None]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)} if v else None


# -------------------------------------------------------------------------- wide-area


class Wan:
    """benches/wan_proxy.rs between a contender and SeaweedFS: `rtt_ms` round trip (half
    each way, handshakes included), optional bandwidth cap and throttled share."""

    def __init__(self, rtt_ms, mbit=0, throttle=0):
        self.p = subprocess.Popen([bench_exe("wan_proxy"), f"127.0.0.1:{PORT}", str(rtt_ms), str(mbit), str(throttle)],
                                  stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        m = re.search(r"listening on (\S+)", line)
        if not m:
            self.p.kill()
            raise SystemExit(f"wan_proxy did not start: {line!r}")
        self.endpoint = f"http://{m.group(1)}"

    def stop(self):
        self.p.kill()
        self.p.wait()


def depth(spec):
    """Longest chain of references in a workload (a path alone is 1): the narinfos of a
    chain are written one after the other, one round trip each."""
    d = []
    for e in spec:
        d.append(1 + max((d[i] for i in e["deps"]), default=0))
    return max(d)


def request_count(req):
    return sum(v for k, v in req.items() if k in KINDS)


FLOOR_IN_FLIGHT = 256


def wan_bench(server, key, sp, paths, points, workloads):
    """Each workload through the latency proxy at each round trip: cachepush, and nix copy
    to a directory + aws s3 sync through the same proxy; the latency floor is the closure's
    depth in round trips plus its requests at 256 in flight."""
    out = {"points_ms": points, "floor_in_flight": FLOOR_IN_FLIGHT, "workloads": {}}
    for w in workloads:
        dep, rows = depth(sp[w]), []
        for rtt in points:
            proxy = Wan(rtt)
            try:
                log(f"WAN {w} at {rtt} ms: cachepush")
                c = cachepush_push(server, server.bucket(w + "wan"), key, paths[w], endpoint=proxy.endpoint)
                log(f"WAN {w} at {rtt} ms: nix copy + aws s3 sync")
                d = WORK / "nixcopy"
                shutil.rmtree(d, ignore_errors=True)
                p = nix_copy_then_sync(server, server.bucket(w + "wanpeer"), key, paths[w], d, endpoint=proxy.endpoint)
            finally:
                proxy.stop()
            n = request_count(c["requests"])
            floor = rtt / 1000 * (dep + n / FLOOR_IN_FLIGHT)
            rows.append({"rtt_ms": rtt, "cachepush": c["wall"], "cachepush_cpu": c["cpu"], "cachepush_rss_mib": c["rss_mib"],
                         "peer": p["wall"], "peer_nix_copy": p["nix_copy_wall"], "peer_sync": p["sync_wall"],
                         "floor": floor, "requests": n, "limit_peak": c["requests"].get("limit_peak", 0)})
        out["workloads"][w] = {"paths": len(paths[w]), "depth": dep, "rows": rows}
    return out


def throttle_bench(server, key, paths, percent, rtt):
    """W1 through a proxy that answers `percent`% of requests with 503 SlowDown: the push
    must finish with exit 0, and verify must find the cache whole."""
    b = server.bucket("throttle")
    proxy = Wan(rtt, 0, percent)
    try:
        log(f"W1 with {percent}% of answers throttled at {rtt} ms")
        c = cachepush_push(server, b, key, paths, endpoint=proxy.endpoint)
    finally:
        proxy.stop()
    pk = run([str(CP), "pubkey", str(key)]).stdout.strip()
    url = f"s3://{b}?endpoint={ENDPOINT}&region=us-east-1"
    v = run([str(CP), "verify", "--full", "--json", "--trusted-key", pk, url], env=server.env(), check=False)
    j = json.loads(v.stdout)
    return {"percent": percent, "rtt_ms": rtt, "wall": c["wall"], "pushed": c["pushed"], "exit": 0,
            "throttled": c["requests"].get("throttled", 0), "limit_cuts": c["requests"].get("limit_cuts", 0),
            "limit_peak": c["requests"].get("limit_peak", 0), "requests": request_count(c["requests"]),
            "verify_exit": v.returncode, "verify_problems": len(j.get("problems", [])),
            "narinfos": j.get("narinfos")}


def resume_bench(server, key, paths, at=0.8):
    """A push of W2 (one 1 GiB NAR) SIGKILLed once the parts its journal records reach `at`
    of the file, then run again: how much of the file the second run sends."""
    home = WORK / "resume-home"
    shutil.rmtree(home, ignore_errors=True)
    journals = home / "cachepush" / "uploads"
    env = dict(server.env(), XDG_CACHE_HOME=str(home))
    log("resume: a full push of W2, for its file size")
    full = cachepush_push(server, server.bucket("resumefull"), key, paths)
    size = full["sent_bytes"]
    b = server.bucket("resume")
    url = f"s3://{b}?endpoint={ENDPOINT}&region=us-east-1"
    cmd = [str(CP), "copy", "--to", url, "--signing-key", str(key), "--json", "-q",
           "--compression-level", str(LEVEL)] + paths
    log(f"resume: the same push, killed at {at:.0%} of {size} bytes")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    while p.poll() is None:
        done = 0
        for f in journals.glob("*.json"):
            try:
                done += sum(q["size"] for q in json.loads(f.read_text())["parts"])
            except (OSError, ValueError, KeyError):
                pass
        if done >= at * size:
            p.kill()
            break
        time.sleep(0.02)
    p.wait()
    if done < at * size:
        raise SystemExit(f"resume: the push ended before {at:.0%} of the NAR was sent ({done} of {size} bytes)")
    log("resume: the re-run")
    m = timed(cmd, env, server=server)
    j = json.loads(m.pop("stdout"))
    resumed = j["requests"]["resumed_bytes"]
    return {"file_bytes": size, "killed_at_bytes": done, "resumed_bytes": resumed,
            "resent_fraction": (size - resumed) / size, "rerun_wall": m["wall"], "full_wall": full["wall"]}


def plot_svg(wan, path):
    """Time against round trip, one line per contender and workload (and the floor)."""
    W, H, L, B, T, R = 720, 420, 60, 50, 20, 200
    rows = [(w, x["rows"]) for w, x in wan["workloads"].items()]
    ymax = max(max(r["cachepush"], r["peer"], r["floor"]) for _, rs in rows for r in rs) * 1.1
    xmax = max(wan["points_ms"]) or 1
    X = lambda v: L + (W - L - R) * v / xmax
    Y = lambda v: H - B - (H - B - T) * v / ymax
    colors = {"W1": "#1f77b4", "W3": "#d62728"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">round trip (ms)</text>',
           f'<text x="14" y="{(T + H - B) / 2}" transform="rotate(-90 14 {(T + H - B) / 2})" text-anchor="middle">push time (s)</text>']
    for v in wan["points_ms"]:
        out.append(f'<text x="{X(v):.1f}" y="{H - B + 16}" text-anchor="middle">{v}</text>')
    step = 10 ** math.floor(math.log10(ymax / 2)) if ymax > 0 else 1
    t = 0.0
    while t <= ymax:
        out.append(f'<line x1="{L - 4}" y1="{Y(t):.1f}" x2="{W - R}" y2="{Y(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 8}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        t += step * (2 if ymax / step > 10 else 1)
    legend = 0
    for w, rs in rows:
        for key, label, dash in (("cachepush", "cachepush", ""), ("peer", "nix copy + aws s3 sync", "6,4"),
                                 ("floor", "latency floor", "2,3")):
            pts = " ".join(f"{X(r['rtt_ms']):.1f},{Y(r[key]):.1f}" for r in rs)
            c = colors.get(w, "#555")
            out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2" stroke-dasharray="{dash}"/>')
            for r in rs:
                out.append(f'<circle cx="{X(r["rtt_ms"]):.1f}" cy="{Y(r[key]):.1f}" r="3" fill="{c}"/>')
            ly = T + 10 + legend * 18
            out.append(f'<line x1="{W - R + 12}" y1="{ly}" x2="{W - R + 40}" y2="{ly}" stroke="{c}" stroke-width="2" stroke-dasharray="{dash}"/>')
            out.append(f'<text x="{W - R + 46}" y="{ly + 4}">{w} {label}</text>')
            legend += 1
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------------------ gateway


def wrk(url, conns, secs, headers=()):
    cmd = ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{secs}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    r = run(cmd + [url])
    out = r.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not m or not total:
        raise SystemExit(f"wrk printed no request rate for {url}:\n{out}")
    rps = float(m.group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        if m:
            lat[pct] = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    tm = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    mbps = float(tm.group(1)) * {"B": 1e-6, "KB": 1.024e-3, "MB": 1.048576, "GB": 1073.741824}[tm.group(2)] if tm else None
    codes = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    n = int(total.group(1))
    # A percentile needs samples to mean anything (wrk prints 0.00us for too few): the
    # median needs a handful, the 99th a hundred.
    # wrk's percentiles are per thread and connection; with fewer than ~20 samples per
    # connection for the median (200 for the 99th) they say nothing, and wrk prints 0.00us.
    p50 = lat.get("50") if n >= 20 * conns and lat.get("50") else None
    p99 = lat.get("99") if n >= 200 * conns and lat.get("99") else None
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "MBps": mbps,
            "requests": n, "non_2xx_3xx": int(codes.group(1)) if codes else 0}


def expect(name, r, errors):
    """A benchmark of error answers measures nothing: `errors` is "none" (every answer 2xx
    or 3xx) or "all" (every answer an error, e.g. the 404s of a miss)."""
    want = 0 if errors == "none" else r["requests"]
    if r["requests"] == 0 or r["non_2xx_3xx"] != want:
        raise SystemExit(f"{name}: {r['non_2xx_3xx']} of {r['requests']} answers were errors, "
                         f"expected {'none' if errors == 'none' else 'all'}")
    return r


def gateway(server, bucket, extra, prefix=""):
    """Starts a gateway on a free port (never a fixed one: a stale gateway left on it would
    be measured instead) and returns (process, port), read from its "listening on" line."""
    url = f"s3://{bucket}{'/' + prefix if prefix else ''}?endpoint={ENDPOINT}&region=us-east-1"
    p = subprocess.Popen([str(CP), "gateway", "--from", url, "--listen", "127.0.0.1:0", "-q"] + extra,
                         env=server.env(), stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:
        seen.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            # Keep draining its log so that it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, int(m.group(1))
    p.kill()
    raise SystemExit("the gateway did not start:\n" + "".join(seen))


def gateway_push_bench(server, key, paths, runs):
    """W1 pushed through a gateway (a push-scope token, no S3 credentials, no key in the
    client; the gateway checks every NAR, NarHash included) against the same push straight
    to the bucket, alternating, in the same run."""
    tk = WORK / "tokens.sk"
    if not tk.exists():
        run([str(CP), "keygen", "bench-tokens-1", str(tk)])
    token = run([str(CP), "token", "issue", "--token-key", str(tk), "--scope", "push", "--expires", "1d"]).stdout.strip()
    client_env = {k: v for k, v in server.env().items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    client_env["CACHEPUSH_TOKEN"] = token
    direct, through = [], []
    for r in range(runs):
        log(f"W1 through the gateway, run {r + 1}/{runs}: direct")
        direct.append(cachepush_push(server, server.bucket("gwdirect"), key, paths))
        log(f"W1 through the gateway, run {r + 1}/{runs}: through the gateway")
        g, port = gateway(server, server.bucket("gwpush"), ["--signing-key", str(key), "--token-key", str(tk)])
        try:
            m = timed([str(CP), "copy", "--to", f"http://127.0.0.1:{port}", "--json", "-q",
                       "--compression-level", str(LEVEL), "--stdin"],
                      client_env, stdin="\n".join(paths), server=server)
        finally:
            g.kill()
        j = json.loads(m.pop("stdout"))
        if j["failed"] or j["pushed"] != len(paths):
            raise SystemExit(f"the push through the gateway failed: {j['failures'][:3]}")
        through.append(m)
    return {
        "paths": len(paths),
        "direct": {"wall": summary(direct), "rss_mib": summary(direct, "rss_mib")},
        "through_gateway": {"wall": summary(through), "rss_mib": summary(through, "rss_mib"),
                            "server_cpu": summary(through, "server_cpu")},
        "ratio_gateway_over_direct": [t["wall"] / d["wall"] for t, d in zip(through, direct)],
        "measured": f"{time.strftime('%Y-%m-%d')}, {versions()['cachepush']}",
    }


def gateway_bench(server, key, w1_bucket, w1_paths, w2_paths, secs):
    res = {}
    hit = f"/{Path(w1_paths[0]).name[:32]}.narinfo"
    miss = "/" + "0" * 32 + ".narinfo"
    pw = "bench-password-1"
    htfile = WORK / "htpasswd"
    run(["bash", "-c", f"printf %s '{pw}' | htpasswd -niB bench > {htfile}"])
    auth = "Authorization: Basic " + base64.b64encode(f"bench:{pw}".encode()).decode()
    g, g_port = gateway(server, w1_bucket, [])
    ga, ga_port = gateway(server, w1_bucket, ["--htpasswd", str(htfile)])
    try:
        for name, port, hdr in (("no auth", g_port, ()), ("basic auth", ga_port, (auth,))):
            for what, path, errors in (("hit", hit, "none"), ("miss", miss, "all")):
                for c in (1, 64):
                    wrk(f"http://127.0.0.1:{port}{path}", c, 1, hdr)  # warm the caches
                    label = f"narinfo {what}, {name}, c={c}"
                    res[label] = expect(label, wrk(f"http://127.0.0.1:{port}{path}", c, secs, hdr), errors)
    finally:
        g.kill(), ga.kill()
    # NAR throughput: the W2 NAR from a public-read bucket directly, and through the gateway.
    prefix = f"w2-{os.getpid()}"
    # SeaweedFS makes "public" anonymously readable (scripts/s3-servers.sh); it must exist
    # first, as with any S3 server: pushes do not create buckets.
    server.bucket("public", name="public")
    cachepush_push(server, "public", key, w2_paths, prefix=prefix)
    nar = next(k for k in list_keys(server, "public", prefix) if "/nar/" in k)
    gp, gp_port = gateway(server, "public", ["--nar-delivery", "proxy"], prefix=prefix)
    gr, gr_port = gateway(server, "public", ["--nar-delivery", "redirect"], prefix=prefix)
    try:
        rel = nar[len(prefix) + 1:]
        for c in (1, 16):
            label = f"NAR direct GET from SeaweedFS, c={c}"
            res[label] = expect(label, wrk(f"{ENDPOINT}/public/{nar}", c, secs), "none")
            label = f"NAR through gateway (proxy), c={c}"
            res[label] = expect(label, wrk(f"http://127.0.0.1:{gp_port}/{rel}", c, secs), "none")
        label = "NAR redirects (307), c=64"
        res[label] = expect(label, wrk(f"http://127.0.0.1:{gr_port}/{rel}", 64, secs), "none")
    finally:
        gp.kill(), gr.kill()
    return res


def list_keys(server, bucket, prefix):
    r = run([str(AWS), "s3api", "list-objects-v2", "--endpoint-url", ENDPOINT, "--bucket", bucket, "--prefix", prefix,
             "--output", "json"], env=server.env())
    return [o["Key"] for o in json.loads(r.stdout or "{}").get("Contents", [])]


# --------------------------------------------------------------------------------- main


def versions():
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    mem = next((l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")), "0")
    return {
        "machine": f"{os.cpu_count()} cores ({cpu}), {int(mem) // 1024 // 1024} GiB RAM, {platform.system()} {platform.release()}",
        "cachepush": first_line([str(CP), "--version"]),
        "nix": first_line(["nix", "--version"]),
        "seaweedfs": first_line([str(ROOT / ".tools" / "s3" / "bin" / "weed"), "version"]),
        "awscli": first_line([str(AWS), "--version"]),
        "zstd": first_line(["zstd", "--version"]),
        "wrk": first_line(["wrk", "--version"]),
    }


def fmt(s, unit="s"):
    if not s:
        return "–"
    if s["runs"] == 1:
        return f"{s['median']:.2f} {unit}"
    return f"{s['median']:.2f} {unit} ({s['min']:.2f}–{s['max']:.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="small workloads, one run (CI)")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--out", default=None, help="where to write the report (default docs/ in full mode)")
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the Markdown report from a JSON result")
    ap.add_argument("--gc-only", action="store_true",
                    help="run only the gc benchmark and put it into docs/benchmarks.json (and .md) beside the rest")
    ap.add_argument("--gateway-only", action="store_true",
                    help="run only the gateway's pull-side benchmarks and put them into docs/benchmarks.json (and .md)")
    ap.add_argument("--gwpush-only", action="store_true",
                    help="run only W1 through the gateway against a direct push and put it into docs/benchmarks.json (and .md)")
    ap.add_argument("--wan-only", action="store_true",
                    help="run only the wide-area benchmarks (and the throttled push) and put them into docs/benchmarks.json (and .md)")
    a = ap.parse_args()
    if a.wan_only:
        WORK.mkdir(parents=True, exist_ok=True)
        key = WORK / "bench.sk"
        if not key.exists():
            run([str(CP), "keygen", "bench-1", str(key)])
        sp = specs(a.short)
        paths = {w: build(w, sp[w], a.short) for w in ("W1", "W2", "W3")}
        server = Server()
        try:
            wan = wan_section(server, key, sp, paths, a.short)
        finally:
            server.stop()
        out_dir = Path(a.out) if a.out else (WORK / "short" if a.short else ROOT / "docs")
        path = out_dir / "benchmarks.json"
        r = json.loads(path.read_text()) if path.exists() else {"mode": "short" if a.short else "full", "runs": 1,
                                                                 "versions": versions(), "workloads": {}, "gateway": {}}
        r.update(wan)
        r["wan"]["measured"] = f"{time.strftime('%Y-%m-%d')}, {versions()['cachepush']}"
        path.write_text(json.dumps(r, indent=1))
        plot_svg(r["wan"], out_dir / "benchmarks-wan.svg")
        md = report(r, r["mode"] == "short")
        path.with_suffix(".md").write_text(md)
        print(md)
        return
    if a.gateway_only:
        WORK.mkdir(parents=True, exist_ok=True)
        key = WORK / "bench.sk"
        if not key.exists():
            run([str(CP), "keygen", "bench-1", str(key)])
        sp = specs(a.short)
        paths = {w: build(w, sp[w], a.short) for w in ("W1", "W2")}
        server = Server()
        try:
            b = server.bucket("W1")
            cachepush_push(server, b, key, paths["W1"])
            g = gateway_bench(server, key, b, paths["W1"], paths["W2"], 1 if a.short else 5)
        finally:
            server.stop()
        out_dir = Path(a.out) if a.out else (WORK / "short" if a.short else ROOT / "docs")
        path = out_dir / "benchmarks.json"
        r = json.loads(path.read_text())
        r["gateway"] = g
        r["gateway_measured"] = f"{time.strftime('%Y-%m-%d')}, {versions()['cachepush']}"
        path.write_text(json.dumps(r, indent=1))
        md = report(r, r["mode"] == "short")
        path.with_suffix(".md").write_text(md)
        print(md)
        return
    if a.gwpush_only:
        WORK.mkdir(parents=True, exist_ok=True)
        key = WORK / "bench.sk"
        if not key.exists():
            run([str(CP), "keygen", "bench-1", str(key)])
        sp = specs(a.short)
        w1 = build("W1", sp["W1"], a.short)
        server = Server()
        try:
            gp = gateway_push_bench(server, key, w1, a.runs or (1 if a.short else 3))
        finally:
            server.stop()
        out_dir = Path(a.out) if a.out else (WORK / "short" if a.short else ROOT / "docs")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "benchmarks.json"
        r = json.loads(path.read_text()) if path.exists() else {"mode": "short" if a.short else "full", "runs": 1,
                                                                 "versions": versions(), "workloads": {}, "gateway": {}}
        r["gateway_push"] = gp
        path.write_text(json.dumps(r, indent=1))
        md = report(r, r["mode"] == "short")
        path.with_suffix(".md").write_text(md)
        print(md)
        return
    if a.gc_only:
        WORK.mkdir(parents=True, exist_ok=True)
        server = Server()
        try:
            g = gc_bench(server, 2000 if a.short else 100_000)
        finally:
            server.stop()
        g["measured"] = f"{time.strftime('%Y-%m-%d')}, {versions()['cachepush']}"
        path = ROOT / "docs" / "benchmarks.json"
        r = json.loads(path.read_text())
        r["gc"] = g
        path.write_text(json.dumps(r, indent=1))
        md = report(r, r["mode"] == "short")
        path.with_suffix(".md").write_text(md)
        print(md)
        return
    if a.report_only:
        r = json.loads(Path(a.report_only).read_text())
        md = report(r, r["mode"] == "short")
        Path(a.report_only).with_suffix(".md").write_text(md)
        print(md)
        return
    runs = a.runs or (1 if a.short else 3)
    secs = 1 if a.short else 5
    WORK.mkdir(parents=True, exist_ok=True)
    key = WORK / "bench.sk"
    if not key.exists():
        run([str(CP), "keygen", "bench-1", str(key)])

    sp = specs(a.short)
    paths = {w: build(w, s, a.short) for w, s in sp.items()}
    nar = {w: nar_size(p) for w, p in paths.items()}
    server = Server()
    results = {"mode": "short" if a.short else "full", "runs": runs, "versions": versions(), "workloads": {}, "gateway": {}}
    try:
        for w in ("W1", "W2", "W3"):
            ps = paths[w]
            cp, peer, cpuf, upf = [], [], [], []
            last_bucket = None
            for r in range(runs):
                log(f"{w} run {r + 1}/{runs}: cachepush")
                last_bucket = server.bucket(w)
                cp.append(cachepush_push(server, last_bucket, key, ps))
                log(f"{w} run {r + 1}/{runs}: nix copy + aws s3 sync")
                d = WORK / "nixcopy"
                shutil.rmtree(d, ignore_errors=True)
                peer.append(nix_copy_then_sync(server, server.bucket(w + "peer"), key, ps, d))
                log(f"{w} run {r + 1}/{runs}: floors")
                cpuf.append(cpu_floor(ps))
                upf.append(upload_floor(server, server.bucket(w + "floor"), object_sizes(server, last_bucket)))
            # W4: the same push again, everything already there.
            noop, noop_peer = [], []
            if w in ("W1", "W3"):
                peer_bucket = server.bucket(w + "noop-peer")
                d = WORK / "nixcopy"
                shutil.rmtree(d, ignore_errors=True)
                nix_copy_then_sync(server, peer_bucket, key, ps, d)
                for r in range(runs):
                    log(f"W4 ({w}) run {r + 1}/{runs}")
                    noop.append(cachepush_push(server, last_bucket, key, ps))
                    noop_peer.append(nix_copy_then_sync(server, peer_bucket, key, ps, d))
            res = {
                "paths": len(ps), "nar_bytes": nar[w],
                "cachepush": {"wall": summary(cp), "cpu": summary(cp, "cpu"), "server_cpu": summary(cp, "server_cpu"),
                              "rss_mib": summary(cp, "rss_mib"), "requests": cp[-1]["requests"], "sent_bytes": cp[-1]["sent_bytes"]},
                "nix_copy_then_sync": {"wall": summary(peer), "cpu": summary(peer, "cpu"), "server_cpu": summary(peer, "server_cpu"),
                                       "rss_mib": summary(peer, "rss_mib"), "nix_copy_wall": summary(peer, "nix_copy_wall"),
                                       "sync_wall": summary(peer, "sync_wall")},
                "cpu_floor": {"wall": summary(cpuf), "cpu": summary(cpuf, "cpu")},
                "upload_floor": {"wall": summary(upf), "server_cpu": summary(upf, "server_cpu")},
            }
            res["ratio_peer_over_cachepush"] = [p["wall"] / c["wall"] for p, c in zip(peer, cp)]
            res["ratio_cachepush_over_max_floor"] = [c["wall"] / max(f["wall"], u["wall"]) for c, f, u in zip(cp, cpuf, upf)]
            if noop:
                res["W4"] = {"cachepush": {"wall": summary(noop), "requests": noop[-1]["requests"], "pushed": noop[-1]["pushed"]},
                             "nix_copy_then_sync": {"wall": summary(noop_peer)}}
            results["workloads"][w] = res
        results["gc"] = gc_bench(server, 2000 if a.short else 100_000)
        results.update(wan_section(server, key, sp, paths, a.short))
        results["gateway_push"] = gateway_push_bench(server, key, paths["W1"], runs)
        log("gateway")
        results["gateway"] = gateway_bench(server, key, last_bucket_of(server, results, paths, key), paths["W1"], paths["W2"], secs)
    finally:
        server.stop()

    out_dir = Path(a.out) if a.out else (WORK / "short" if a.short else ROOT / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(results, indent=1))
    plot_svg(results["wan"], out_dir / "benchmarks-wan.svg")
    md = report(results, a.short)
    (out_dir / "benchmarks.md").write_text(md)
    print(md)


def wan_section(server, key, sp, paths, short):
    """The wide-area part: W1 and W3 at 0, 50 and 100 ms (short: W1 at 50 ms), and W1 with
    30% of answers throttled."""
    if short:
        wan = wan_bench(server, key, sp, paths, [50], ["W1"])
    else:
        wan = wan_bench(server, key, sp, paths, [0, 50, 100], ["W1", "W3"])
    out = {"wan": wan, "throttle": throttle_bench(server, key, paths["W1"], 30, 0 if short else 50)}
    if "W2" in paths and not short:
        out["resume"] = resume_bench(server, key, paths["W2"])
    return out


def last_bucket_of(server, results, paths, key):
    """A bucket holding W1, for the gateway's narinfo benchmarks."""
    b = server.bucket("gw")
    cachepush_push(server, b, key, paths["W1"])
    return b


def targets(r):
    """The issue's targets, each with the measured value and whether it holds."""
    w, g = r["workloads"], r["gateway"]
    med = statistics.median
    rows = []

    def row(what, value, ok):
        rows.append(f"| {what} | {value} | {'met' if ok else 'not met'} |")

    if "W1" in w:
        x = w["W1"]
        ratio = med(x["ratio_peer_over_cachepush"])
        row("W1: ≥ 5× faster than nix copy + aws s3 sync", f"{ratio:.2f}×", ratio >= 5)
        up = x["cachepush"]["wall"]["median"] / x["upload_floor"]["wall"]["median"]
        row("W1: within 1.5× of the upload floor", f"{up:.2f}×", up <= 1.5)
    if "W2" in w:
        x = w["W2"]
        ratio = med(x["ratio_peer_over_cachepush"])
        row("W2: ≥ 2× faster than nix copy + aws s3 sync", f"{ratio:.2f}×", ratio >= 2)
        cpu = x["cachepush"]["wall"]["median"] / x["cpu_floor"]["wall"]["median"]
        row("W2: within 1.3× of the CPU floor", f"{cpu:.2f}×", cpu <= 1.3)
        rss = x["cachepush"]["rss_mib"]["max"]
        row("W2: peak RSS under 256 MiB", f"{rss:.0f} MiB", rss < 256)
    if "W1" in w and "W4" in w["W1"]:
        c = w["W1"]["W4"]["cachepush"]
        row(f"W4: no-op decision for {w['W1']['paths']} paths under 2 s", fmt(c["wall"]), c["wall"]["max"] < 2)
        puts = c["requests"]["put"] + c["requests"]["multipart"]
        row("W4: zero PUTs", f"{puts} PUTs", puts == 0)
    hit = g.get("narinfo hit, no auth, c=64")
    if hit:
        p50 = g["narinfo hit, no auth, c=1"]["p50_ms"]
        row("gateway: warm narinfo p50 under 1 ms", f"{p50:.3f} ms" if p50 is not None else "too few samples", p50 is not None and p50 < 1)
        row("gateway: over 5,000 narinfo requests/s at c=64", f"{hit['rps']:.0f}/s", hit["rps"] > 5000)
        auth = g["narinfo hit, basic auth, c=64"]["rps"]
        cost = 1 - auth / hit["rps"]
        row("gateway: Basic auth costs under 10%", f"{cost * 100:.0f}%", cost < 0.10)
    wan = r.get("wan")
    if wan:
        for wl, want in (("W1", 10), ("W3", 3)):
            x = wan["workloads"].get(wl)
            far = x and max(x["rows"], key=lambda q: q["rtt_ms"])
            if far and far["rtt_ms"] >= 100:
                ratio = far["peer"] / far["cachepush"]
                row(f"{wl} at {far['rtt_ms']} ms: ≥ {want}× faster than nix copy + aws s3 sync through the same proxy",
                    f"{ratio:.1f}×", ratio >= want)
                if wl == "W1":
                    f = far["cachepush"] / far["floor"]
                    row("W1 at 100 ms: within 2× of the latency floor", f"{f:.2f}× ({far['cachepush']:.2f} s vs {far['floor']:.2f} s)", f <= 2)
        rss = max(q["cachepush_rss_mib"] for x in wan["workloads"].values() for q in x["rows"])
        row("WAN runs: peak RSS under 256 MiB", f"{rss:.0f} MiB", rss < 256)
    th = r.get("throttle")
    if th:
        ok = th["exit"] == 0 and th["verify_exit"] == 0 and th["verify_problems"] == 0
        row(f"W1 with {th['percent']}% of answers throttled: exit 0 and verify clean",
            f"exit {th['exit']}, {th['pushed']} pushed in {th['wall']:.1f} s, {th['throttled']} throttled answers, "
            f"verify exit {th['verify_exit']} ({th['verify_problems']} problems)", ok)
    rs = r.get("resume")
    if rs:
        row(f"W2 killed at {rs['killed_at_bytes'] / rs['file_bytes']:.0%} and re-run: sends less than 30% again",
            f"{rs['resent_fraction']:.0%}", rs["resent_fraction"] < 0.30)
    gp = r.get("gateway_push")
    if gp:
        ratio = statistics.median(gp["ratio_gateway_over_direct"])
        row("W1 pushed through the gateway: within 1.3× of a direct push", f"{ratio:.2f}×", ratio <= 1.3)
    gc = r.get("gc")
    if gc:
        s = gc["second"]
        besides = sum(v for k, v in s["requests"].items() if k in KINDS and k != "delete")
        row(f"gc: second run over {gc['narinfos']} narinfos under 60 s", f"{s['wall']:.1f} s", s["wall"] < 60)
        row("gc: second run at most 2,000 requests besides deletes", f"{besides}", besides <= 2000)
        rss = max(gc["first"]["rss_mib"], s["rss_mib"])
        row("gc: peak RSS under 256 MiB", f"{rss:.0f} MiB", rss < 256)
    for c in (1, 16):
        d, p = g.get(f"NAR direct GET from SeaweedFS, c={c}"), g.get(f"NAR through gateway (proxy), c={c}")
        if d and p and d["MBps"] and p["MBps"]:
            ratio = p["MBps"] / d["MBps"]
            row(f"gateway: proxied NAR throughput ≥ 0.8× direct GET (c={c})", f"{ratio:.2f}×", ratio >= 0.8)
    notes = [
        "",
        "What stands in the way where a target is not met (all on this 2-core machine, where the",
        "S3 server, the client and the load generator share the same two cores):",
        "",
        "- W1 is bound by CPU on two cores. The plan no longer costs a HEAD per path (one listing",
        "  page answers the empty bucket; the HEADs that started before it came back are the rest),",
        "  and cachepush sends the same 4,001 PUTs as the upload floor. What remains is cachepush's",
        "  own work per path (reading the files, the NAR, two SHA-256, zstd, an Ed25519 signature,",
        "  SigV4), which the floor does not do: (cachepush + server) CPU seconds / 2 cores is the",
        "  lower bound of the wall time, and the measured time is within about 20% of it. The ratio",
        "  to nix copy + aws s3 sync sits around 5× (its three runs: see benchmarks.json).",
        "- W2 is bound by CPU: cachepush uses less CPU than the CPU floor (NAR, SHA-256, zstd on",
        "  every core), but the floor uploads nothing, while here SeaweedFS needs several CPU",
        "  seconds to store the gigabyte on the same two cores. (cachepush + server) CPU seconds /",
        "  2 cores is the lower bound of the wall time, and the measured time is close to it.",
        "  The same bound caps the ratio to nix copy + aws s3 sync (about 2×).",
        "- Proxied NARs at c=16: the gateway, SeaweedFS and wrk compete for two cores; the direct GET",
        "  has one process fewer in the path.",
        "",
        "Over a wide-area link, what the time is made of: a push starts with about eight round trips",
        "one after the other (connection, `nix-cache-info`, the gc marker, the plan's listing, the",
        "push record, the marker again), then the requests themselves, with the limit on requests in",
        "flight starting at 16 and growing by half each round trip (`peak limit`), then the",
        "narinfos of the longest chain of references, one round trip per link: W1's chain is 19 deep,",
        "and its narinfos cannot go out faster than 19 round trips whatever the concurrency. NARs at",
        "the bottom of long chains go first and NARs under way follow the limit, so a narinfo waits",
        "behind a short queue; the rest of the gap to the floor is the fixed round trips and the",
        "ramp. With 30% of answers throttled the push completes; each throttled request waits out",
        "its backoff and the limit sits at its floor of 4, so it is slow by design, not stuck.",
    ]
    return ["", "## Targets", "", "| target | measured | |", "|---|---|---|"] + rows + notes


def report(r, short):
    v = r["versions"]
    L = ["# Benchmarks", ""]
    if short:
        L += ["Short mode (CI smoke run: small workloads, one run). The numbers say the harness works, nothing more.", ""]
    L += [f"Machine: {v['machine']}.", "",
          f"Versions: {v['cachepush']}; {v['nix']}; SeaweedFS {v['seaweedfs']}; {v['awscli']}; {v['zstd']}; {v['wrk']}.", "",
          f"Each contender ran {r['runs']} time(s) in the same session; times are medians (min–max). zstd level {LEVEL} everywhere.",
          "", "## Push", "",
          "| workload | paths | NAR | cachepush | nix copy + aws s3 sync | CPU floor | upload floor | peer / cachepush | cachepush / max(floors) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for w, x in r["workloads"].items():
        med = lambda l: statistics.median(l)
        L.append(f"| {w} | {x['paths']} | {x['nar_bytes'] / 2**20:.0f} MiB | {fmt(x['cachepush']['wall'])} | "
                 f"{fmt(x['nix_copy_then_sync']['wall'])} | {fmt(x['cpu_floor']['wall'])} | {fmt(x['upload_floor']['wall'])} | "
                 f"{med(x['ratio_peer_over_cachepush']):.1f}× | {med(x['ratio_cachepush_over_max_floor']):.2f}× |")
    L += ["", "| workload | cachepush paths/s | NAR MB/s | CPU s (cachepush) | CPU s (server) | peak RSS | requests | peer CPU s | peer server CPU s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for w, x in r["workloads"].items():
        c = x["cachepush"]
        wall = c["wall"]["median"]
        req = ", ".join(f"{k} {n}" for k, n in c["requests"].items() if n and k in KINDS)
        L.append(f"| {w} | {x['paths'] / wall:.0f} | {x['nar_bytes'] / 1e6 / wall:.0f} | {c['cpu']['median']:.2f} | "
                 f"{c['server_cpu']['median']:.2f} | {c['rss_mib']['median']:.0f} MiB | {req} | "
                 f"{x['nix_copy_then_sync']['cpu']['median']:.2f} | {x['nix_copy_then_sync']['server_cpu']['median']:.2f} |")
    L += ["", "## W4: no-op re-push (everything already there)", "",
          "| of | cachepush | requests | nix copy + aws s3 sync |", "|---|---|---|---|"]
    for w, x in r["workloads"].items():
        if "W4" in x:
            c = x["W4"]["cachepush"]
            req = ", ".join(f"{k} {n}" for k, n in c["requests"].items() if n and k in KINDS)
            L.append(f"| {w} ({x['paths']} paths) | {fmt(c['wall'])} | {req} (pushed {c['pushed']}) | {fmt(x['W4']['nix_copy_then_sync']['wall'])} |")
    gc = r.get("gc")
    if gc:
        L += ["", f"## gc ({gc['narinfos']} synthetic narinfos and NARs, 90% pinned)", "",
              f"Filling the bucket took {gc['fill_seconds']:.0f} s (not counted)."
              + (f" Measured on its own ({gc['measured']}; `benches/bench.py --gc-only`)." if gc.get("measured") else ""), "",
              "| run | wall | CPU s | server CPU s | peak RSS | narinfos read | deleted narinfos / NARs | kept | requests |",
              "|---|---|---|---|---|---|---|---|---|"]
        for name in ("first", "second"):
            x = gc[name]
            req = ", ".join(f"{k} {n}" for k, n in x["requests"].items() if n and k in KINDS)
            L.append(f"| {name} | {x['wall']:.1f} s | {x['cpu']:.1f} | {x['server_cpu']:.1f} | {x['rss_mib']:.0f} MiB | "
                     f"{x['fetched_narinfos']} | {x['deleted_narinfos']} / {x['deleted_nars']} | {x['kept_narinfos']} | {req} |")
    wan = r.get("wan")
    if wan:
        L += ["", "## Over a wide-area link", "",
              "Every contender talks to SeaweedFS through `benches/wan_proxy.rs`, which delays every byte by half the round "
              "trip each way (connection handshakes pay it too). The latency floor is the closure's depth (its longest chain "
              f"of references: narinfos along a chain are written one after the other) plus its requests at {wan['floor_in_flight']} "
              "in flight, each in round trips."
              + (f" Measured on its own ({wan['measured']}; `benches/bench.py --wan-only`)." if wan.get("measured") else ""), "",
              "![push time against round trip](benchmarks-wan.svg)", "",
              "| workload | round trip | cachepush | nix copy + aws s3 sync (copy / sync) | latency floor | peer / cachepush | cachepush / floor | requests | peak limit | peak RSS |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for wl, x in wan["workloads"].items():
            for q in x["rows"]:
                fl = f"{q['cachepush'] / q['floor']:.2f}×" if q["floor"] > 0 else "–"
                L.append(f"| {wl} ({x['paths']} paths, depth {x['depth']}) | {q['rtt_ms']} ms | {q['cachepush']:.2f} s | "
                         f"{q['peer']:.2f} s ({q['peer_nix_copy']:.2f} / {q['peer_sync']:.2f}) | {q['floor']:.2f} s | "
                         f"{q['peer'] / q['cachepush']:.1f}× | {fl} | {q['requests']} | {q['limit_peak']} | {q['cachepush_rss_mib']:.0f} MiB |")
    th = r.get("throttle")
    if th:
        L += ["", f"Throttled: W1 through the proxy at {th['rtt_ms']} ms with {th['percent']}% of answers 503 SlowDown: "
              f"{th['pushed']} paths pushed in {th['wall']:.1f} s, exit 0; {th['throttled']} throttled answers, the limit cut "
              f"{th['limit_cuts']} times (peak {th['limit_peak']}); `verify --full` exit {th['verify_exit']}, {th['verify_problems']} problems "
              f"over {th['narinfos']} narinfos."]
    rs = r.get("resume")
    if rs:
        L += ["", f"Resumed: a push of W2 ({rs['file_bytes'] / 2**20:.0f} MiB compressed) SIGKILLed once its journal recorded "
              f"{rs['killed_at_bytes'] / rs['file_bytes']:.0%} of the file, then run again: the re-run found "
              f"{rs['resumed_bytes'] / 2**20:.0f} MiB of parts on the server and sent {rs['resent_fraction']:.0%} of the file again, "
              f"in {rs['rerun_wall']:.1f} s (a full push: {rs['full_wall']:.1f} s; the NAR is produced and hashed again either way)."]
    gp = r.get("gateway_push")
    if gp:
        L += ["", "## Pushing through the gateway", "",
              f"W1 ({gp['paths']} paths) pushed through `cachepush gateway` with a push-scope token (no S3 credentials, no key in "
              "the client; NARs to presigned URLs; the gateway reads every NAR back, checks FileHash and NarHash, copies it to "
              "its key and signs), against the same push straight to the bucket, alternating in the same run "
              f"(measured {gp['measured']}):", "",
              "| push | wall | peak RSS (client) | through / direct |", "|---|---|---|---|",
              f"| straight to the bucket | {fmt(gp['direct']['wall'])} | {gp['direct']['rss_mib']['median']:.0f} MiB | |",
              f"| through the gateway | {fmt(gp['through_gateway']['wall'])} | {gp['through_gateway']['rss_mib']['median']:.0f} MiB | "
              f"{statistics.median(gp['ratio_gateway_over_direct']):.2f}× |"]
    L += ["", "## Gateway", ""]
    if r.get("gateway_measured"):
        L += [f"Measured {r['gateway_measured']}.", ""]
    L += ["| measurement | requests/s | p50 | p99 | MB/s |", "|---|---|---|---|---|"]
    for k, g in r["gateway"].items():
        few = f"too few samples ({g.get('requests', '?')})"
        p50 = f"{g['p50_ms']:.3f} ms" if g["p50_ms"] is not None else few
        p99 = f"{g['p99_ms']:.3f} ms" if g["p99_ms"] is not None else few
        mb = f"{g['MBps']:.0f}" if g["MBps"] else "–"
        L.append(f"| {k} | {g['rps']:.0f} | {p50} | {p99} | {mb} |")
    L += targets(r)
    L += ["", "## How this was measured", "",
          "- Command: `benches/run.sh` (full) or `benches/run.sh --short` (CI).",
          "- Workloads (`benches/workload.nix`, specs generated with a fixed seed by `benches/bench.py`), contents cut from the machine's binaries and libraries: "
          "W1 small paths of 1–50 KiB (log-uniform) with 1–20 files each and references forming a DAG; W2 one large path; W3 a mix of small paths and a few large ones; W4 a no-op re-push of W1 and W3.",
          "- cachepush: `cachepush copy --to s3://BUCKET?endpoint=... --signing-key K --compression-level 3 --json --stdin` into a fresh bucket each run.",
          "- nix copy + aws s3 sync: `nix copy --to 'file://DIR?compression=zstd&compression-level=3&secret-key=K'` then `aws s3 sync DIR s3://BUCKET/` (awscli from PyPI).",
          "- CPU floor: `nix-store --dump P | zstd -3 -T0 | sha256sum` for every path, as many in parallel as there are cores; for W1's 2,000 small paths the same work in one process (`benches/cpu_floor.rs`: NAR, SHA-256, zstd, SHA-256 on every core), since three processes per path measured mostly their start-up.",
          "- Upload floor: `benches/put_floor.rs`, raw PUTs of exactly the objects (count and sizes) cachepush wrote, 64 at a time, with aws-sdk-s3.",
          "- CPU seconds from `/usr/bin/time` (the client) and `/proc/PID/stat` (the SeaweedFS process); peak RSS from `/usr/bin/time`.",
          "- gc: `benches/gc_fill.rs` writes N narinfos in ten groups (each refers to up to three earlier paths of its group), N small NARs and a pin of groups 0–8; then `cachepush gc s3://BUCKET?endpoint=... --keep-days 0 --grace 0s --json` twice.",
          "- Wide-area: `benches/wan_proxy.rs UPSTREAM RTT_MS [MBIT] [THROTTLE%]` in front of SeaweedFS for both contenders; one run per point.",
          "- Gateway: `wrk --latency` against `cachepush gateway` on the same machine (wrk competes for the same 2 cores), narinfo hits and misses warmed first.",
          ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
