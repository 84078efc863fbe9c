//! Bad input gets one clear error line, a non-zero exit, and leaves no narinfo behind.
//! Each case is paired with the same command made valid, which must succeed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;

fn error_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_owned)
        .collect()
}

/// Runs `cachepush copy` and returns its output; the cache dir is `<tmp>/cache`.
fn copy(cache: &Path, key: Option<&Path>, paths: &[&Path]) -> Output {
    let mut c = cachepush();
    c.arg("copy")
        .arg("--to")
        .arg(format!("file://{}", cache.display()));
    if let Some(k) = key {
        c.arg("--signing-key").arg(k);
    }
    c.args(paths).output().unwrap()
}

fn assert_one_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    assert_eq!(out.status.code(), Some(2), "bad input exits 2");
    let errs = error_lines(out);
    assert_eq!(errs.len(), 1, "exactly one error line: {errs:?}");
    assert!(errs[0].contains(needle), "{:?} lacks {needle:?}", errs[0]);
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    good_key: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let good_key = dir.join("good.sk");
    run_ok(cachepush().args(["keygen", "errs-1"]).arg(&good_key));
    Setup {
        _tmp: tmp,
        dir,
        good_key,
    }
}

#[test]
fn the_valid_command_works() {
    let s = setup();
    let cache = s.dir.join("cache");
    let out = copy(&cache, Some(&s.good_key), &[shared_top()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(error_lines(&out).is_empty());
    assert_eq!(narinfos(&cache).len(), 4);
}

#[test]
fn truncated_key() {
    let s = setup();
    let text = std::fs::read_to_string(&s.good_key).unwrap();
    let bad = s.dir.join("truncated.sk");
    std::fs::write(&bad, &text[..text.len() - 10]).unwrap();
    let cache = s.dir.join("cache");
    let out = copy(&cache, Some(&bad), &[shared_top()]);
    assert_one_error(&out, "truncated.sk");
    assert!(nothing_written(&cache), "{}", cache.display());
}

#[test]
fn key_with_mismatched_public_half() {
    let s = setup();
    let other = s.dir.join("other.sk");
    run_ok(cachepush().args(["keygen", "errs-1"]).arg(&other));
    let decode = |p: &Path| {
        let t = std::fs::read_to_string(p).unwrap();
        B64.decode(t.split_once(':').unwrap().1.trim()).unwrap()
    };
    let (a, b) = (decode(&s.good_key), decode(&other));
    let bad = s.dir.join("mixed.sk");
    std::fs::write(
        &bad,
        format!("errs-1:{}", B64.encode([&a[..32], &b[32..]].concat())),
    )
    .unwrap();
    let cache = s.dir.join("cache");
    let out = copy(&cache, Some(&bad), &[shared_top()]);
    assert_one_error(&out, "public half does not match");
    assert!(nothing_written(&cache), "{}", cache.display());
}

#[test]
fn path_outside_the_store() {
    let s = setup();
    let cache = s.dir.join("cache");
    let out = copy(&cache, Some(&s.good_key), &[&s.good_key]);
    assert_one_error(&out, "is not in the Nix store");
    assert!(nothing_written(&cache), "{}", cache.display());
}

#[test]
fn missing_path() {
    let s = setup();
    let cache = s.dir.join("cache");
    let missing = s.dir.join("no-such-result");
    let out = copy(&cache, Some(&s.good_key), &[&missing]);
    assert_one_error(&out, "no-such-result does not exist");

    let fake = Path::new("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-not-there");
    let out = copy(&cache, Some(&s.good_key), &[fake]);
    assert_one_error(
        &out,
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-not-there is not a valid path",
    );
    assert!(nothing_written(&cache), "{}", cache.display());
}

#[test]
fn unwritable_target() {
    let s = setup();
    // Tests run as root, so permissions alone cannot make a directory unwritable:
    // a regular file where the cache directory should be can.
    let blocker = s.dir.join("blocker");
    std::fs::write(&blocker, "x").unwrap();
    let cache = blocker.join("cache");
    let out = copy(&cache, Some(&s.good_key), &[shared_top()]);
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(3), "target failure exits 3");
    let errs = error_lines(&out);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("cache directory"), "{errs:?}");
}

