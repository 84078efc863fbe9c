//! `cachepush copy --to s3://...` against the real SeaweedFS and Ceph RADOS Gateway started
//! by scripts/test.sh, judged by what is in the bucket and by the real Nix substituting
//! over plain HTTP from a public-read bucket.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cachepush::format::NarInfo;
use common::s3::S3;
use common::*;

fn push_cmd(s3: &S3, bucket: &str, prefix: &str, sk: &Path, extra: &[&str]) -> Command {
    let mut c = copy_cmd(&s3.url(bucket, prefix), Some(s3), Some(sk), &["--json"]);
    c.args(extra);
    c
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON summary on stdout ({e}); stdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn key(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_owned()
    } else {
        format!("{prefix}/{k}")
    }
}

/// The narinfos of a cache in a bucket, by store-path hash.
fn narinfos_in(s3: &S3, bucket: &str, prefix: &str) -> BTreeMap<String, NarInfo> {
    s3.keys(bucket, prefix)
        .into_iter()
        .filter(|k| k.ends_with(".narinfo"))
        .map(|k| {
            let text = String::from_utf8(s3.get(bucket, &k)).expect("narinfo is UTF-8");
            let ni = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{k}: {e}"));
            (ni.store_path.hash_part().to_owned(), ni)
        })
        .collect()
}

/// What must hold in a cache whatever happened to the push that wrote it: every narinfo's
/// NAR exists with FileSize bytes, and every reference has a narinfo.
fn assert_consistent(s3: &S3, bucket: &str, prefix: &str) -> BTreeMap<String, NarInfo> {
    let infos = narinfos_in(s3, bucket, prefix);
    for (hash, ni) in &infos {
        let (_, _, len) = s3
            .head(bucket, &key(prefix, &ni.url))
            .unwrap_or_else(|| panic!("{}: {hash}.narinfo points at a missing NAR", s3.name));
        assert_eq!(Some(len), ni.file_size, "{}: {} size", s3.name, ni.url);
        for r in &ni.references {
            assert!(
                infos.contains_key(r.hash_part()),
                "{}: {hash}.narinfo refers to {r}, which has no narinfo",
                s3.name
            );
        }
    }
    let open = s3.open_uploads(bucket, prefix);
    assert!(
        open.is_empty(),
        "{}: multipart uploads left open: {open:?}",
        s3.name
    );
    infos
}

