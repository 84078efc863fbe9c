//! `cachepush gc`, `pin` and `stats` on the real SeaweedFS and Ceph RADOS Gateway, judged
//! by `cachepush verify` and by the real Nix substituting what was kept.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::fault::{Fault, FaultProxy, Rule};
use common::http::Gateway;
use common::s3::S3;
use common::*;

/// The attributes of tests/fixtures/gc.nix, built with `salt`.
struct Paths {
    lib: PathBuf,
    app1: PathBuf,
    app2: PathBuf,
    twin_a: PathBuf,
    twin_b: PathBuf,
    loner: PathBuf,
}

fn build_gc(salt: &str) -> Paths {
    require("nix-build");
    let one = |attr: &str| {
        let out = run_ok(
            Command::new("nix-build")
                .arg(fixture("gc.nix"))
                .args(["--no-out-link", "--argstr", "salt", salt, "-A", attr])
                .args(["--option", "substituters", ""]),
        );
        PathBuf::from(stdout(&out))
    };
    Paths {
        lib: one("lib"),
        app1: one("app1"),
        app2: one("app2"),
        twin_a: one("twinA"),
        twin_b: one("twinB"),
        loner: one("loner"),
    }
}

fn hash_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy()[..32].to_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}); stdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn gc(s3: Option<&S3>, url: &str, args: &[&str]) -> serde_json::Value {
    let out = run_ok(command("gc", s3).arg(url).args(args).arg("--json"));
    json(&out)
}

fn push(s3: Option<&S3>, url: &str, sk: &Path, paths: &[&Path], extra: &[&str]) {
    let mut c = copy_cmd(url, s3, Some(sk), extra);
    c.args(paths);
    run_ok(&mut c);
}

fn verify_clean(s3: Option<&S3>, url: &str, pk: &str) {
    let out = command("verify", s3)
        .arg(url)
        .args(["--trusted-key", pk, "--json"])
        .output()
        .unwrap();
    let v = json(&out);
    assert!(
        out.status.success() && v["problems"].as_array().is_some_and(|p| p.is_empty()),
        "verify found problems: {v}\n{}",
        stderr_of(&out)
    );
}

fn present(s3: &S3, bucket: &str, prefix: &str, p: &Path) -> bool {
    let key = if prefix.is_empty() {
        format!("{}.narinfo", hash_of(p))
    } else {
        format!("{prefix}/{}.narinfo", hash_of(p))
    };
    s3.head(bucket, &key).is_some()
}

fn substitutes(url: &str, path: &Path, pk: &str) -> bool {
    let dest = tempfile::tempdir().unwrap();
    let out = nix_substitute(url, dest.path(), path, pk);
    out.status.success()
}

