//! The real Nix is the judge: what cachepush publishes, Nix substitutes with signatures
//! checked; what Nix publishes, cachepush reads byte for byte; keys work both ways.

mod common;

use std::path::Path;
use std::process::Command;

use cachepush::format::{NarInfo, PublicKey};
use common::*;

fn nix_keygen(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let sk = dir.join(format!("{name}.nix.sk"));
    let pk = dir.join(format!("{name}.nix.pk"));
    run_ok(
        Command::new("nix-store")
            .args(["--generate-binary-cache-key", name])
            .arg(&sk)
            .arg(&pk),
    );
    (sk, std::fs::read_to_string(pk).unwrap().trim().to_owned())
}

fn push(cache: &Path, sk: Option<&Path>, extra: &[&str], path: &Path) -> std::process::Output {
    let mut c = cachepush();
    c.arg("copy")
        .arg("--to")
        .arg(format!("file://{}", cache.display()));
    if let Some(sk) = sk {
        c.arg("--signing-key").arg(sk);
    }
    c.args(extra).arg(path);
    run_ok(&mut c)
}

#[test]
fn nix_substitutes_what_cachepush_published_and_checks_the_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let (sk, pk) = keygen(tmp.path(), "cachepush-test-1");
    let cache = tmp.path().join("cache");
    push(&cache, Some(&sk), &[], top);
    assert_eq!(narinfos(&cache).len(), closure_of(top).len());

    let dest = tmp.path().join("dest");
    let ok = nix_substitute(&format!("file://{}", cache.display()), &dest, top, &pk);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for p in closure_of(top) {
        let copied = dest.join(p.strip_prefix("/").unwrap());
        assert!(
            std::fs::symlink_metadata(&copied).is_ok(),
            "{copied:?} missing"
        );
    }

    // Same cache, a key Nix made: the signature must be refused.
    let (_, other_pk) = nix_keygen(tmp.path(), "other-1");
    let dest2 = tmp.path().join("dest2");
    let bad = nix_substitute(
        &format!("file://{}", cache.display()),
        &dest2,
        top,
        &other_pk,
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("lacks a valid signature"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn every_compression_is_accepted_by_nix() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let (sk, pk) = keygen(tmp.path(), "comp-1");
    for algo in ["zstd", "xz", "none"] {
        let cache = tmp.path().join(algo);
        push(&cache, Some(&sk), &["--compression", algo], top);
        let files = narinfos(&cache);
        assert_eq!(files.len(), closure_of(top).len(), "{algo}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(text.contains(&format!("Compression: {algo}\n")), "{text}");
        }
        let dest = tmp.path().join(format!("dest-{algo}"));
        let out = nix_substitute(&format!("file://{}", cache.display()), &dest, top, &pk);
        assert!(
            out.status.success(),
            "{algo}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_cache_written_by_nix_round_trips_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let (nix_sk, nix_pk) = nix_keygen(tmp.path(), "nix-made-1");
    let cache = tmp.path().join("nixcache");
    run_ok(
        nix()
            .arg("copy")
            .arg("--to")
            .arg(format!(
                "file://{}?compression=zstd&secret-key={}",
                cache.display(),
                nix_sk.display()
            ))
            .arg(top),
    );
    let pk = PublicKey::parse(&nix_pk).unwrap();
    let files = narinfos(&cache);
    assert_eq!(files.len(), closure_of(top).len());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let ni = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{f:?}: {e}"));
        assert_eq!(ni.to_string(), text, "{f:?} does not round-trip");
        assert!(
            ni.is_signed_by_any(std::slice::from_ref(&pk)),
            "{f:?}: Nix's signature does not verify"
        );
    }
}

#[test]
fn keys_work_both_ways_with_nix() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();

    // A key Nix made signs a cachepush push, and Nix accepts it.
    let (nix_sk, nix_pk) = nix_keygen(tmp.path(), "nix-made-2");
    let out = run_ok(cachepush().arg("pubkey").arg(&nix_sk));
    assert_eq!(stdout(&out), nix_pk, "cachepush pubkey of a Nix key");
    let cache = tmp.path().join("a");
    push(&cache, Some(&nix_sk), &[], top);
    let dest = tmp.path().join("dest-a");
    let res = nix_substitute(&format!("file://{}", cache.display()), &dest, top, &nix_pk);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );

    // A key cachepush made is used by `nix store sign` on an unsigned cachepush cache.
    let (our_sk, our_pk) = keygen(tmp.path(), "ours-2");
    let cache = tmp.path().join("b");
    push(&cache, None, &[], top);
    let url = format!("file://{}", cache.display());
    let dest = tmp.path().join("dest-b0");
    let unsigned = nix_substitute(&url, &dest, top, &our_pk);
    assert!(
        !unsigned.status.success(),
        "an unsigned cache must be refused"
    );
    assert!(
        stderr_of(&unsigned).contains("lacks a valid signature"),
        "refused for another reason: {}",
        stderr_of(&unsigned)
    );
    run_ok(
        nix()
            .args(["store", "sign", "--recursive", "--key-file"])
            .arg(&our_sk)
            .args(["--store", &url])
            .arg(top),
    );
    let dest = tmp.path().join("dest-b");
    let res = nix_substitute(&url, &dest, top, &our_pk);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn signatures_already_in_the_store_are_kept_beside_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let salt = format!("sigs-{}", std::process::id());
    let top = build("", &salt);
    let (store_sk, store_pk) = nix_keygen(tmp.path(), "upstream-1");
    run_ok(
        nix()
            .args(["store", "sign", "--recursive", "--key-file"])
            .arg(&store_sk)
            .arg(&top),
    );
    let (sk, pk) = keygen(tmp.path(), "ours-3");
    let cache = tmp.path().join("c");
    push(&cache, Some(&sk), &[], &top);
    assert_eq!(narinfos(&cache).len(), closure_of(&top).len());
    for f in narinfos(&cache) {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.contains("Sig: upstream-1:"), "{text}");
        assert!(text.contains("Sig: ours-3:"), "{text}");
    }
    let url = format!("file://{}", cache.display());
    for (i, key) in [store_pk, pk].iter().enumerate() {
        let dest = tmp.path().join(format!("dest-{i}"));
        let res = nix_substitute(&url, &dest, &top, key);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
}