#[test]
fn keygen_refuses_to_overwrite_and_writes_0600() {
    let s = setup();
    let mode = std::fs::metadata(&s.good_key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = std::fs::read(&s.good_key).unwrap();
    let out = cachepush()
        .args(["keygen", "x"])
        .arg(&s.good_key)
        .output()
        .unwrap();
    assert_one_error(&out, "cannot create");
    assert_eq!(std::fs::read(&s.good_key).unwrap(), before);
}

/// keygen on a fresh home makes the key's directory (0700); swapped arguments, a key name
/// with a colon and an empty one are refused with a message that says which; a public key
/// given as the secret key is named as such (no chmod advice); a CI secret with spaces
/// around it works.
#[test]
fn keygen_and_key_mistakes_get_true_messages() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let home_key = tmp.path().join("fresh/.config/cachepush/cache.sk");
    let o = cachepush()
        .args(["keygen", "cache.example.org-1"])
        .arg(&home_key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let dir_mode = std::fs::metadata(home_key.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let public = stdout(&o);
    assert!(public.starts_with("cache.example.org-1:"), "{public}");

    let swapped = tmp.path().join("cache.example.org-3");
    for (args, needle) in [
        (
            vec!["./swapped.sk".to_owned(), swapped.display().to_string()],
            "looks like a file path",
        ),
        (
            vec![
                "a:b".to_owned(),
                tmp.path().join("c.sk").display().to_string(),
            ],
            "contains whitespace, a control character or ':'",
        ),
        (
            vec![String::new(), tmp.path().join("d.sk").display().to_string()],
            "the key name is empty",
        ),
    ] {
        let o = cachepush().arg("keygen").args(&args).output().unwrap();
        assert_one_error(&o, needle);
        assert!(
            !stderr_of(&o).contains("key name key name"),
            "{}",
            stderr_of(&o)
        );
        assert!(!Path::new(&args[1]).exists(), "{args:?} wrote a key");
    }

    // A public key where the secret key goes.
    let pubfile = tmp.path().join("cache.pub");
    std::fs::write(&pubfile, format!("{public}\n")).unwrap();
    std::fs::set_permissions(&pubfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = cachepush().arg("pubkey").arg(&pubfile).output().unwrap();
    assert_one_error(&o, "this is a public key");
    assert!(!stderr_of(&o).contains("chmod"), "{}", stderr_of(&o));

    // A key path that is not there says where it came from.
    let missing = tmp.path().join("no-such.sk");
    let url = format!("file://{}", tmp.path().join("never").display());
    for (flag, source) in [
        (true, "(from --signing-key)"),
        (false, "(from CACHEPUSH_SIGNING_KEY_FILE)"),
    ] {
        let mut c = cachepush();
        c.args(["copy", "--to", &url]);
        if flag {
            c.arg("--signing-key").arg(&missing);
        } else {
            c.env("CACHEPUSH_SIGNING_KEY_FILE", &missing);
        }
        let o = c.arg(shared_top()).output().unwrap();
        assert_one_error(&o, source);
    }

    // The secret from a CI variable, pasted with whitespace around it.
    let secret = std::fs::read_to_string(&home_key).unwrap();
    let cache = tmp.path().join("cache");
    let o = cachepush()
        .env("CACHEPUSH_SIGNING_KEY", format!("  {}\n\n", secret.trim()))
        .args(["copy", "-q", "--to"])
        .arg(format!("file://{}", cache.display()))
        .arg(shared_top())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        std::fs::read_to_string(&narinfos(&cache)[0])
            .unwrap()
            .contains("Sig: cache.example.org-1:")
    );
}

/// Path arguments that are not what cachepush takes get a message that is true and says
/// what to pass instead: a file inside a store path, a derivation, a flake reference, and
/// `push` with the URL after the paths. Exit 2, nothing written; the twin publishes.
#[test]
fn wrong_kinds_of_path_arguments_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let result = tmp.path().join("result");
    std::os::unix::fs::symlink(top, &result).unwrap();
    let drv = stdout(&run_ok(
        std::process::Command::new("nix-store")
            .args(["-q", "--deriver"])
            .arg(top),
    ));
    let cache = tmp.path().join("cache");
    let url = format!("file://{}", cache.display());
    let top_text = top.display().to_string();
    for (args, needle) in [
        (
            vec![
                "copy".to_owned(),
                "--to".into(),
                url.clone(),
                result.join("refs").display().to_string(),
            ],
            format!("inside the store path {top_text}: pass {top_text}"),
        ),
        (
            vec!["copy".to_owned(), "--to".into(), url.clone(), drv.clone()],
            "is a derivation, not a build output".to_owned(),
        ),
        (
            vec![
                "copy".to_owned(),
                "--to".into(),
                url.clone(),
                ".#default".into(),
            ],
            "looks like a flake reference".to_owned(),
        ),
        (
            vec!["push".to_owned(), top_text.clone(), url.clone()],
            "the URL must come first".to_owned(),
        ),
    ] {
        let o = cachepush().args(&args).output().unwrap();
        assert_one_error(&o, &needle);
        assert!(!cache.exists(), "{args:?} wrote something");
    }
    run_ok(cachepush().args(["push", "-q", &url]).arg(&result));
    assert!(!narinfos(&cache).is_empty());
}

#[test]
fn changed_store_path_is_not_published() {
    // Corrupt a fresh store path behind Nix's back: its NarHash no longer matches the
    // database, so it and everything referring to it must stay unpublished.
    let s = setup();
    let salt = format!(
        "corrupt-{}-{:?}",
        std::process::id(),
        std::time::Instant::now()
    );
    let top = build("", &salt);
    let tree = closure_of(&top)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with("-tree"))
        .unwrap();
    let file = tree.join("seven");
    let dir_mode = std::fs::metadata(&tree).unwrap().permissions();
    std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&file, "SEVEN77").unwrap();

    let cache = s.dir.join("cache");
    let out = copy(&cache, Some(&s.good_key), &[&top]);

    // Put the store back as it was before asserting, so a failure leaves no damage.
    std::fs::write(&file, "seven77").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(&tree, dir_mode).unwrap();

    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NAR hash mismatch"), "{stderr}");
    assert!(stderr.contains(tree.to_str().unwrap()), "{stderr}");
    let published: Vec<String> = narinfos(&cache)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    // Only dep is independent of the corrupted tree.
    assert_eq!(published.len(), 1, "{published:?}");
    assert!(published[0].contains("-dep\n"));
    // No NAR of the corrupt path was left behind either (NARs are named by NarHash).
    let hash = stdout(&run_ok(
        std::process::Command::new("nix-store")
            .args(["-q", "--hash"])
            .arg(&tree),
    ));
    let nix32 = hash.strip_prefix("sha256:").unwrap();
    let nars: Vec<String> = std::fs::read_dir(cache.join("nar"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!nars.is_empty());
    assert!(nars.iter().all(|n| !n.starts_with(nix32)), "{nars:?}");

    // Restored, the same command publishes everything.
    let out = copy(&cache, Some(&s.good_key), &[&top]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(narinfos(&cache).len(), 4);
}

#[test]
fn a_secret_key_readable_by_others_gets_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let sk = tmp.path().join("k.sk");
    run_ok(cachepush().arg("keygen").arg("perm-1").arg(&sk));
    let top = shared_top();
    // As written by keygen (0600): no warning.
    let out = copy(&tmp.path().join("a"), Some(&sk), &[top]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("readable by others"));
    // World-readable: the push still works, with a warning that says what to run.
    std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = copy(&tmp.path().join("b"), Some(&sk), &[top]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by others (mode 644)") && err.contains("chmod 600"),
        "{err}"
    );
}