/// Pins, reads through a recording gateway and recent pushes are kept with their whole
/// closures; the rest goes, NARs after narinfos, a NAR shared with a kept path stays; the
/// second run reads no narinfo again; the real Nix substitutes what was kept.
#[test]
fn gc_keeps_pinned_read_and_recent_closures_whole_on_every_server() {
    for s3 in S3::all() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(dir.path(), "gc-test");
        let (bucket, prefix) = s3.new_public_cache("gc");
        let url = s3.url(&bucket, &prefix);
        let http = s3.http_url(&bucket, &prefix);
        let p = build_gc(&unique(s3.name));
        let all = [&p.app1, &p.app2, &p.twin_a, &p.twin_b, &p.loner];
        push(Some(&s3), &url, &sk, &all.map(|p| p.as_path()), &[]);
        // The twins share one NAR object.
        let nars: Vec<String> = s3
            .keys(&bucket, &prefix)
            .into_iter()
            .filter(|k| k.contains("nar/"))
            .collect();
        assert_eq!(nars.len(), 5, "{}: {nars:?}", s3.name);

        // Everything was pushed just now: recency keeps it all.
        let v = gc(Some(&s3), &url, &["--keep-days", "1", "--grace", "0s"]);
        assert_eq!(v["deleted_narinfos"], 0, "{}: {v}", s3.name);
        assert_eq!(v["kept_narinfos"], 6, "{}: {v}", s3.name);

        // A pin on app1, and twinB read through a gateway that records reads.
        let out = run_ok(
            command("pin", Some(&s3))
                .args(["add", &url, "release"])
                .arg(&p.app1),
        );
        assert!(
            stderr_of(&out).contains("pinned 1 path as release"),
            "{}",
            stderr_of(&out)
        );
        let mut gw = Gateway::start(gateway_from(
            &url,
            Some(&s3),
            &[
                "--record-access",
                "--record-interval",
                "1s",
                "--nar-delivery",
                "proxy",
            ],
        ));
        let dest = tempfile::tempdir().unwrap();
        let got = nix_via(&gw.url(), dest.path(), &p.twin_b, &pk, None);
        assert!(got.status.success(), "{}", stderr_of(&got));
        assert!(gw.terminate().success());
        assert!(
            s3.keys(&bucket, &prefix)
                .iter()
                .any(|k| k.contains("cachepush/reads/")),
            "{}: no read record after the gateway stopped",
            s3.name
        );

        // stats sees the pin's closure and what gc would free.
        let st = json(&run_ok(command("stats", Some(&s3)).arg(&url).args([
            "--keep-days",
            "0",
            "--keep-read-days",
            "1",
            "--grace",
            "0s",
            "--json",
        ])));
        assert_eq!(st["by_pin"]["release"]["paths"], 2, "{st}");
        assert_eq!(st["total"]["paths"], 6, "{st}");
        assert_eq!(st["gc"]["deleted_narinfos"], 3, "{st}");
        assert_eq!(st["by_compression"]["zstd"]["paths"], 6, "{st}");

        // A dry run deletes nothing and says what would go.
        let before = s3.keys(&bucket, &prefix).len();
        let dry = gc(
            Some(&s3),
            &url,
            &[
                "--keep-days",
                "0",
                "--keep-read-days",
                "1",
                "--grace",
                "0s",
                "--dry-run",
            ],
        );
        assert_eq!(dry["deleted_narinfos"], 3, "{dry}");
        assert!(dry["freed_bytes"].as_u64().unwrap() > 0, "{dry}");
        assert_eq!(s3.keys(&bucket, &prefix).len(), before);

        let v = gc(
            Some(&s3),
            &url,
            &["--keep-days", "0", "--keep-read-days", "1", "--grace", "0s"],
        );
        assert_eq!(v["deleted_narinfos"], 3, "{}: {v}", s3.name);
        // app2's and loner's NARs; twinA's NAR is twinB's too and stays.
        assert_eq!(v["deleted_nars"], 2, "{}: {v}", s3.name);
        assert_eq!(v["kept_narinfos"], 3, "{}: {v}", s3.name);
        assert_eq!(v["roots"]["pinned"], 1, "{v}");
        assert_eq!(v["roots"]["read"], 1, "{v}");
        for kept in [&p.app1, &p.lib, &p.twin_b] {
            assert!(
                present(&s3, &bucket, &prefix, kept),
                "{}: {kept:?} went",
                s3.name
            );
        }
        for gone in [&p.app2, &p.twin_a, &p.loner] {
            assert!(
                !present(&s3, &bucket, &prefix, gone),
                "{}: {gone:?} stayed",
                s3.name
            );
        }
        verify_clean(Some(&s3), &url, &pk);
        assert!(
            substitutes(&http, &p.app1, &pk),
            "{}: app1's closure",
            s3.name
        );
        assert!(substitutes(&http, &p.twin_b, &pk), "{}: twinB", s3.name);
        assert!(
            !substitutes(&http, &p.app2, &pk),
            "{}: app2 is gone",
            s3.name
        );

        // The second run reads no narinfo again: the index knows them by ETag.
        let v = gc(
            Some(&s3),
            &url,
            &["--keep-days", "0", "--keep-read-days", "1", "--grace", "0s"],
        );
        assert_eq!(v["fetched_narinfos"], 0, "{}: {v}", s3.name);
        assert_eq!(v["deleted_narinfos"], 0, "{}: {v}", s3.name);

        // Without the pin (and reads not counted) everything goes, and the cache is still
        // a valid, empty one.
        run_ok(command("pin", Some(&s3)).args(["rm", &url, "release"]));
        let v = gc(
            Some(&s3),
            &url,
            &["--keep-days", "0", "--keep-read-days", "0", "--grace", "0s"],
        );
        assert_eq!(v["deleted_narinfos"], 3, "{}: {v}", s3.name);
        assert_eq!(v["kept_narinfos"], 0, "{}: {v}", s3.name);
        verify_clean(Some(&s3), &url, &pk);
        let left: Vec<String> = s3
            .keys(&bucket, &prefix)
            .into_iter()
            .filter(|k| k.contains("nar/") || k.ends_with(".narinfo"))
            .collect();
        assert!(left.is_empty(), "{}: {left:?}", s3.name);
    }
}

