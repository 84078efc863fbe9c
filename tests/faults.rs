//! Faults between cachepush and a real S3 server (SeaweedFS behind a fault-injecting
//! proxy), concurrent pushers, and damaged caches; after each, `cachepush verify` checks
//! the invariants: every narinfo's NAR exists and matches, every reference has a narinfo,
//! every signature verifies, no multipart upload is left open.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::fault::{Fault, FaultProxy, Rule};
use common::s3::S3;
use common::*;

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON on stdout ({e}): {}", stderr_of(o)))
}

/// The command of a push through `endpoint` (the proxy, or the server itself).
fn push_cmd(
    s3: &S3,
    endpoint: &str,
    bucket: &str,
    sk: &Path,
    extra: &[&str],
    path: &Path,
) -> Command {
    let mut c = cachepush();
    s3.creds(&mut c);
    c.arg("copy")
        .arg("--to")
        .arg(s3.url(bucket, ""))
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--signing-key")
        .arg(sk)
        .arg("--json")
        .args(extra)
        .arg(path);
    c
}

/// A push through `endpoint` (the proxy, or the server itself).
fn push(s3: &S3, endpoint: &str, bucket: &str, sk: &Path, extra: &[&str], path: &Path) -> Output {
    push_cmd(s3, endpoint, bucket, sk, extra, path)
        .output()
        .unwrap()
}

/// `cachepush verify --full` straight against the server; returns (exit code, report).
fn verify(s3: &S3, bucket: &str, pk: &str) -> (i32, serde_json::Value) {
    let mut c = cachepush();
    s3.creds(&mut c);
    let o = c
        .args(["verify", "--full", "--json", "--trusted-key", pk])
        .arg(s3.url(bucket, ""))
        .output()
        .unwrap();
    (o.status.code().unwrap_or(-1), json(&o))
}

fn assert_verified(s3: &S3, bucket: &str, pk: &str, narinfos: usize) {
    let (code, v) = verify(s3, bucket, pk);
    assert_eq!(code, 0, "verify found problems: {v}");
    assert_eq!(v["narinfos"], narinfos, "{v}");
    assert_eq!(v["open_uploads"], 0, "{v}");
}

fn big(salt: &str) -> PathBuf {
    build_big(salt, 12)
}

/// Transient faults: the push retries through them and the cache ends up whole.
#[test]
fn transient_faults_are_retried_and_the_cache_is_whole() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let cases: Vec<(&str, Vec<Rule>)> = vec![
        (
            "503 SlowDown on narinfo PUTs",
            vec![Rule {
                method: "PUT",
                target: ".narinfo",
                times: 2,
                fault: Fault::Status(503, "SlowDown", None),
            }],
        ),
        (
            "500 InternalError on parts",
            vec![Rule {
                method: "PUT",
                target: "partNumber=",
                times: 2,
                fault: Fault::Status(500, "InternalError", None),
            }],
        ),
        (
            "RequestTimeout on a NAR",
            vec![Rule {
                method: "PUT",
                target: "/nar/",
                times: 1,
                fault: Fault::Status(400, "RequestTimeout", None),
            }],
        ),
        (
            "connection reset after a part's body",
            vec![Rule {
                method: "PUT",
                target: "partNumber=",
                times: 1,
                fault: Fault::Reset,
            }],
        ),
        (
            "connection reset mid-part",
            vec![Rule {
                method: "PUT",
                target: "partNumber=",
                times: 1,
                fault: Fault::ResetMidBody,
            }],
        ),
        (
            "connection reset mid-upload of a single PUT",
            vec![Rule {
                method: "PUT",
                target: ".narinfo",
                times: 1,
                fault: Fault::ResetMidBody,
            }],
        ),
        (
            "truncated answer to CompleteMultipartUpload",
            vec![Rule {
                method: "POST",
                target: "uploadId=",
                times: 1,
                fault: Fault::Truncate,
            }],
        ),
        (
            "stalled part (read timeout)",
            vec![Rule {
                method: "PUT",
                target: "partNumber=",
                times: 1,
                fault: Fault::Stall(Duration::from_secs(4)),
            }],
        ),
        (
            "503 on the plan's HEADs",
            vec![Rule {
                method: "HEAD",
                target: ".narinfo",
                times: 3,
                fault: Fault::Status(503, "ServiceUnavailable", None),
            }],
        ),
    ];
    for (name, rules) in cases {
        let top = big(&unique("transient"));
        let bucket = s3.new_bucket("transient");
        proxy.clear();
        proxy.clear_log();
        let before = proxy.injected();
        for r in rules {
            proxy.add(r);
        }
        let o = push(
            &s3,
            &proxy.endpoint(),
            &bucket,
            &sk,
            // A short read timeout only where the fault is a stall: elsewhere it would make
            // real, loaded requests time out and retry, hiding whether the fault did.
            &if name.contains("stalled") {
                vec![
                    "--part-size",
                    "5",
                    "--compression",
                    "none",
                    "--read-timeout",
                    "2",
                ]
            } else {
                vec!["--part-size", "5", "--compression", "none"]
            },
            &top,
        );
        assert!(o.status.success(), "{name}: {}", stderr_of(&o));
        assert!(proxy.injected() > before, "{name}: no fault was injected");
        let j = json(&o);
        assert_eq!(j["pushed"], 3, "{name}: {j}");
        assert!(
            j["requests"]["retries"].as_u64().unwrap() >= 1,
            "{name}: {j}"
        );
        assert_verified(&s3, &bucket, &pk, 3);
        assert_publish_order(&s3, &bucket, &proxy.log());
    }
}

#[test]
fn retry_after_is_honoured() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    // The gap, on the wire, between the 429 and the retried narinfo PUT.
    let gap = |retry_after: Option<u32>| {
        let top = build("dep", &unique("retry-after"));
        let bucket = s3.new_bucket("retryafter");
        proxy.clear();
        proxy.clear_log();
        proxy.add(Rule {
            method: "PUT",
            target: ".narinfo",
            times: 1,
            fault: Fault::Status(429, "TooManyRequests", retry_after),
        });
        let before = proxy.injected();
        let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
        assert!(o.status.success(), "{}", stderr_of(&o));
        assert_eq!(proxy.injected(), before + 1);
        assert_verified(&s3, &bucket, &pk, 1);
        let log = proxy.log();
        let is_narinfo_put = |l: &&common::fault::Logged| {
            l.method == "PUT" && l.target.split('?').next().unwrap().ends_with(".narinfo")
        };
        let refused = log
            .iter()
            .filter(is_narinfo_put)
            .find(|l| l.status == 429)
            .expect("the 429 in the log");
        let retried = log
            .iter()
            .filter(is_narinfo_put)
            .find(|l| l.ok())
            .expect("the retried PUT in the log");
        retried.started.duration_since(refused.ended)
    };
    let told = gap(Some(2));
    assert!(
        told >= Duration::from_secs(2),
        "retried {told:?} after a 429 with Retry-After: 2"
    );
    // The twin: without Retry-After the client's own first backoff is far shorter.
    let own = gap(None);
    assert!(own < Duration::from_secs(2), "own backoff took {own:?}");
}