/// Bad URLs and flag values: exit 2, exactly one `error:` line naming the problem, and
/// nothing written (the cache directory is not even created). The valid twin of the same
/// command publishes.
#[test]
fn bad_urls_and_flags_exit_2_and_write_nothing() {
    let s = setup();
    let top = shared_top();
    let cache = s.dir.join("cache");
    let file_url = format!("file://{}", cache.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--to".into(), "ftp://x".into()],
            "\"ftp\" is not supported",
        ),
        (
            vec!["--to".into(), "s3://?region=x".into()],
            "names no bucket",
        ),
        (
            vec!["--to".into(), format!("{file_url}?bogus=1")],
            "unknown parameter \"bogus\"",
        ),
        // An endpoint pasted with the bucket in its path would write to another bucket.
        (
            vec![
                "--to".into(),
                "s3://nix-cache?endpoint=http://127.0.0.1:9/nix-cache&region=us-east-1".into(),
            ],
            "has a path",
        ),
        (
            vec![
                "--to".into(),
                "s3://nix-cache?endpoint=127.0.0.1:9&region=us-east-1".into(),
            ],
            "http://127.0.0.1:9",
        ),
        (
            vec![
                "--to".into(),
                file_url.clone(),
                "--compression".into(),
                "lz4".into(),
            ],
            "unknown compression \"lz4\"",
        ),
        (
            vec![
                "--to".into(),
                file_url.clone(),
                "--compression-level".into(),
                "42".into(),
            ],
            "compression level 42",
        ),
        (
            vec!["--to".into(), file_url.clone(), "-j".into(), "0".into()],
            "--jobs",
        ),
        (
            vec![
                "--to".into(),
                "s3://nix-cache?endpoint=http://127.0.0.1:9&region=us-east-1&provider=minio".into(),
            ],
            "unknown provider=minio",
        ),
        (
            vec![
                "--to".into(),
                "s3://nix-cache?endpoint=http://127.0.0.1:9&region=us-east-1&checksum=crc64".into(),
            ],
            "unknown checksum=crc64",
        ),
        (
            vec![
                "--to".into(),
                file_url.clone(),
                "--resume-within".into(),
                "soon".into(),
            ],
            "is not a duration",
        ),
        (
            vec![
                "--to".into(),
                file_url.clone(),
                "--part-size".into(),
                "4".into(),
            ],
            "--part-size",
        ),
        (
            vec![
                "--to".into(),
                file_url.clone(),
                "--upstream".into(),
                "notaurl".into(),
            ],
            "upstream cache URL \"notaurl\"",
        ),
    ];
    for (args, needle) in &cases {
        let o = cachepush()
            .arg("copy")
            .args(args)
            .arg("--signing-key")
            .arg(&s.good_key)
            .arg(top)
            .output()
            .unwrap();
        assert_one_error(&o, needle);
        assert!(!cache.exists(), "{args:?} wrote {}", cache.display());
    }
    // `push URL` with no paths.
    let o = cachepush().args(["push", &file_url]).output().unwrap();
    assert_one_error(&o, "no store paths given");
    assert!(!cache.exists());
    // The twin: the same command, valid.
    run_ok(
        cachepush()
            .args(["copy", "-q", "--to", &file_url, "--signing-key"])
            .arg(&s.good_key)
            .arg(top),
    );
    assert_eq!(narinfos(&cache).len(), closure_of(top).len());
}