#[test]
fn a_second_push_skips_everything_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let (sk, _) = keygen(tmp.path(), "idem-1");
    let cache = tmp.path().join("c");
    push(&cache, Some(&sk), &[], top);
    let before: Vec<(std::path::PathBuf, std::time::SystemTime)> = narinfos(&cache)
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, m)
        })
        .collect();
    let out = push(&cache, Some(&sk), &["--json"], top);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pushed"], 0);
    assert_eq!(v["skipped"], closure_of(top).len());
    assert_eq!(v["failed"], 0);
    for (p, m) in before {
        assert_eq!(
            std::fs::metadata(&p).unwrap().modified().unwrap(),
            m,
            "{p:?} rewritten"
        );
    }
}

#[test]
fn no_closure_and_stdin_select_exactly_the_paths_given() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let cache = tmp.path().join("c");
    let mut child = cachepush()
        .arg("push")
        .arg(format!("file://{}", cache.display()))
        .args(["--no-closure", "--stdin", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{}", top.display()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pushed"], 1);
    let files = narinfos(&cache);
    assert_eq!(files.len(), 1);
    let hash = &top.file_name().unwrap().to_str().unwrap()[..32];
    assert!(files[0].ends_with(format!("{hash}.narinfo")));
}

/// A cache URL's own `compression=` and `secret-key=` work as Nix's do, end to end (Nix
/// substitutes the result); a flag wins over the URL's parameter.
#[test]
fn url_parameters_compression_and_secret_key_work_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let (sk, pk) = keygen(tmp.path(), "urlparams-1");
    let (other_sk, _) = keygen(tmp.path(), "flagkey-1");
    let cache = tmp.path().join("c");
    let url = format!(
        "file://{}?compression=xz&secret-key={}",
        cache.display(),
        sk.display()
    );
    run_ok(cachepush().args(["copy", "-q", "--to", &url]).arg(top));
    for f in narinfos(&cache) {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.contains("Compression: xz\n") && text.contains("Sig: urlparams-1:"),
            "{text}"
        );
    }
    let dest = tmp.path().join("dest");
    let out = nix_substitute(&format!("file://{}", cache.display()), &dest, top, &pk);
    assert!(out.status.success(), "{}", stderr_of(&out));

    let cache2 = tmp.path().join("c2");
    let url2 = format!(
        "file://{}?compression=xz&secret-key={}",
        cache2.display(),
        sk.display()
    );
    run_ok(
        cachepush()
            .args(["copy", "-q", "--compression", "zstd", "--signing-key"])
            .arg(&other_sk)
            .args(["--to", &url2])
            .arg(top),
    );
    for f in narinfos(&cache2) {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.contains("Compression: zstd\n") && text.contains("Sig: flagkey-1:"),
            "{text}"
        );
        assert!(!text.contains("Sig: urlparams-1:"), "{text}");
    }
}

/// Two store paths with the same contents have the same NAR: it is stored once, and both
/// narinfos point at it.
#[test]
fn identical_nars_are_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let salt = unique("twins");
    let expr = format!(
        "let twin = name: derivation {{ inherit name; salt = \"{salt}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo same > $out\" ]; }}; in [ (twin \"twin-a\") (twin \"twin-b\") ]"
    );
    let out = run_ok(
        Command::new("nix-build")
            .args(["--no-out-link", "-E", &expr])
            .args(["--option", "substituters", ""]),
    );
    let paths: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    let cache = tmp.path().join("c");
    run_ok(
        cachepush()
            .args(["copy", "-q", "--to", &format!("file://{}", cache.display())])
            .args(&paths),
    );
    let urls: Vec<String> = narinfos(&cache)
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("URL: "))
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(urls.len(), 2);
    assert_eq!(urls[0], urls[1], "identical contents, two NARs");
    assert_eq!(std::fs::read_dir(cache.join("nar")).unwrap().count(), 1);
}