/// Permanent faults: the push fails with a clear message and the exit status that says
/// so, and what is in the cache is still consistent.
#[test]
fn permanent_faults_fail_clearly_and_leave_a_consistent_cache() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");

    // Expired credentials on every NAR upload: nothing can be published.
    let top = big(&unique("expired"));
    let bucket = s3.new_bucket("expired");
    proxy.clear();
    proxy.add(Rule {
        method: "PUT",
        target: "/nar/",
        times: usize::MAX,
        fault: Fault::Status(403, "ExpiredToken", None),
    });
    proxy.add(Rule {
        method: "POST",
        target: "uploads",
        times: usize::MAX,
        fault: Fault::Status(403, "ExpiredToken", None),
    });
    let o = push(
        &s3,
        &proxy.endpoint(),
        &bucket,
        &sk,
        &["--part-size", "5"],
        &top,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("ExpiredToken") && stderr_of(&o).contains("access denied"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(json(&o)["failed"], 3);
    // Permanent: not retried.
    assert_eq!(json(&o)["requests"]["retries"], 0, "{}", json(&o));
    assert_verified(&s3, &bucket, &pk, 0);

    // A clock the server refuses: the plan cannot even start; nothing written.
    let bucket = s3.new_bucket("skew");
    proxy.clear();
    proxy.add(Rule {
        method: "HEAD",
        target: ".narinfo",
        times: usize::MAX,
        fault: Fault::Status(403, "RequestTimeTooSkewed", None),
    });
    let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("the system clock is off; fix it with NTP"),
        "{}",
        stderr_of(&o)
    );
    assert!(s3.keys(&bucket, "").is_empty());

    // Parts that always fail: the multipart upload is aborted, the path and its dependents
    // are not published, and what was published is whole.
    let bucket = s3.new_bucket("parts");
    proxy.clear();
    proxy.add(Rule {
        method: "PUT",
        target: "partNumber=",
        times: usize::MAX,
        fault: Fault::Status(500, "InternalError", None),
    });
    let o = push(
        &s3,
        &proxy.endpoint(),
        &bucket,
        &sk,
        &["--part-size", "5", "--compression", "none"],
        &top,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let j = json(&o);
    assert_eq!(
        (j["pushed"].as_u64(), j["failed"].as_u64()),
        (Some(1), Some(2)),
        "{j}"
    );
    assert!(
        s3.open_uploads(&bucket, "").is_empty(),
        "a failed multipart upload was left open"
    );
    assert_verified(&s3, &bucket, &pk, 1);
    // And the same command without the fault finishes the job.
    proxy.clear();
    let o = push(
        &s3,
        &proxy.endpoint(),
        &bucket,
        &sk,
        &["--part-size", "5", "--compression", "none"],
        &top,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(json(&o)["pushed"], 2);
    assert_verified(&s3, &bucket, &pk, 3);
}

#[test]
fn two_pushers_of_the_same_closure_at_once() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let top = big(&unique("concurrent"));
    let bucket = s3.new_bucket("concurrent");
    // Each pusher's first part is held for 2 s, so both have planned (and found nothing)
    // before either publishes anything: they really race.
    proxy.add(Rule {
        method: "PUT",
        target: "partNumber=1&",
        times: 2,
        fault: Fault::Stall(Duration::from_secs(2)),
    });
    let spawn = || {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.arg("copy")
            .arg("--to")
            .arg(s3.url(&bucket, ""))
            .arg("--endpoint")
            .arg(proxy.endpoint())
            .arg("--signing-key")
            .arg(&sk)
            .args(["--part-size", "5", "--compression", "none", "--json"])
            .arg(&top)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for o in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert!(o.status.success());
        let j = json(&o);
        assert_eq!(j["to_push"], 3, "the pushers did not overlap: {j}");
    }
    assert_eq!(proxy.injected(), 2);
    assert_verified(&s3, &bucket, &pk, 3);
}

#[test]
fn damaged_caches_are_found_by_verify_and_repaired_by_push() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let top = build("", &unique("damaged"));
    let closure = closure_of(&top);
    let bucket = s3.new_bucket("damaged");
    let o = push(&s3, &s3.endpoint, &bucket, &sk, &[], &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_verified(&s3, &bucket, &pk, closure.len());

    // A NAR deleted behind our back: verify names it; a plain push trusts the narinfo;
    // `--repair` publishes the NAR again.
    let victim = closure
        .iter()
        .find(|p| p.to_string_lossy().ends_with("-tree"))
        .unwrap();
    let key = format!(
        "{}.narinfo",
        &victim.file_name().unwrap().to_str().unwrap()[..32]
    );
    let text = String::from_utf8(s3.get(&bucket, &key)).unwrap();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    s3.delete(&bucket, &url);
    let (code, v) = verify(&s3, &bucket, &pk);
    assert_eq!(code, 1);
    let problems = v["problems"].to_string();
    assert!(
        problems.contains(&key) && problems.contains("is missing"),
        "{v}"
    );
    let o = push(&s3, &s3.endpoint, &bucket, &sk, &[], &top);
    assert_eq!(
        json(&o)["pushed"],
        0,
        "a plain push trusts present narinfos"
    );
    let o = push(&s3, &s3.endpoint, &bucket, &sk, &["--repair"], &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("pushing it again"),
        "{}",
        stderr_of(&o)
    );
    assert_verified(&s3, &bucket, &pk, closure.len());

    // Tampering: verify --full catches a NAR whose bytes changed, and a narinfo signed by
    // a key it does not trust.
    let nar = s3.get(&bucket, &url);
    let mut bad = nar.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    s3.put(&bucket, &url, &bad);
    let (code, v) = verify(&s3, &bucket, &pk);
    assert_eq!(code, 1);
    assert!(v["problems"].to_string().contains("FileHash"), "{v}");
    s3.put(&bucket, &url, &nar);
    let other_dir = tmp.path().join("x");
    std::fs::create_dir_all(&other_dir).unwrap();
    let (other_sk, other) = keygen(&other_dir, "faults-1");
    let (code, v) = verify(&s3, &bucket, &other);
    assert_eq!(code, 1);
    assert_eq!(
        v["problems"].as_array().unwrap().len(),
        closure.len(),
        "{v}"
    );
    assert_verified(&s3, &bucket, &pk, closure.len());

    // A narinfo present with another signature is kept as it is, not overwritten.
    let before = String::from_utf8(s3.get(&bucket, &key)).unwrap();
    let o = push(&s3, &s3.endpoint, &bucket, &other_sk, &[], &top);
    assert!(o.status.success());
    assert_eq!(String::from_utf8(s3.get(&bucket, &key)).unwrap(), before);
}

/// SIGINT or SIGTERM while a NAR is being sent, between a NAR and its narinfo, and during
/// a multipart upload (each stage held open by a stall at the proxy so the signal lands
/// there): exit 130, a consistent cache, nothing left open, and a re-run that completes.
#[test]
fn interrupted_at_each_stage_leaves_a_consistent_cache() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let stages = [
        ("during a single-PUT NAR", "PUT", "/nar/", "INT"),
        ("between a NAR and its narinfo", "PUT", ".narinfo", "TERM"),
        ("during a multipart upload", "PUT", "partNumber=", "INT"),
    ];
    for (stage, method, target, signal) in stages {
        let top = big(&unique("stage"));
        let bucket = s3.new_bucket("stage");
        proxy.clear();
        proxy.add(Rule {
            method,
            target,
            times: usize::MAX,
            // Held, then dropped, never forwarded: a request from the killed process must
            // not reach the server after the cache was checked.
            fault: Fault::StallThenDrop(Duration::from_secs(30)),
        });
        let before = proxy.injected();
        let mut c = cachepush();
        s3.creds(&mut c);
        let mut child = c
            .arg("copy")
            .arg("--to")
            .arg(s3.url(&bucket, ""))
            .arg("--endpoint")
            .arg(proxy.endpoint())
            .arg("--signing-key")
            .arg(&sk)
            .args(["--part-size", "5", "--compression", "none"])
            .arg(&top)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while proxy.injected() == before {
            assert!(
                Instant::now() < deadline,
                "{stage}: the stage was never reached"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        run_ok(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string()),
        );
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "{stage}");
        proxy.clear();
        let (code, v) = verify(&s3, &bucket, &pk);
        assert_eq!(code, 0, "{stage}: {v}");
        assert_eq!(v["open_uploads"], 0, "{stage}: {v}");
        let o = push(
            &s3,
            &proxy.endpoint(),
            &bucket,
            &sk,
            &["--part-size", "5", "--compression", "none"],
            &top,
        );
        assert!(o.status.success(), "{stage}: {}", stderr_of(&o));
        assert_verified(&s3, &bucket, &pk, 3);
    }
}