/// Bad input gets one clear line and touches nothing; the accepted forms work.
#[test]
fn gc_and_pin_refuse_bad_input_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    // Not a cache: no nix-cache-info (wrong prefix, say) — nothing is deleted.
    std::fs::create_dir_all(&cache).unwrap();
    let out = command("gc", None).arg(&url).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("has no nix-cache-info"),
        "{}",
        stderr_of(&out)
    );

    let (sk, _) = keygen(dir.path(), "k");
    let p = build_gc(&unique("bad-input"));
    push(None, &url, &sk, &[&p.loner], &[]);
    for (args, needle) in [
        (vec!["gc", &url, "--grace", "6"], "not a duration"),
        (vec!["gc", &url, "--grace", "1w"], "not a duration"),
        (vec!["pin", "add", &url, "../x", "/nix/store"], "pin name"),
        (
            vec!["pin", "add", &url, "ok", "hello"],
            "is not a store path",
        ),
        (vec!["pin", "rm", &url, "nothing-here"], "no pin named"),
        (
            vec!["copy", "--to", &url, "--pin", "a/b", "/nix/store/x"],
            "pin name",
        ),
    ] {
        let out = cachepush().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr_of(&out));
        assert!(
            stderr_of(&out).contains(needle),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }
    // A path not in the cache is named, with what to do.
    let out = cachepush()
        .args(["pin", "add", &url, "rel"])
        .arg(&p.app1)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("push it first"),
        "{}",
        stderr_of(&out)
    );
    // The accepted forms: a store path, a link to one (./result), a hash part, a narinfo
    // key; --keep revisions.
    let link = dir.path().join("result");
    std::os::unix::fs::symlink(&p.loner, &link).unwrap();
    run_ok(
        cachepush()
            .args(["pin", "add", &url, "via-link"])
            .arg(&link),
    );
    let list = json(&run_ok(cachepush().args(["pin", "list", &url, "--json"])));
    assert_eq!(
        list[0]["revisions"][0]["paths"][0],
        p.loner.display().to_string(),
        "{list}"
    );
    run_ok(cachepush().args(["pin", "rm", &url, "via-link"]));
    let h = hash_of(&p.loner);
    for arg in [
        p.loner.display().to_string(),
        h.clone(),
        format!("{h}.narinfo"),
    ] {
        run_ok(cachepush().args(["pin", "add", &url, "rel", &arg, "--keep", "2"]));
    }
    let list = json(&run_ok(cachepush().args(["pin", "list", &url, "--json"])));
    assert_eq!(list[0]["name"], "rel");
    assert_eq!(list[0]["revisions"].as_array().unwrap().len(), 2, "{list}");
    assert_eq!(
        list[0]["revisions"][1]["paths"][0],
        p.loner.display().to_string()
    );
    // `copy --pin` pins what it pushed, under a good name.
    let v = json(&run_ok(
        copy_cmd(&url, None, Some(&sk), &["--pin", "app", "--json"]).arg(&p.app1),
    ));
    assert_eq!(v["failed"], 0, "{v}");
    let list = json(&run_ok(cachepush().args(["pin", "list", &url, "--json"])));
    assert_eq!(list[0]["name"], "app", "{list}");
    let v = gc(None, &url, &["--keep-days", "0", "--grace", "0s"]);
    assert_eq!(v["kept_narinfos"], 3, "app1, lib, loner: {v}");
    // --max-delete stops early, and a later run finishes.
    run_ok(cachepush().args(["pin", "rm", &url, "app"]));
    let v = gc(
        None,
        &url,
        &["--keep-days", "0", "--grace", "0s", "--max-delete", "1"],
    );
    assert_eq!(v["deleted_narinfos"], 1, "{v}");
    assert!(
        v["stopped"]
            .as_str()
            .is_some_and(|s| s.contains("--max-delete")),
        "{v}"
    );
    let v = gc(None, &url, &["--keep-days", "0", "--grace", "0s"]);
    assert_eq!(v["deleted_narinfos"], 1, "{v}");
    assert_eq!(v["kept_narinfos"], 1, "loner, pinned: {v}");
}