/// Targets that cannot be written: exit 3 with one `error:` line saying why, and nothing
/// in the bucket. The twin, the same push with the right settings, exits 0.
#[test]
fn unreachable_or_refused_targets_exit_3() {
    use common::s3::S3;
    let top = shared_top();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "exit3-1");
    let seaweed = S3::seaweedfs();
    let ceph = S3::ceph();
    let bucket = seaweed.new_bucket("exit3");
    let run = |s3: &S3, url: String, env: &[(&str, &str)]| {
        let mut c = cachepush();
        s3.creds(&mut c);
        for (k, v) in env {
            c.env(k, v);
        }
        c.args(["copy", "--read-timeout", "2", "--to", &url, "--signing-key"])
            .arg(&sk)
            .arg(top)
            .output()
            .unwrap()
    };
    let cases: Vec<(&str, Output, &str)> = vec![
        (
            "connection refused",
            run(
                &seaweed,
                format!("s3://{bucket}?endpoint=http://127.0.0.1:9&region=us-east-1"),
                &[],
            ),
            "cannot reach the endpoint",
        ),
        (
            "wrong secret",
            run(
                &seaweed,
                seaweed.url(&bucket, ""),
                &[("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")],
            ),
            "SignatureDoesNotMatch",
        ),
        (
            "wrong secret (Ceph)",
            run(
                &ceph,
                ceph.url(&unique("wrong-secret"), ""),
                &[("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")],
            ),
            "AWS_SECRET_ACCESS_KEY",
        ),
        (
            "unknown access key",
            run(
                &seaweed,
                seaweed.url(&bucket, ""),
                &[("AWS_ACCESS_KEY_ID", "NOSUCHKEY0000000")],
            ),
            "does not know the access key ID",
        ),
        (
            "unknown access key (Ceph)",
            run(
                &ceph,
                ceph.url(&unique("unknown-key"), ""),
                &[("AWS_ACCESS_KEY_ID", "NOSUCHKEY0000000")],
            ),
            "InvalidAccessKeyId",
        ),
        (
            "no credentials at all",
            run(
                &seaweed,
                seaweed.url(&bucket, ""),
                &[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")],
            ),
            "no AWS credentials were found",
        ),
        (
            // SeaweedFS creates buckets on first write; Ceph says NoSuchBucket.
            "no such bucket",
            run(&ceph, ceph.url(&unique("no-such-bucket"), ""), &[]),
            "NoSuchBucket",
        ),
    ];
    for (what, o, needle) in &cases {
        assert_eq!(o.status.code(), Some(3), "{what}: {}", stderr_of(o));
        let errs = error_lines(o);
        assert_eq!(errs.len(), 1, "{what}: {errs:?}");
        assert!(errs[0].contains(needle), "{what}: {errs:?}");
    }
    assert!(
        seaweed.keys(&bucket, "").is_empty(),
        "something was written"
    );
    let ok = run(&seaweed, seaweed.url(&bucket, ""), &[]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr_of(&ok));
    assert!(!seaweed.keys(&bucket, "").is_empty());
}