/// The plan's listing and its HEADs, through the proxy: when HEADs are slow the listing
/// answers for them; when listing is refused the HEADs answer everything. Either way the
/// push sends exactly the paths whose narinfo is missing.
#[test]
fn the_plan_listing_answers_for_slow_heads_and_a_refused_listing_changes_nothing() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let top = build_wide(&unique("listing"));
    let bucket = s3.new_bucket("listing");
    let first = push(&s3, &s3.endpoint, &bucket, &sk, &[], &top);
    assert!(first.status.success(), "{}", stderr_of(&first));
    let narinfos: Vec<String> = s3
        .keys(&bucket, "")
        .into_iter()
        .filter(|k| k.ends_with(".narinfo"))
        .collect();
    assert_eq!(narinfos.len(), 151);

    // Slow HEADs: the HEADs started before the first page came back are the only ones.
    for k in narinfos.iter().step_by(10) {
        s3.delete(&bucket, k);
    }
    proxy.add(Rule {
        method: "HEAD",
        target: ".narinfo",
        times: usize::MAX,
        // Long enough that the first listing page comes back well before any HEAD does,
        // even on a loaded machine: only the first wave of HEADs may start.
        fault: Fault::Stall(Duration::from_secs(5)),
    });
    let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let j = json(&o);
    assert_eq!(j["pushed"], 16, "{j}");
    assert_eq!(j["requests"]["list"], 1, "{j}");
    let heads = j["requests"]["head"].as_u64().unwrap();
    assert!(
        heads < 100,
        "{heads} HEADs for 151 paths: the listing did not answer"
    );
    assert_verified(&s3, &bucket, &pk, 151);

    // No permission to list: a note, and HEADs for every path.
    proxy.clear();
    proxy.add(Rule {
        method: "GET",
        target: "list-type=2",
        times: usize::MAX,
        fault: Fault::Status(403, "AccessDenied", None),
    });
    // HEADs a little slow, so that the refusal (answered by the proxy at once) comes back
    // before the last HEAD even on a loaded machine: a listing still in flight when every
    // key has been answered is dropped, and with it what it would have said.
    proxy.add(Rule {
        method: "HEAD",
        target: ".narinfo",
        times: usize::MAX,
        fault: Fault::Stall(Duration::from_millis(300)),
    });
    for k in narinfos.iter().skip(5).step_by(10) {
        s3.delete(&bucket, k);
    }
    let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let j = json(&o);
    assert_eq!(j["pushed"], 15, "{j}");
    assert!(j["requests"]["head"].as_u64().unwrap() >= 151, "{j}");
    assert!(
        stderr_of(&o).contains("listing the cache stopped"),
        "{}",
        stderr_of(&o)
    );
    assert_verified(&s3, &bucket, &pk, 151);
}

/// Narinfo PUTs refused for good (403) until `times` of them have been: a store path
/// whose push fails permanently in its first rounds.
fn narinfo_puts_refused(times: usize) -> Rule {
    Rule {
        method: "PUT",
        target: ".narinfo",
        times,
        fault: Fault::Status(403, "AccessDenied", None),
    }
}

fn narinfos_in(s3: &S3, bucket: &str) -> std::collections::BTreeSet<String> {
    s3.keys(bucket, "")
        .into_iter()
        .filter_map(|k| k.strip_suffix(".narinfo").map(str::to_owned))
        .collect()
}

fn hashes_of(paths: &[PathBuf]) -> std::collections::BTreeSet<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap()[..32].to_owned())
        .collect()
}