#[test]
fn layout_headers_no_op_repush_and_nix_substitutes_over_http() {
    let top = shared_top();
    let closure = closure_of(top);
    for s3 in S3::all() {
        let tmp = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(tmp.path(), "s3-test-1");
        let (bucket, prefix) = s3.new_public_cache("layout");

        // --dry-run prints the plan and writes nothing.
        let dry = run_ok(push_cmd(&s3, &bucket, &prefix, &sk, &["--dry-run"]).arg(top));
        let j = json(&dry);
        assert_eq!(j["to_push"], closure.len(), "{}: {j}", s3.name);
        assert_eq!(j["requests"]["put"], 0, "{}: {j}", s3.name);
        assert_eq!(j["requests"]["multipart"], 0, "{}: {j}", s3.name);
        assert!(
            stderr_of(&dry).contains("would push"),
            "{}",
            stderr_of(&dry)
        );
        assert!(
            s3.keys(&bucket, &prefix).is_empty(),
            "{}: dry run wrote",
            s3.name
        );

        // The push itself.
        let out = run_ok(push_cmd(&s3, &bucket, &prefix, &sk, &[]).arg(top));
        let j = json(&out);
        assert_eq!(j["pushed"], closure.len(), "{}: {j}", s3.name);
        assert_eq!(j["failed"], 0, "{}: {j}", s3.name);
        assert!(j["requests"]["put"].as_u64().unwrap() >= closure.len() as u64);
        // Under 100 paths the plan asks with HEADs only: a listing would cost more.
        assert_eq!(j["requests"]["list"], 0, "{}: {j}", s3.name);

        // Layout and headers, as Nix's own stores write them.
        let infos = assert_consistent(&s3, &bucket, &prefix);
        assert_eq!(infos.len(), closure.len(), "{}", s3.name);
        let (ct, _, _) = s3.head(&bucket, &key(&prefix, "nix-cache-info")).unwrap();
        assert_eq!(ct, "text/x-nix-cache-info", "{}", s3.name);
        for (hash, ni) in &infos {
            let (ct, enc, _) = s3
                .head(&bucket, &key(&prefix, &format!("{hash}.narinfo")))
                .unwrap();
            assert_eq!(ct, "text/x-nix-narinfo", "{}", s3.name);
            assert_eq!(enc, None, "{}", s3.name);
            assert!(ni.url.starts_with("nar/") && ni.url.ends_with(".nar.zst"));
            assert_eq!(ni.compression, "zstd");
            let (ct, enc, _) = s3.head(&bucket, &key(&prefix, &ni.url)).unwrap();
            assert_eq!(ct, "application/x-nix-nar", "{}: {}", s3.name, ni.url);
            assert_eq!(
                enc, None,
                "{}: a NAR must carry no Content-Encoding",
                s3.name
            );
        }
        // nix-cache-info, a narinfo and a NAR per path, and the push's record for gc.
        let keys = s3.keys(&bucket, &prefix);
        let records = keys
            .iter()
            .filter(|k| k.contains("cachepush/pushes/"))
            .count();
        assert_eq!(records, 1, "{}: {keys:?}", s3.name);
        assert_eq!(keys.len(), 2 + 2 * closure.len(), "{}: {keys:?}", s3.name);

        // The real Nix substitutes it over plain HTTP, signatures checked...
        let url = s3.http_url(&bucket, &prefix);
        let dest = tmp.path().join("dest");
        let ok = nix_substitute(&url, &dest, top, &pk);
        assert!(ok.status.success(), "{}: {}", s3.name, stderr_of(&ok));
        assert!(dest.join(top.strip_prefix("/").unwrap()).exists());
        // ...and refuses it when it trusts another key.
        let other = run_ok(
            cachepush()
                .arg("keygen")
                .arg("other-1")
                .arg(tmp.path().join("o")),
        );
        let bad = nix_substitute(&url, &tmp.path().join("dest2"), top, &stdout(&other));
        assert!(
            !bad.status.success(),
            "{}: Nix accepted an untrusted key",
            s3.name
        );
        assert!(
            stderr_of(&bad).contains("lacks a valid signature"),
            "{}: refused for another reason: {}",
            s3.name,
            stderr_of(&bad)
        );

        // A second push finds everything and writes nothing.
        let again = run_ok(push_cmd(&s3, &bucket, &prefix, &sk, &[]).arg(top));
        let j = json(&again);
        assert_eq!(j["pushed"], 0, "{}: {j}", s3.name);
        assert_eq!(j["skipped"], closure.len(), "{}: {j}", s3.name);
        assert_eq!(j["requests"]["put"], 0, "{}: {j}", s3.name);
        assert_eq!(j["requests"]["multipart"], 0, "{}: {j}", s3.name);
        assert_eq!(s3.keys(&bucket, &prefix), keys);
    }
}