/// SIGKILL while gc deletes NARs (after the narinfos), then a second gc: the cache is
/// consistent in between and clean after.
#[test]
fn a_gc_killed_between_the_narinfo_and_nar_phases_leaves_a_clean_cache_after_a_rerun() {
    let s3 = S3::seaweedfs();
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(dir.path(), "gc-kill");
    let bucket = s3.new_bucket("gckill");
    let url = s3.url(&bucket, "");
    let p = build_gc(&unique("kill"));
    push(Some(&s3), &url, &sk, &[&p.app1, &p.app2, &p.loner], &[]);
    run_ok(
        command("pin", Some(&s3))
            .args(["add", &url, "keep"])
            .arg(&p.app1),
    );

    // Every NAR DELETE stalls at the proxy: the gc is caught in its NAR phase.
    let proxy = FaultProxy::start(&s3.endpoint);
    proxy.add(Rule {
        method: "DELETE",
        target: "/nar/",
        times: usize::MAX,
        fault: Fault::StallThenDrop(Duration::from_secs(120)),
    });
    let mut c = command("gc", Some(&s3));
    c.arg(&url).args([
        "--keep-days",
        "0",
        "--grace",
        "0s",
        "--endpoint",
        &proxy.endpoint(),
    ]);
    let mut g = Logged::spawn(c);
    g.wait_for("deleting unreferenced NARs", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    g.child.kill().unwrap();
    g.child.wait().unwrap();
    // Narinfos of app2 and loner went; their NARs are still there; nothing is broken.
    assert!(!present(&s3, &bucket, "", &p.app2));
    assert!(present(&s3, &bucket, "", &p.lib));
    verify_clean(Some(&s3), &url, &pk);
    assert!(
        s3.keys(&bucket, "")
            .iter()
            .any(|k| k == "cachepush/gc-running.json"),
        "the killed gc's marker is gone: {}\n{:?}",
        g.text(),
        proxy
            .log()
            .iter()
            .map(|l| format!("{} {} {}", l.method, l.target, l.status))
            .collect::<Vec<_>>()
    );

    // The re-run takes over from the dead gc (same host, its pid gone) and finishes.
    let v = gc(Some(&s3), &url, &["--keep-days", "0", "--grace", "0s"]);
    assert_eq!(v["deleted_nars"], 2, "{v}");
    assert_eq!(v["kept_narinfos"], 2, "{v}");
    verify_clean(Some(&s3), &url, &pk);
    let keys = s3.keys(&bucket, "");
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("nar/")).count(),
        2,
        "{keys:?}"
    );
    // The marker stays, saying the gc finished (pushes compare it before and after).
    let marker: serde_json::Value =
        serde_json::from_slice(&s3.get(&bucket, "cachepush/gc-running.json")).unwrap();
    assert_eq!(marker["finished"], true, "{marker}");
}