/// Security review M5: in scanner mode, a round whose pushes fail does not lose its paths.
/// They are pushed again (with backoff) once the bucket accepts them.
#[test]
fn watch_store_retries_paths_whose_push_failed() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let bucket = s3.new_bucket("watchretry");
    proxy.add(narinfo_puts_refused(usize::MAX));
    let mut c = cachepush();
    s3.creds(&mut c);
    c.arg("watch-store")
        .arg("--to")
        .arg(s3.url(&bucket, ""))
        .arg("--endpoint")
        .arg(proxy.endpoint())
        .arg("--signing-key")
        .arg(&sk)
        .arg("--queue")
        .arg(tmp.path().join("queue"))
        .args(["--interval", "0.3"]);
    let mut watcher = Logged::spawn(c);
    watcher.wait_for("watching the store", Duration::from_secs(60));
    let top = build("", &unique("watch-retry"));
    let want = hashes_of(&closure_of(&top));
    // Rounds fail while the bucket refuses narinfos, and their paths are kept for later.
    watcher.wait_for("will be pushed again", Duration::from_secs(60));
    assert!(narinfos_in(&s3, &bucket).is_disjoint(&want));
    proxy.clear();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !want.is_subset(&narinfos_in(&s3, &bucket)) {
        assert!(
            Instant::now() < deadline,
            "watch-store did not push the failed paths again"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(proxy.injected() > 0);
    assert!(watcher.stop().success(), "{}", watcher.text());
    let (code, report) = verify(&s3, &bucket, &pk);
    assert_eq!(code, 0, "{report}");
}

/// Security review M5 and L4: `watch-exec` keeps watching after a failed round, pushes
/// the failed paths again, and exits 0 once they are published; the command gets neither
/// the signing key nor an orphan's fate, and SIGTERM to cachepush reaches it.
#[test]
fn watch_exec_retries_failed_paths_and_never_orphans_its_command() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let bucket = s3.new_bucket("execretry");
    // Only the first narinfo PUT fails: its path and dependents fail in the first round.
    proxy.add(narinfo_puts_refused(1));
    let salt = unique("exec-retry");
    let env_seen = tmp.path().join("env");
    let script = format!(
        "nix-build {} --no-out-link --argstr salt {salt} --option substituters '' >/dev/null && \
         (env | grep -c CACHEPUSH_SIGNING_KEY || true) > {} && sleep 1",
        fixture("closure.nix").display(),
        env_seen.display()
    );
    let watch = |script: &str| {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.arg("watch-exec")
            .arg("--to")
            .arg(s3.url(&bucket, ""))
            .arg("--endpoint")
            .arg(proxy.endpoint())
            .env(
                "CACHEPUSH_SIGNING_KEY",
                std::fs::read_to_string(&sk).unwrap(),
            )
            .args(["--interval", "0.3", "--", "sh", "-c", script]);
        c
    };
    let o = watch(&script).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(proxy.injected() >= 1, "the fault never fired");
    assert_eq!(std::fs::read_to_string(&env_seen).unwrap().trim(), "0");
    let top = build("", &salt);
    assert!(hashes_of(&closure_of(&top)).is_subset(&narinfos_in(&s3, &bucket)));
    let (code, report) = verify(&s3, &bucket, &pk);
    assert_eq!(code, 0, "{report}");

    // SIGTERM to cachepush alone: the command is stopped too, not left running.
    let marker = tmp.path().join("still-running");
    let mut child = watch(&format!("sleep 5; touch {}", marker.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    sigterm(child.id());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    std::thread::sleep(Duration::from_secs(6));
    assert!(!marker.exists(), "the command outlived watch-exec");
}

/// Security review L12: a narinfo whose `URL:` names no object (`../x`) is one reported
/// problem; `verify` goes on to check the rest, and `push --repair` publishes it again.
#[test]
fn a_narinfo_url_that_names_no_object_is_reported_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let cache = tmp.path().join("cache");
    let url = format!("file://{}", cache.display());
    let top = build("", &unique("bad-url"));
    run_ok(
        cachepush()
            .args(["copy", "-q", "--to", &url, "--signing-key"])
            .arg(&sk)
            .arg(&top),
    );
    let verify = || {
        cachepush()
            .args(["verify", "--full", "--trusted-key", &pk, &url])
            .output()
            .unwrap()
    };
    let clean = verify();
    assert_eq!(clean.status.code(), Some(0), "{}", stderr_of(&clean));
    let hash = &top.file_name().unwrap().to_str().unwrap()[..32];
    let file = cache.join(format!("{hash}.narinfo"));
    let text = std::fs::read_to_string(&file).unwrap();
    let old_url = text.lines().find(|l| l.starts_with("URL: ")).unwrap();
    std::fs::write(&file, text.replace(old_url, "URL: ../outside.nar")).unwrap();
    let o = verify();
    let report = format!("{}{}", stdout(&o), stderr_of(&o));
    assert_eq!(o.status.code(), Some(1), "{report}");
    assert!(report.contains("names no object"), "{report}");
    // The other narinfos were still checked: exactly one path has problems.
    assert!(!report.contains("cannot"), "{report}");
    run_ok(
        cachepush()
            .args(["copy", "-q", "--repair", "--to", &url, "--signing-key"])
            .arg(&sk)
            .arg(&top),
    );
    let fixed = verify();
    assert_eq!(fixed.status.code(), Some(0), "{}", stderr_of(&fixed));
}

/// Where the oracle test applies its damage: a real S3 bucket, or a `file://` directory.
enum Cache<'a> {
    S3(&'a S3, String),
    Dir(PathBuf),
}

impl Cache<'_> {
    fn url(&self) -> String {
        match self {
            Cache::S3(s3, b) => s3.url(b, ""),
            Cache::Dir(d) => format!("file://{}", d.display()),
        }
    }
    fn get(&self, key: &str) -> Vec<u8> {
        match self {
            Cache::S3(s3, b) => s3.get(b, key),
            Cache::Dir(d) => std::fs::read(d.join(key)).unwrap(),
        }
    }
    fn put(&self, key: &str, body: &[u8]) {
        match self {
            Cache::S3(s3, b) => s3.put(b, key, body),
            Cache::Dir(d) => std::fs::write(d.join(key), body).unwrap(),
        }
    }
    fn delete(&self, key: &str) {
        match self {
            Cache::S3(s3, b) => s3.delete(b, key),
            Cache::Dir(d) => std::fs::remove_file(d.join(key)).unwrap(),
        }
    }
    fn cmd(&self) -> Command {
        let mut c = cachepush();
        if let Cache::S3(s3, _) = self {
            s3.creds(&mut c);
        }
        c
    }
    /// `verify --full`: the exit code and the (key, problem) pairs.
    fn verify(&self, pk: &str, extra: &[&str]) -> (i32, Vec<(String, String)>) {
        let o = self
            .cmd()
            .args(["verify", "--full", "--json", "--trusted-key", pk])
            .args(extra)
            .arg(self.url())
            .output()
            .unwrap();
        let v = json(&o);
        let problems = v["problems"]
            .as_array()
            .unwrap_or_else(|| panic!("no problems list: {v}"))
            .iter()
            .map(|p| {
                (
                    p["key"].as_str().unwrap().to_owned(),
                    p["problem"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (o.status.code().unwrap_or(-1), problems)
    }
}

fn field<'a>(narinfo: &'a str, name: &str) -> &'a str {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
        .unwrap_or_else(|| panic!("no {name} in {narinfo}"))
}

/// The oracle of every fault test: `verify` finds each kind of damage it claims to find,
/// names the object and the problem, and passes the same cache once it is restored.
#[test]
fn verify_detects_every_kind_of_damage() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "oracle-1");
    let top = build("", &unique("oracle"));
    let hash = |p: &Path| p.file_name().unwrap().to_str().unwrap()[..32].to_owned();
    let dep = closure_of(&top)
        .into_iter()
        .find(|p| p != &top && p.to_string_lossy().ends_with("-dep"))
        .expect("the fixture's top refers to dep");
    let caches = [
        Cache::S3(&s3, s3.new_bucket("oracle")),
        Cache::Dir(tmp.path().join("cache")),
    ];
    for cache in &caches {
        run_ok(
            cache
                .cmd()
                .args(["copy", "-q", "--to", &cache.url(), "--signing-key"])
                .arg(&sk)
                .arg(&top),
        );
        let (code, clean) = cache.verify(&pk, &[]);
        assert_eq!((code, clean.len()), (0, 0), "{}: {clean:?}", cache.url());

        let top_key = format!("{}.narinfo", hash(&top));
        let dep_key = format!("{}.narinfo", hash(&dep));
        let top_text = String::from_utf8(cache.get(&top_key)).unwrap();
        let dep_text = String::from_utf8(cache.get(&dep_key)).unwrap();
        let top_nar = field(&top_text, "URL").to_owned();
        let dep_nar = field(&dep_text, "URL").to_owned();
        let top_nar_bytes = cache.get(&top_nar);
        let dep_nar_bytes = cache.get(&dep_nar);
        let info = String::from_utf8(cache.get("nix-cache-info")).unwrap();
        let dep_base = dep.file_name().unwrap().to_str().unwrap().to_owned();
        let referrer = closure_of(&top)
            .into_iter()
            .map(|p| format!("{}.narinfo", hash(&p)))
            .find(|k| {
                String::from_utf8(cache.get(k))
                    .unwrap()
                    .lines()
                    .any(|l| l.starts_with("References: ") && l.contains(&dep_base))
            })
            .expect("a path that refers to dep");

        // Each damage: (what, apply, the key and words verify must report, restore).
        type Step<'s> = Box<dyn Fn() + 's>;
        let alias = format!("{}.narinfo", "1".repeat(32));
        let damages: Vec<(&str, Step, String, &str, Step)> = vec![
            (
                "a reference without a narinfo",
                Box::new(|| cache.delete(&dep_key)),
                referrer.clone(),
                "which has no narinfo",
                Box::new(|| cache.put(&dep_key, dep_text.as_bytes())),
            ),
            (
                "a missing NAR",
                Box::new(|| cache.delete(&top_nar)),
                top_key.clone(),
                "is missing",
                Box::new(|| cache.put(&top_nar, &top_nar_bytes)),
            ),
            (
                "FileSize that is not the object's size",
                Box::new(|| {
                    let size = field(&top_text, "FileSize");
                    let wrong = (size.parse::<u64>().unwrap() + 1).to_string();
                    cache.put(
                        &top_key,
                        top_text
                            .replace(&format!("FileSize: {size}"), &format!("FileSize: {wrong}"))
                            .as_bytes(),
                    )
                }),
                top_key.clone(),
                "FileSize",
                Box::new(|| cache.put(&top_key, top_text.as_bytes())),
            ),
            (
                // Another valid compressed NAR with matching FileHash/FileSize: the signed
                // NarHash is all that can tell.
                "a NAR that decompresses to other content",
                Box::new(|| {
                    cache.put(&top_nar, &dep_nar_bytes);
                    let file_hash = cachepush::format::Sha256::digest(&dep_nar_bytes).to_string();
                    let text = top_text
                        .replace(field(&top_text, "FileHash"), &file_hash)
                        .replace(
                            &format!("FileSize: {}", field(&top_text, "FileSize")),
                            &format!("FileSize: {}", dep_nar_bytes.len()),
                        );
                    cache.put(&top_key, text.as_bytes());
                }),
                top_key.clone(),
                "NarHash says",
                Box::new(|| {
                    cache.put(&top_nar, &top_nar_bytes);
                    cache.put(&top_key, top_text.as_bytes());
                }),
            ),
            (
                "a signature that does not verify",
                Box::new(|| {
                    let sig = field(&top_text, "Sig");
                    let (name, b64) = sig.split_once(':').unwrap();
                    let flipped: String = b64
                        .chars()
                        .enumerate()
                        .map(|(i, c)| {
                            if i == 3 {
                                if c == 'A' { 'B' } else { 'A' }
                            } else {
                                c
                            }
                        })
                        .collect();
                    cache.put(
                        &top_key,
                        top_text
                            .replace(sig, &format!("{name}:{flipped}"))
                            .as_bytes(),
                    );
                }),
                top_key.clone(),
                "no valid signature by a trusted key",
                Box::new(|| cache.put(&top_key, top_text.as_bytes())),
            ),
            (
                "an unreadable narinfo",
                Box::new(|| cache.put(&top_key, b"StorePath: not a store path\n")),
                top_key.clone(),
                "unreadable narinfo",
                Box::new(|| cache.put(&top_key, top_text.as_bytes())),
            ),
            (
                "a narinfo stored under another hash",
                Box::new(|| cache.put(&alias, top_text.as_bytes())),
                alias.clone(),
                "but is stored under",
                Box::new(|| cache.delete(&alias)),
            ),
            (
                "no nix-cache-info",
                Box::new(|| cache.delete("nix-cache-info")),
                "nix-cache-info".to_owned(),
                "missing",
                Box::new(|| cache.put("nix-cache-info", info.as_bytes())),
            ),
        ];
        for (what, damage, key, words, restore) in damages {
            damage();
            let (code, problems) = cache.verify(&pk, &[]);
            assert_eq!(code, 1, "{}: {what}: {problems:?}", cache.url());
            assert!(
                problems.iter().any(|(k, p)| k == &key && p.contains(words)),
                "{}: {what}: expected {key}: …{words}…, got {problems:?}",
                cache.url()
            );
            restore();
            let (code, problems) = cache.verify(&pk, &[]);
            assert_eq!(
                (code, problems.len()),
                (0, 0),
                "{}: after restoring {what}: {problems:?}",
                cache.url()
            );
        }
    }

    // An open multipart upload (S3 only): reported, and --abort-open-uploads removes it.
    let Cache::S3(_, bucket) = &caches[0] else {
        unreachable!()
    };
    s3.block_on(
        s3.client()
            .create_multipart_upload()
            .bucket(bucket)
            .key("nar/left-open.nar.zst")
            .send(),
    )
    .unwrap();
    let (code, problems) = caches[0].verify(&pk, &[]);
    assert_eq!(code, 1, "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|(k, p)| k == "nar/left-open.nar.zst" && p.contains("left open")),
        "{problems:?}"
    );
    let (code, _) = caches[0].verify(&pk, &["--abort-open-uploads"]);
    assert!(code == 0 || code == 1, "{code}");
    assert!(s3.open_uploads(bucket, "").is_empty());
    let (code, problems) = caches[0].verify(&pk, &[]);
    assert_eq!((code, problems.len()), (0, 0), "{problems:?}");
}