#[test]
fn a_large_nar_goes_multipart_and_nix_accepts_it() {
    let top = build_big(&unique("multipart"), 24);
    for s3 in S3::all() {
        let tmp = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(tmp.path(), "s3-test-1");
        let (bucket, prefix) = s3.new_public_cache("multipart");
        let out = run_ok(push_cmd(&s3, &bucket, &prefix, &sk, &["--part-size", "5"]).arg(&top));
        let j = json(&out);
        assert_eq!(j["pushed"], 3, "{}: {j}", s3.name);
        // CreateMultipartUpload + at least two parts + Complete.
        let mp = j["requests"]["multipart"].as_u64().unwrap();
        assert!(mp >= 4, "{}: expected a multipart upload: {j}", s3.name);
        let infos = assert_consistent(&s3, &bucket, &prefix);
        let big = infos
            .values()
            .find(|ni| ni.store_path.name() == "big")
            .expect("big is published");
        assert!(big.file_size.unwrap() > 5 << 20, "{}: {big:?}", s3.name);
        let (ct, enc, _) = s3.head(&bucket, &key(&prefix, &big.url)).unwrap();
        assert_eq!(ct, "application/x-nix-nar", "{}", s3.name);
        assert_eq!(enc, None, "{}", s3.name);

        let dest = tmp.path().join("dest");
        let ok = nix_substitute(&s3.http_url(&bucket, &prefix), &dest, &top, &pk);
        assert!(ok.status.success(), "{}: {}", s3.name, stderr_of(&ok));

        // The hosted providers' profile: every PUT and part carries Content-MD5, which the
        // server checks (a wrong one is refused with BadDigest); the cache is the same.
        let (bucket, prefix) = s3.new_public_cache("multipart-md5");
        let url = format!("{}&provider=generic&checksum=md5", s3.url(&bucket, &prefix));
        let out =
            run_ok(copy_cmd(&url, Some(&s3), Some(&sk), &["--json", "--part-size", "5"]).arg(&top));
        let j = json(&out);
        assert_eq!(j["pushed"], 3, "{}: {j}", s3.name);
        assert!(
            j["requests"]["multipart"].as_u64().unwrap() >= 4,
            "{}: {j}",
            s3.name
        );
        assert_consistent(&s3, &bucket, &prefix);
        let dest = tmp.path().join("dest-md5");
        let ok = nix_substitute(&s3.http_url(&bucket, &prefix), &dest, &top, &pk);
        assert!(ok.status.success(), "{}: {}", s3.name, stderr_of(&ok));
    }
}

/// Makes a store file writable, lets `f` change it, and makes it read-only again.
fn tamper(file: &Path, f: impl FnOnce(&Path)) {
    use std::os::unix::fs::PermissionsExt;
    let perm = |m| std::fs::set_permissions(file, std::fs::Permissions::from_mode(m));
    perm(0o644).expect("the tests run as the owner of the Nix store (root, single-user Nix)");
    f(file);
    perm(0o444).unwrap();
}

fn flip_byte(file: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut fh = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8];
    fh.seek(SeekFrom::Start(at)).unwrap();
    fh.read_exact(&mut b).unwrap();
    fh.seek(SeekFrom::Start(at)).unwrap();
    fh.write_all(&[b[0] ^ 0xff]).unwrap();
}

#[test]
fn a_path_whose_content_changed_is_not_published() {
    let top = build_big(&unique("changed"), 12);
    let big = std::fs::read_to_string(&top).unwrap().trim().to_owned();
    let blob = Path::new(&big).join("blob");
    let hash = stdout(&run_ok(
        Command::new("nix-store").args(["-q", "--hash", &big]),
    ));
    let big_nar_hash = hash.trim_start_matches("sha256:").to_owned();
    for s3 in S3::all() {
        let tmp = tempfile::tempdir().unwrap();
        let (sk, _) = keygen(tmp.path(), "s3-test-1");
        let bucket = s3.new_bucket("changed");
        // Single PUT (zstd, below one part) and multipart (uncompressed, 5 MiB parts).
        for extra in [
            &["--compression", "zstd"][..],
            &["--compression", "none", "--part-size", "5"],
        ] {
            tamper(&blob, |f| flip_byte(f, 6 << 20));
            let out = push_cmd(&s3, &bucket, "", &sk, extra)
                .arg(&top)
                .output()
                .unwrap();
            tamper(&blob, |f| flip_byte(f, 6 << 20));
            assert_eq!(
                out.status.code(),
                Some(1),
                "{}: {}",
                s3.name,
                stderr_of(&out)
            );
            let err = stderr_of(&out);
            assert!(
                err.contains("NAR hash mismatch") && err.contains("-big"),
                "{err}"
            );
            assert!(
                err.contains("its reference") && err.contains("-big-top"),
                "{err}"
            );
            let j = json(&out);
            assert_eq!(j["failed"], 2, "{}: {j}", s3.name);
            let infos = assert_consistent(&s3, &bucket, "");
            let names: Vec<&str> = infos.values().map(|n| n.store_path.name()).collect();
            assert_eq!(names, vec!["small"], "{}: {extra:?}", s3.name);
            // No NAR under the changed path's name. (Its dependents' NARs may have gone up in
            // parallel: unreferenced, invisible to Nix, and replaced by the next push.)
            let nars = s3.keys(&bucket, "nar/");
            assert!(!nars.is_empty(), "{}: small's NAR is missing", s3.name);
            assert!(
                !nars.iter().any(|k| k.contains(&big_nar_hash)),
                "{}: NAR of a changed path kept: {nars:?}",
                s3.name
            );
        }
        // With the content restored, the same command publishes everything.
        let out = run_ok(push_cmd(&s3, &bucket, "", &sk, &[]).arg(&top));
        assert_eq!(json(&out)["pushed"], 2, "{}", s3.name);
        assert_eq!(assert_consistent(&s3, &bucket, "").len(), 3);
    }
}