/// Bad input writes nothing at all: no narinfo, and not even the cache directory (a
/// check for "no narinfo" alone would pass a write that went elsewhere).
fn nothing_written(cache: &Path) -> bool {
    !cache.exists()
}

/// `verify` of a cache it cannot reach, and a gateway that cannot bind its address, exit
/// 3 with one error line naming the cause; their twins (a reachable cache, a free
/// address) work.
#[test]
fn unreachable_caches_and_taken_addresses_exit_3() {
    use common::s3::S3;
    let s3 = S3::seaweedfs();
    let bucket = s3.new_bucket("exit3v");
    let mut c = cachepush();
    s3.creds(&mut c);
    let o = c
        .args(["verify", "--read-timeout", "1"])
        .arg(format!(
            "s3://{bucket}?endpoint=http://127.0.0.1:9&region=us-east-1"
        ))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    let errs = error_lines(&o);
    assert!(
        errs.len() == 1 && errs[0].contains("cannot reach"),
        "{errs:?}"
    );
    let mut c = cachepush();
    s3.creds(&mut c);
    run_ok(
        c.args(["copy", "-q", "--to", &s3.url(&bucket, "")])
            .arg(shared_top()),
    );
    let mut c = cachepush();
    s3.creds(&mut c);
    run_ok(c.arg("verify").arg(s3.url(&bucket, "")));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut c = cachepush();
    s3.creds(&mut c);
    let o = c
        .args(["gateway", "--from", &s3.url(&bucket, ""), "--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    let errs = error_lines(&o);
    assert!(
        errs.len() == 1 && errs[0].contains(&format!("cannot listen on {addr}")),
        "{errs:?}"
    );
}

/// A key that may read but not write: the push names the refused write and the permission
/// it needs, exits 3 (its first write, the push record gc relies on, is refused before any
/// path is sent), and writes nothing; on both servers. The twin, the writing key, publishes.
#[test]
fn a_read_only_key_is_told_it_may_not_write() {
    use common::s3::S3;
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "readonly-1");
    for s3 in S3::all() {
        let bucket = s3.new_bucket("readonly");
        // The cache exists (made by the writing key), so the reader's HEADs and its read
        // of nix-cache-info work; only its writes are refused.
        run_ok(copy_cmd(&s3.url(&bucket, ""), Some(&s3), Some(&sk), &["-q"]).arg(shared_top()));
        s3.grant_reader(&bucket);
        let before = s3.keys(&bucket, "");
        let path = build("dep", &unique("readonly"));
        let mut c = copy_cmd(&s3.url(&bucket, ""), None, Some(&sk), &[]);
        s3.reader_creds(&mut c);
        let o = c.arg(&path).output().unwrap();
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(3), "{}: {err}", s3.name);
        assert!(
            err.contains("access denied") && err.contains("may not write"),
            "{}: {err}",
            s3.name
        );
        assert_eq!(
            s3.keys(&bucket, ""),
            before,
            "{}: something was written",
            s3.name
        );
        let ok = copy_cmd(&s3.url(&bucket, ""), Some(&s3), Some(&sk), &["-q"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(ok.status.code(), Some(0), "{}: {}", s3.name, stderr_of(&ok));
    }
}

/// `--profile` (or `profile=` in the URL) is the credentials to use, as with the AWS CLI:
/// wrong `AWS_*` keys in the environment do not override it. A misspelled profile names
/// the profile and the files looked in, exit 2, nothing written.
#[test]
fn a_named_profile_wins_over_the_environment_and_a_misspelled_one_is_named() {
    use common::s3::S3;
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    let config = tmp.path().join("config");
    std::fs::write(
        &creds,
        format!(
            "[nix-cache]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            std::env::var("CACHEPUSH_TEST_ACCESS_KEY").unwrap(),
            s3.secret_key
        ),
    )
    .unwrap();
    std::fs::write(&config, "[profile nix-cache]\nregion = us-east-1\n").unwrap();
    let bucket = s3.new_bucket("profile");
    let run = |profile: &str, in_url: bool| {
        let url = if in_url {
            format!("{}&profile={profile}", s3.url(&bucket, ""))
        } else {
            s3.url(&bucket, "")
        };
        let mut c = copy_cmd(&url, Some(&s3), None, &["-q"]);
        c.env("AWS_ACCESS_KEY_ID", "AKIDWRONGWRONGWRONG")
            .env("AWS_SECRET_ACCESS_KEY", "wrong-secret")
            .env("AWS_SHARED_CREDENTIALS_FILE", &creds)
            .env("AWS_CONFIG_FILE", &config);
        if !in_url {
            c.args(["--profile", profile]);
        }
        c.arg(shared_top()).output().unwrap()
    };
    let o = run("nix-cahce", false);
    assert_one_error(&o, "AWS profile \"nix-cahce\"");
    assert!(
        stderr_of(&o).contains(creds.to_str().unwrap()),
        "{}",
        stderr_of(&o)
    );
    assert!(s3.keys(&bucket, "").is_empty());
    for in_url in [false, true] {
        let o = run("nix-cache", in_url);
        assert!(o.status.success(), "in URL {in_url}: {}", stderr_of(&o));
    }
    assert!(!s3.keys(&bucket, "").is_empty());
}

/// A gateway that would let in more pushers than its flags seem to say, and a push to a
/// gateway with no token, are refused with one line naming what to add; the well-formed
/// gateway command starts (tests/gateway_push.rs pushes through it).
#[test]
fn push_gateway_misconfigurations_exit_2_with_one_line() {
    let s = setup();
    let sk = s.good_key.to_str().unwrap().to_owned();
    let from = "s3://nix-cache?endpoint=http://127.0.0.1:9&region=us-east-1".to_owned();
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = vec!["gateway".into(), "--from".into(), from.clone()];
        v.extend(["--listen".into(), "127.0.0.1:0".into()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let issuer = "https://token.actions.githubusercontent.com";
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            base(&["--push-oidc-issuer", issuer]),
            "--push-oidc-issuer needs --signing-key",
        ),
        (
            base(&["--signing-key", &sk, "--push-oidc-issuer", issuer]),
            "--push-oidc-audience",
        ),
        (
            base(&[
                "--signing-key",
                &sk,
                "--push-oidc-issuer",
                issuer,
                "--push-oidc-audience",
                "cachepush",
            ]),
            "at least one --push-claim",
        ),
        (
            base(&[
                "--signing-key",
                &sk,
                "--push-oidc-issuer",
                "http://ci.example.com",
                "--push-oidc-audience",
                "cachepush",
                "--push-claim",
                "repository=acme/*",
            ]),
            "must be https://",
        ),
        (
            base(&[
                "--signing-key",
                &sk,
                "--push-oidc-issuer",
                issuer,
                "--push-oidc-audience",
                "cachepush",
                "--push-claim",
                "repository",
            ]),
            "is not NAME=GLOB",
        ),
        (
            base(&[
                "--signing-key",
                &sk,
                "--push-oidc-issuer",
                issuer,
                "--push-oidc-audience",
                "cachepush",
                "--push-claim",
                "repository=acme/*",
                "--push-quarantine-prefix",
                "quarantine",
            ]),
            "--push-quarantine-claim",
        ),
    ];
    for (args, needle) in cases {
        let out = cachepush().args(&args).output().unwrap();
        assert_one_error(&out, needle);
    }
    // A push to a gateway with no token anywhere.
    let out = cachepush()
        .args(["copy", "--to", "https://cache.example.org"])
        .arg(shared_top())
        .output()
        .unwrap();
    assert_one_error(&out, "needs a token");
    // A gateway URL where a cache is needed.
    let out = cachepush()
        .args(["verify", "https://cache.example.org"])
        .output()
        .unwrap();
    assert_one_error(&out, "is a gateway");
}