/// From the proxy's log: every narinfo PUT that succeeded started only after its NAR was
/// stored (a 2xx PUT, or a 2xx CompleteMultipartUpload) and after every referenced
/// narinfo's PUT succeeded. This is what "a narinfo is never published before what it
/// points at" means on the wire.
fn assert_publish_order(s3: &S3, bucket: &str, log: &[common::fault::Logged]) {
    let done = |pred: &dyn Fn(&common::fault::Logged) -> bool| {
        log.iter()
            .filter(|l| l.ok() && pred(l))
            .map(|l| l.ended)
            .min()
    };
    let mut checked = 0;
    let path = |l: &common::fault::Logged| l.target.split('?').next().unwrap().to_owned();
    for put in log
        .iter()
        .filter(|l| l.ok() && l.method == "PUT" && path(l).ends_with(".narinfo"))
    {
        let put_path = path(put);
        let key = put_path.rsplit('/').next().unwrap();
        let text = String::from_utf8(s3.get(bucket, key)).unwrap();
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        let nar_stored = done(&|l: &common::fault::Logged| {
            path(l).ends_with(&url)
                && (l.method == "PUT" && !l.target.contains("partNumber=")
                    || l.method == "POST" && l.target.contains("uploadId="))
        })
        .unwrap_or_else(|| panic!("{key}: no successful write of its NAR {url} in the log"));
        assert!(
            put.started >= nar_stored,
            "{key} was PUT before its NAR {url} was stored"
        );
        let refs = text
            .lines()
            .find_map(|l| l.strip_prefix("References: "))
            .unwrap_or("");
        for r in refs.split_whitespace() {
            let rkey = format!("{}.narinfo", &r[..32]);
            if rkey == key {
                continue;
            }
            if let Some(ref_done) = done(&|l: &common::fault::Logged| {
                l.method == "PUT" && path(l).ends_with(&format!("/{rkey}"))
            }) {
                assert!(
                    put.started >= ref_done,
                    "{key} was PUT before its reference {rkey}"
                );
            } else {
                // Not written by this push: it must have been there already.
                assert!(
                    s3.head(bucket, &rkey).is_some(),
                    "{key} refers to missing {rkey}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "no narinfo PUT in the log to check");
}

/// A narinfo PUT refused for good fails its path and, transitively, every path that
/// refers to it, however indirectly (top refers to big, big to small; top not to small);
/// nothing of theirs is published; the same command finishes once the fault is gone, and
/// the wire shows every narinfo written after its NAR and its references.
#[test]
fn a_failed_narinfo_fails_its_dependents_transitively() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let salt = unique("transitive3");
    let build_attr = |attr: &str| {
        let mut c = Command::new("nix-build");
        c.arg(fixture("big.nix")).args([
            "--no-out-link",
            "--argstr",
            "salt",
            &salt,
            "--argstr",
            "mib",
            "1",
        ]);
        if !attr.is_empty() {
            c.args(["-A", attr]);
        }
        PathBuf::from(stdout(&run_ok(c.args(["--option", "substituters", ""]))))
    };
    let top = build_attr("");
    let small = build_attr("small");
    let closure = closure_of(&top);
    assert_eq!(closure.len(), 3, "{closure:?}");
    let small_key: &'static str = Box::leak(
        format!(
            "{}.narinfo",
            &small.file_name().unwrap().to_str().unwrap()[..32]
        )
        .into_boxed_str(),
    );
    let bucket = s3.new_bucket("transitive");
    proxy.add(Rule {
        method: "PUT",
        target: small_key,
        times: usize::MAX,
        fault: Fault::Status(403, "AccessDenied", None),
    });
    let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let j = json(&o);
    assert_eq!(j["failed"], 3, "{j}");
    assert_eq!(j["pushed"], 0, "{j}");
    let failures = j["failures"].to_string();
    assert!(
        failures.contains("-big") && failures.contains("-big-top") && failures.contains("-small"),
        "{failures}"
    );
    assert!(
        s3.keys(&bucket, "")
            .iter()
            .all(|k| !k.ends_with(".narinfo")),
        "{:?}",
        s3.keys(&bucket, "")
    );
    let (code, v) = verify(&s3, &bucket, &pk);
    assert_eq!((code, v["narinfos"].as_u64()), (0, Some(0)), "{v}");

    // The fault gone, the same command publishes all three, each in order.
    proxy.clear();
    proxy.clear_log();
    let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(json(&o)["pushed"], 3);
    assert_publish_order(&s3, &bucket, &proxy.log());
    assert_verified(&s3, &bucket, &pk, 3);
}

/// Every way a multipart upload can fail leaves no upload open when the push exits, or
/// says which could not be aborted and how to remove them; and a Complete whose answer was
/// lost is confirmed with a HEAD when its retry finds the upload gone.
#[test]
fn multipart_uploads_are_aborted_on_every_failure_path() {
    for s3 in S3::all() {
        multipart_abort_paths(&s3);
    }
}

fn multipart_abort_paths(s3: &S3) {
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let args = ["--part-size", "5", "--compression", "none"];
    let complete = |times: usize, fault: Fault| Rule {
        method: "POST",
        target: "uploadId=",
        times,
        fault,
    };
    // CompleteMultipartUpload refused for good, at once and after retries.
    for (what, fault) in [
        ("Complete refused", Fault::Status(400, "InvalidPart", None)),
        (
            "Complete failing",
            Fault::Status(500, "InternalError", None),
        ),
    ] {
        let top = big(&unique("complete-fails"));
        let bucket = s3.new_bucket("complete");
        proxy.clear();
        proxy.add(complete(usize::MAX, fault));
        let o = push(s3, &proxy.endpoint(), &bucket, &sk, &args, &top);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr_of(&o));
        assert_eq!(json(&o)["failed"], 2, "{what}: {}", json(&o));
        // Immediately after the exit: nothing open, nothing to clean up later.
        assert!(
            s3.open_uploads(&bucket, "").is_empty(),
            "{what}: upload left open"
        );
        assert_verified(s3, &bucket, &pk, 1);
    }

    // The abort itself failing: the push says so, verify sees the upload, and
    // `verify --abort-open-uploads` removes it.
    let top = big(&unique("abort-fails"));
    let bucket = s3.new_bucket("abortfails");
    proxy.clear();
    proxy.add(Rule {
        method: "PUT",
        target: "partNumber=",
        times: usize::MAX,
        fault: Fault::Status(403, "AccessDenied", None),
    });
    proxy.add(Rule {
        method: "DELETE",
        target: "uploadId=",
        times: usize::MAX,
        fault: Fault::Status(500, "InternalError", None),
    });
    let o = push(s3, &proxy.endpoint(), &bucket, &sk, &args, &top);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("1 multipart upload could not be aborted"),
        "{}",
        stderr_of(&o)
    );
    let (code, v) = verify(s3, &bucket, &pk);
    assert_eq!((code, v["open_uploads"].as_u64()), (1, Some(1)), "{v}");
    let mut c = cachepush();
    s3.creds(&mut c);
    run_ok(
        c.args(["verify", "--abort-open-uploads", "--trusted-key", &pk])
            .arg(s3.url(&bucket, "")),
    );
    assert!(s3.open_uploads(&bucket, "").is_empty());
    assert_verified(s3, &bucket, &pk, 1);

    // Complete's answer lost (the server completed it), its retry told NoSuchUpload: a
    // HEAD of the object confirms the success.
    let top = big(&unique("complete-lost"));
    let bucket = s3.new_bucket("completelost");
    proxy.clear();
    proxy.clear_log();
    proxy.add(complete(1, Fault::Truncate));
    proxy.add(complete(1, Fault::Status(404, "NoSuchUpload", None)));
    let o = push(s3, &proxy.endpoint(), &bucket, &sk, &args, &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(proxy.injected() >= 2);
    let log = proxy.log();
    let no_such_upload = log
        .iter()
        .find(|l| l.method == "POST" && l.status == 404)
        .expect("the retried Complete got NoSuchUpload");
    let nar = no_such_upload.target.split('?').next().unwrap();
    assert!(
        log.iter().any(|l| l.method == "HEAD"
            && l.target.split('?').next() == Some(nar)
            && l.started >= no_such_upload.ended),
        "no HEAD of {nar} after the NoSuchUpload"
    );
    assert_verified(s3, &bucket, &pk, 3);
}

/// A server without ListMultipartUploads (501 NotImplemented): verify says once what it
/// could not check and checks the rest, instead of stopping; its twin on the full server
/// checks everything.
#[test]
fn verify_carries_on_when_listing_uploads_is_not_implemented() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let bucket = s3.new_bucket("no501");
    let top = build("", &unique("no-list-uploads"));
    assert!(
        push(&s3, &s3.endpoint, &bucket, &sk, &[], &top)
            .status
            .success()
    );
    let run = || {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.args(["verify", "--json", "--trusted-key", &pk, "--endpoint"])
            .arg(proxy.endpoint())
            .arg(s3.url(&bucket, ""))
            .output()
            .unwrap()
    };
    proxy.add(Rule {
        method: "GET",
        target: "uploads",
        times: usize::MAX,
        fault: Fault::Status(501, "NotImplemented", None),
    });
    let o = run();
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let v = json(&o);
    assert_eq!(v["narinfos"], closure_of(&top).len(), "{v}");
    assert!(
        v["not_checked"]
            .to_string()
            .contains("open multipart uploads"),
        "{v}"
    );
    assert!(stderr_of(&o).contains("not checked"), "{}", stderr_of(&o));
    assert_eq!(
        stderr_of(&o).matches("not checked").count(),
        1,
        "said once: {}",
        stderr_of(&o)
    );
    assert!(proxy.injected() >= 1);

    // Real damage is still found on that server: a deleted NAR, with --full.
    let nar = s3
        .keys(&bucket, "")
        .into_iter()
        .find(|k| k.starts_with("nar/"))
        .unwrap();
    s3.delete(&bucket, &nar);
    let mut c = cachepush();
    s3.creds(&mut c);
    let o = c
        .args([
            "verify",
            "--full",
            "--json",
            "--trusted-key",
            &pk,
            "--endpoint",
        ])
        .arg(proxy.endpoint())
        .arg(s3.url(&bucket, ""))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let v = json(&o);
    assert!(v["problems"].to_string().contains(&nar), "{v}");
    assert!(
        v["not_checked"]
            .to_string()
            .contains("open multipart uploads"),
        "{v}"
    );

    proxy.clear();
    let o = run();
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert_eq!(json(&o)["not_checked"], serde_json::json!([]));
}