#[test]
fn an_interrupted_push_leaves_a_consistent_cache_and_a_rerun_completes_it_in_bounded_memory() {
    // Large next to the memory bound below, so that holding the NAR would show.
    const MIB: u32 = 300;
    let top = build_big(&unique("interrupted"), MIB);
    // SIGHUP too: a closed terminal or ssh session (security review L3).
    for (s3, signal) in [
        (S3::seaweedfs(), "INT"),
        (S3::ceph(), "TERM"),
        (S3::seaweedfs(), "HUP"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(tmp.path(), "s3-test-1");
        let (bucket, prefix) = s3.new_public_cache("interrupted");
        let args = ["--part-size", "5", "--jobs", "2", "-v"];
        let mut child = push_cmd(&s3, &bucket, &prefix, &sk, &args)
            .arg(&top)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Interrupt once the large NAR is on its way.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let started = line.contains("uploading big ");
            seen.push(line);
            if started {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        run_ok(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string()),
        );
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        let all = format!("{}\n{}", seen.join("\n"), rest.join("\n"));
        assert_eq!(status.code(), Some(130), "{}: SIG{signal}: {all}", s3.name);
        assert!(all.contains("interrupted"), "{all}");

        // No narinfo without its NAR or references, no upload left open.
        let infos = assert_consistent(&s3, &bucket, &prefix);
        assert!(
            infos.values().all(|n| n.store_path.name() == "small"),
            "{}: {infos:?}",
            s3.name
        );

        // The same command finishes the job without sending again what was done.
        let out = run_ok(push_cmd(&s3, &bucket, &prefix, &sk, &args).arg(&top));
        let j = json(&out);
        assert_eq!(
            j["pushed"].as_u64().unwrap() + j["skipped"].as_u64().unwrap(),
            3
        );
        assert_eq!(j["skipped"].as_u64().unwrap(), infos.len() as u64, "{j}");
        assert_eq!(assert_consistent(&s3, &bucket, &prefix).len(), 3);

        // Memory is bounded by the part size and the concurrency, not by the NAR's size:
        // (2 jobs buffering a part + 8 parts in flight) x 5 MiB, plus zstd's buffers and the
        // process itself (about 75 MiB in all when measured).
        let rss = j["peak_rss_bytes"]
            .as_u64()
            .expect("peak RSS is reported on Linux");
        let nar = j["nar_bytes"].as_u64().unwrap();
        eprintln!(
            "{}: peak RSS {} MiB while pushing a {} MiB NAR (part size 5 MiB, 2 jobs)",
            s3.name,
            rss >> 20,
            nar >> 20
        );
        let bound = (2 + 8) * (5 << 20) + (100 << 20);
        assert!(rss < bound, "{}: peak RSS {rss} over {bound}", s3.name);
        assert!(
            nar > bound,
            "the NAR must be larger than the bound to prove anything"
        );

        let dest = tmp.path().join("dest");
        let ok = nix_substitute(&s3.http_url(&bucket, &prefix), &dest, &top, &pk);
        assert!(ok.status.success(), "{}: {}", s3.name, stderr_of(&ok));
    }
}

#[test]
fn paths_served_upstream_or_signed_by_a_named_key_are_skipped() {
    let top = build("", "upstream-skip");
    let closure = closure_of(&top);
    let dep = build("dep", "upstream-skip");
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "s3-test-1");

    // The upstream: a public cache that has only `dep`.
    let (bucket, prefix) = s3.new_public_cache("upstream");
    run_ok(push_cmd(&s3, &bucket, &prefix, &sk, &["--no-closure"]).arg(&dep));
    let upstream = s3.http_url(&bucket, &prefix);

    let file_push = |dir: &str, extra: &[&str]| {
        let mut c = cachepush();
        c.arg("copy")
            .arg("--to")
            .arg(format!("file://{}", tmp.path().join(dir).display()))
            .arg("--signing-key")
            .arg(&sk)
            .arg("--json")
            .args(extra)
            .arg(&top);
        run_ok(&mut c)
    };
    let out = file_push("a", &["--upstream", &upstream]);
    let j = json(&out);
    assert_eq!(j["upstream"], 1, "{j}");
    assert_eq!(j["pushed"], closure.len() - 1, "{j}");
    assert!(
        stderr_of(&out).contains("1 available upstream"),
        "{}",
        stderr_of(&out)
    );

    // CACHEPUSH_UPSTREAM may list several upstreams with commas (or spaces): the one that
    // serves dep is asked, and so is the unreachable one.
    let mut c = cachepush();
    c.env(
        "CACHEPUSH_UPSTREAM",
        format!("http://127.0.0.1:9,{upstream}"),
    )
    .args(["copy", "--json", "--to"])
    .arg(format!("file://{}", tmp.path().join("commas").display()))
    .arg("--signing-key")
    .arg(&sk)
    .arg(&top);
    let out = run_ok(&mut c);
    assert_eq!(json(&out)["upstream"], 1, "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("127.0.0.1:9"),
        "{}",
        stderr_of(&out)
    );

    // An upstream that cannot be reached costs a warning or two, not the push, and is
    // not asked again for each path: it is marked down.
    let out = file_push("b", &["--upstream", "http://127.0.0.1:9/"]);
    assert_eq!(json(&out)["pushed"], closure.len());
    let err = stderr_of(&out);
    assert!(err.contains("upstream lookup failed"), "{err}");
    assert!(err.contains("not asked again"), "{err}");
    assert!(
        err.lines()
            .filter(|l| l.contains("warning: upstream"))
            .count()
            <= 2,
        "one warning per path: {err}"
    );

    // A local signature by a named key skips the path; without the flag it is pushed.
    let other = tmp.path().join("other.sk");
    run_ok(cachepush().arg("keygen").arg("elsewhere-1").arg(&other));
    run_ok(
        nix()
            .args(["store", "sign", "--key-file"])
            .arg(&other)
            .arg(&dep),
    );
    let j = json(&file_push("c", &["--skip-signed-by", "elsewhere-1"]));
    assert_eq!(
        (j["signed_elsewhere"].as_u64(), j["pushed"].as_u64()),
        (Some(1), Some(closure.len() as u64 - 1))
    );
    let j = json(&file_push("d", &[]));
    assert_eq!(j["pushed"], closure.len(), "{j}");
}