/// Pushes and gcs against one bucket at once, many rounds, through a proxy that delays
/// every request by a random time (so they reach the server out of order). Each round
/// unpins the last round's app, so only leases protect the shared library while the
/// round's push relies on it. After every round `verify` is clean and the round's
/// closure substitutes with the real Nix.
#[test]
fn concurrent_pushes_and_gcs_never_break_a_closure() {
    const ROUNDS: usize = 12;
    let s3 = S3::seaweedfs();
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(dir.path(), "gc-race");
    let (bucket, prefix) = s3.new_public_cache("gcrace");
    let http = s3.http_url(&bucket, &prefix);
    let proxy = FaultProxy::start(&s3.endpoint);
    proxy.add(Rule {
        method: "*",
        target: "/",
        times: usize::MAX,
        fault: Fault::Jitter(Duration::from_millis(150)),
    });
    let via_proxy = |c: &mut Command| {
        c.args(["--endpoint", &proxy.endpoint()]);
    };
    let url = s3.url(&bucket, &prefix);
    let salt = unique("race");
    let mut deleted_total = 0u64;
    let mut gc_runs = 0;
    // The cache exists before the first gc (gc refuses a place with no nix-cache-info).
    push(Some(&s3), &url, &sk, &[&build_gc(&salt).lib], &[]);
    for round in 0..ROUNDS {
        // The same library every round (same salt); a new app each round.
        let p = build_gc(&salt);
        let app = build_app(&salt, round);
        // Unpinned: from here only the push's lease keeps the library it relies on.
        // (There is no pin before the first round.)
        let _ = command("pin", Some(&s3))
            .args(["rm", &url, "round"])
            .output()
            .unwrap();
        let mut pusher = {
            let mut c = copy_cmd(&url, Some(&s3), Some(&sk), &["--pin", "round", "--json"]);
            via_proxy(&mut c);
            c.arg(&app).arg(&p.lib);
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        };
        // gcs one after another for as long as the push runs, and at least two.
        let mut runs = 0;
        let mut round_log = Vec::new();
        while runs < 2 || pusher.try_wait().unwrap().is_none() {
            let mut c = command("gc", Some(&s3));
            c.arg(&url)
                .args(["--keep-days", "0", "--grace", "0s", "--json"]);
            via_proxy(&mut c);
            let out = c.output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: gc failed: {}",
                stderr_of(&out)
            );
            deleted_total += json(&out)["deleted_narinfos"].as_u64().unwrap();
            round_log.push(format!(
                "gc: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                stderr_of(&out)
            ));
            runs += 1;
            gc_runs += 1;
        }
        let out = pusher.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "round {round}: push failed: {}",
            stderr_of(&out)
        );
        let v = command("verify", Some(&s3))
            .arg(&url)
            .args(["--trusted-key", &pk, "--json"])
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "round {round}: verify: {}\npush: {}\n{}",
            String::from_utf8_lossy(&v.stdout),
            stderr_of(&out),
            round_log.join("\n")
        );
        assert!(
            substitutes(&http, &app, &pk),
            "round {round}: the pushed closure does not substitute; keys {:?}\npush: {}\n{}",
            s3.keys(&bucket, &prefix),
            stderr_of(&out),
            round_log.join("\n")
        );
    }
    // gc did delete (the previous rounds' apps), so the race was real.
    let v = gc(Some(&s3), &url, &["--keep-days", "0", "--grace", "0s"]);
    deleted_total += v["deleted_narinfos"].as_u64().unwrap();
    assert!(
        deleted_total >= (ROUNDS - 1) as u64,
        "deleted {deleted_total}"
    );
    verify_clean(Some(&s3), &url, &pk);
    eprintln!("{ROUNDS} rounds, {gc_runs} gcs, {deleted_total} narinfos deleted");
}

/// An app that refers to the gc fixture's library, new for each round.
fn build_app(salt: &str, round: usize) -> PathBuf {
    let expr = format!(
        "let f = import {}; lib = (f {{ salt = \"{salt}\"; }}).lib; in derivation {{ \
         name = \"round{round}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [ \"-c\" \"echo ${{lib}} > $out\" ]; }}",
        fixture("gc.nix").display()
    );
    let out = run_ok(
        Command::new("nix-build")
            .args(["--no-out-link", "-E", &expr])
            .args(["--option", "substituters", ""]),
    );
    PathBuf::from(stdout(&out))
}