/// A server without conditional writes (501 to `If-None-Match` on PUT): the push creates
/// nix-cache-info after its HEAD found none, says so once, and publishes everything
/// (verify finds the whole closure). A second push finds the cache as it left it.
#[test]
fn a_push_does_without_conditional_writes() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");
    let bucket = s3.new_bucket("noifnonematch");
    let top = build("", &unique("no-conditional-writes"));
    proxy.add(Rule {
        method: "PUT",
        target: "",
        times: usize::MAX,
        fault: Fault::StatusIfHeader("if-none-match", 501, "NotImplemented"),
    });
    let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(proxy.injected() >= 1, "the fault never fired");
    let said = stderr_of(&o);
    assert_eq!(
        said.matches("does not support conditional writes").count(),
        1,
        "{said}"
    );
    assert!(s3.head(&bucket, "nix-cache-info").is_some());
    assert_verified(&s3, &bucket, &pk, closure_of(&top).len());
    let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        !stderr_of(&o).contains("conditional writes"),
        "{}",
        stderr_of(&o)
    );
}

/// A server that throttles a third of everything (AWS's 503 SlowDown, B2's 503 "too
/// busy", 429 with and without Retry-After, 400 RequestTimeout): the push slows down
/// (its limit on requests in flight is cut) and finishes, every path published, exit 0,
/// and `verify` finds the cache whole. The same push without throttling is the control.
#[test]
fn a_throttling_server_slows_the_push_down_and_it_still_finishes() {
    let s3 = S3::seaweedfs();
    let proxy = FaultProxy::start(&s3.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "faults-1");

    // Control: no throttling, no cut, nothing counted as throttled.
    let top = build_wide(&unique("calm"));
    let calm = s3.new_bucket("calm");
    let o = push(&s3, &proxy.endpoint(), &calm, &sk, &[], &top);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let j = json(&o);
    assert_eq!(j["pushed"], 151, "{j}");
    assert_eq!(j["requests"]["throttled"], 0, "{j}");
    assert_eq!(j["requests"]["limit_cuts"], 0, "{j}");
    assert!(j["requests"]["limit_peak"].as_u64().unwrap() >= 16, "{j}");

    let top = build_wide(&unique("throttled"));
    let bucket = s3.new_bucket("throttled");
    let throttling = vec![
        Fault::Status(503, "SlowDown", None),
        Fault::Status(503, "ServiceUnavailable", None),
        Fault::Status(429, "TooManyRequests", Some(1)),
        Fault::Status(429, "", None),
    ];
    // RequestTimeout is what a server says to an upload whose body came too slowly: PUTs.
    let mut uploads = throttling.clone();
    uploads.push(Fault::Status(400, "RequestTimeout", None));
    proxy.add(Rule {
        method: "PUT",
        target: "/",
        times: usize::MAX,
        fault: Fault::Share(33, uploads),
    });
    proxy.add(Rule {
        method: "*",
        target: "/",
        times: usize::MAX,
        fault: Fault::Share(33, throttling),
    });
    let o = push(&s3, &proxy.endpoint(), &bucket, &sk, &[], &top);
    let injected = proxy.injected();
    proxy.clear();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let j = json(&o);
    assert_eq!(j["pushed"], 151, "{j}");
    assert_eq!(j["failed"], 0, "{j}");
    // Every throttling answer was seen as one, and the limit was cut for them.
    assert!(injected >= 50, "only {injected} answers throttled");
    assert_eq!(j["requests"]["throttled"], injected as u64, "{j}");
    assert!(j["requests"]["limit_cuts"].as_u64().unwrap() >= 1, "{j}");
    assert_verified(&s3, &bucket, &pk, 151);
}