/// A closure of 151 paths: the plan lists the bucket as well as asking with HEADs, and
/// both together give the same answers HEADs alone give.
#[test]
fn large_plans_list_the_bucket_and_agree_with_heads() {
    let top = build_wide(&unique("wide"));
    let closure = closure_of(&top);
    assert_eq!(closure.len(), 151);
    for s3 in S3::all() {
        let tmp = tempfile::tempdir().unwrap();
        let (sk, _) = keygen(tmp.path(), "wide-1");
        for prefix in ["", "under/here"] {
            let bucket = s3.new_bucket("wide");
            let push = |extra: &[&str]| {
                json(&run_ok(
                    push_cmd(&s3, &bucket, prefix, &sk, extra).arg(&top),
                ))
            };
            // Which of the two answers which path is a race (HEADs on loopback are fast);
            // tests/faults.rs slows the HEADs down to make the listing win, and the unit
            // tests of push::presence check the meeting point. Here: the answers.
            let j = push(&[]);
            assert_eq!(j["pushed"], 151, "{}: {j}", s3.name);
            assert!(
                j["requests"]["list"].as_u64().unwrap() >= 1,
                "{}: {j}",
                s3.name
            );
            assert!(
                j["requests"]["head"].as_u64().unwrap() <= 152,
                "{}: {j}",
                s3.name
            );
            assert_consistent(&s3, &bucket, prefix);

            // Everything there: nothing sent.
            let j = push(&[]);
            assert_eq!(
                (j["pushed"].as_u64(), j["present"].as_u64()),
                (Some(0), Some(151)),
                "{}: {j}",
                s3.name
            );
            assert_eq!(j["requests"]["put"], 0, "{}: {j}", s3.name);

            // Some narinfos gone (a garbage-collected cache): exactly those are sent again,
            // whether the listing or the HEADs found them missing.
            let infos = narinfos_in(&s3, &bucket, prefix);
            let gone: Vec<&String> = infos.keys().step_by(10).collect();
            for h in &gone {
                s3.delete(&bucket, &key(prefix, &format!("{h}.narinfo")));
            }
            let j = push(&[]);
            assert_eq!(j["pushed"], gone.len(), "{}: {j}", s3.name);
            assert_eq!(narinfos_in(&s3, &bucket, prefix).len(), 151, "{}", s3.name);

            // --no-list: one HEAD per path, no listing, the same answer.
            let j = push(&["--no-list"]);
            assert_eq!(j["pushed"], 0, "{}: {j}", s3.name);
            assert_eq!(j["requests"]["list"], 0, "{}: {j}", s3.name);
            assert!(
                j["requests"]["head"].as_u64().unwrap() >= 151,
                "{}: {j}",
                s3.name
            );
            assert_consistent(&s3, &bucket, prefix);
        }
    }
}

/// The consistency check of these tests sees open uploads under its own cache only: a
/// sibling test's upload in flight in the shared SeaweedFS bucket is not a leftover of
/// this one, while an upload under its own prefix is.
#[test]
fn the_consistency_check_is_scoped_to_its_own_cache() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "s3-test-1");
    let (bucket, mine) = s3.new_public_cache("scoped");
    let (_, theirs) = s3.new_public_cache("scoped");
    run_ok(push_cmd(&s3, &bucket, &mine, &sk, &[]).arg(shared_top()));
    let open = |prefix: &str| {
        s3.block_on(
            s3.client()
                .create_multipart_upload()
                .bucket(&bucket)
                .key(format!("{prefix}/nar/in-flight.nar.zst"))
                .send(),
        )
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned()
    };
    let abort = |prefix: &str, id: &str| {
        s3.block_on(
            s3.client()
                .abort_multipart_upload()
                .bucket(&bucket)
                .key(format!("{prefix}/nar/in-flight.nar.zst"))
                .upload_id(id)
                .send(),
        )
        .unwrap();
    };
    let id = open(&theirs);
    assert_eq!(
        assert_consistent(&s3, &bucket, &mine).len(),
        closure_of(shared_top()).len()
    );
    abort(&theirs, &id);
    let id = open(&mine);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_consistent(&s3, &bucket, &mine);
    }));
    abort(&mine, &id);
    assert!(
        caught.is_err(),
        "an open upload under the cache's own prefix went unnoticed"
    );
}

/// A push never rewrites the cache's `nix-cache-info`: an operator's `Priority: 10` (or
/// anything else there) survives, on both servers and in a local directory; a new cache
/// gets cachepush's own.
#[test]
fn a_push_keeps_an_existing_nix_cache_info() {
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "s3-test-1");
    let top = shared_top();
    let mine = "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 10\n";
    for s3 in S3::all() {
        let bucket = s3.new_bucket("cacheinfo");
        s3.put(&bucket, "nix-cache-info", mine.as_bytes());
        run_ok(push_cmd(&s3, &bucket, "", &sk, &[]).arg(top));
        assert_eq!(
            String::from_utf8(s3.get(&bucket, "nix-cache-info")).unwrap(),
            mine,
            "{}",
            s3.name
        );
        let fresh = s3.new_bucket("cacheinfo");
        run_ok(push_cmd(&s3, &fresh, "", &sk, &[]).arg(top));
        let made = String::from_utf8(s3.get(&fresh, "nix-cache-info")).unwrap();
        assert!(made.contains("StoreDir: /nix/store"), "{}: {made}", s3.name);
    }
    let dir = tmp.path().join("local");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("nix-cache-info"), mine).unwrap();
    run_ok(
        cachepush()
            .args(["copy", "-q", "--to", &format!("file://{}", dir.display())])
            .arg("--signing-key")
            .arg(&sk)
            .arg(top),
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("nix-cache-info")).unwrap(),
        mine
    );
}