/// Parts PUT through the proxy and answered 200.
fn parts_sent(proxy: &FaultProxy) -> usize {
    proxy
        .log()
        .iter()
        .filter(|l| l.method == "PUT" && l.target.contains("partNumber=") && l.ok())
        .count()
}

/// Starts a push of `top` through the proxy whose parts after the first `pass` are held
/// and never forwarded, and SIGKILLs it (no chance to abort anything) once those `pass`
/// parts are on the server: a CI runner lost or OOM-killed mid-NAR.
fn push_killed_after_parts(
    s3: &S3,
    proxy: &FaultProxy,
    bucket: &str,
    sk: &Path,
    cache_home: &Path,
    top: &Path,
    pass: usize,
) {
    proxy.clear();
    proxy.clear_log();
    proxy.add(Rule {
        method: "PUT",
        target: "partNumber=",
        times: pass,
        fault: Fault::Jitter(Duration::ZERO),
    });
    proxy.add(Rule {
        method: "PUT",
        target: "partNumber=",
        times: usize::MAX,
        fault: Fault::StallThenDrop(Duration::from_secs(60)),
    });
    let mut child = push_cmd(s3, &proxy.endpoint(), bucket, sk, RESUMABLE, top)
        .env("XDG_CACHE_HOME", cache_home)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while parts_sent(proxy) < pass {
        assert!(Instant::now() < deadline, "{pass} parts never got through");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the client take in the last answers (and journal them), then kill it outright.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    proxy.clear();
}

/// The push that the resume test kills and runs again: small parts, no compression.
const RESUMABLE: &[&str] = &["--part-size", "5", "--compression", "none"];

/// The re-run of a killed push: the same command, with the same journal directory.
fn resume(s3: &S3, proxy: &FaultProxy, bucket: &str, sk: &Path, home: &Path, top: &Path) -> Output {
    push_cmd(s3, &proxy.endpoint(), bucket, sk, RESUMABLE, top)
        .env("XDG_CACHE_HOME", home)
        .output()
        .unwrap()
}

/// A push SIGKILLed mid-NAR and run again resumes the multipart upload from its journal:
/// only the parts the server lacks are sent, the NAR is whole (`verify --full` hashes it)
/// and the journal is gone. A journal whose upload is gone (here aborted, as gc does) is
/// discarded, and the push starts over and succeeds. On SeaweedFS and Ceph RGW.
#[test]
fn a_killed_push_resumes_its_multipart_upload_from_the_journal() {
    for s3 in S3::all() {
        let proxy = FaultProxy::start(&s3.endpoint);
        let tmp = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(tmp.path(), "faults-1");
        let home = tmp.path().join("cache-home");
        let journals = home.join("cachepush").join("uploads");
        let count = |d: &Path| std::fs::read_dir(d).map_or(0, |r| r.count());
        let top = build_big(&unique("resume"), 60);
        let bucket = s3.new_bucket("resume");
        push_killed_after_parts(&s3, &proxy, &bucket, &sk, &home, &top, 9);
        assert_eq!(
            count(&journals),
            1,
            "{}: no journal left by the kill",
            s3.name
        );
        assert_eq!(s3.open_uploads(&bucket, "").len(), 1, "{}", s3.name);

        proxy.clear_log();
        let o = resume(&s3, &proxy, &bucket, &sk, &home, &top);
        assert!(o.status.success(), "{}: {}", s3.name, stderr_of(&o));
        let j = json(&o);
        let part = 5u64 << 20;
        let file = j["sent_bytes"].as_u64().unwrap();
        let parts = file.div_ceil(part) as usize;
        assert!(parts >= 12, "{}: {parts} parts", s3.name);
        assert_eq!(j["requests"]["resumed_bytes"], 9 * part, "{}: {j}", s3.name);
        assert_eq!(
            parts_sent(&proxy),
            parts - 9,
            "{}: parts sent again",
            s3.name
        );
        assert_eq!(count(&journals), 0, "{}: journal kept", s3.name);
        assert_verified(&s3, &bucket, &pk, 3);

        // The upload is gone before the re-run: the journal is discarded, all is sent.
        let top = build_big(&unique("resume-gone"), 24);
        let bucket = s3.new_bucket("resume-gone");
        push_killed_after_parts(&s3, &proxy, &bucket, &sk, &home, &top, 2);
        assert_eq!(count(&journals), 1, "{}", s3.name);
        let mut c = cachepush();
        s3.creds(&mut c);
        run_ok(
            c.args(["verify", "--abort-open-uploads"])
                .arg(s3.url(&bucket, "")),
        );
        assert!(s3.open_uploads(&bucket, "").is_empty(), "{}", s3.name);
        proxy.clear_log();
        let o = resume(&s3, &proxy, &bucket, &sk, &home, &top);
        assert!(o.status.success(), "{}: {}", s3.name, stderr_of(&o));
        let j = json(&o);
        assert_eq!(j["requests"]["resumed_bytes"], 0, "{}: {j}", s3.name);
        let parts = j["sent_bytes"].as_u64().unwrap().div_ceil(part) as usize;
        assert_eq!(parts_sent(&proxy), parts, "{}", s3.name);
        assert_eq!(count(&journals), 0, "{}", s3.name);
        assert_verified(&s3, &bucket, &pk, 3);
    }
}
