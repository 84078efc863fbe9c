//! The other artifacts Nix writes to a binary cache, compared with what the real Nix
//! writes for the same paths: NAR listings (`<hash>.ls`, `write-nar-listing`).

mod common;

use std::path::Path;

use common::s3::S3;
use common::*;

fn listings(dir: &Path) -> Vec<(String, serde_json::Value)> {
    let mut out: Vec<(String, serde_json::Value)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ls"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let v = serde_json::from_slice(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `--write-nar-listing` (and `write-nar-listing=true` in the URL) writes, for every path,
/// the listing the real Nix writes with `nix copy --to 'file://...?write-nar-listing=true'`:
/// JSON-equal, for a closure with every kind of entry (executables, symlinks, empty files
/// and directories, names in many scripts).
#[test]
fn nar_listings_equal_the_real_nix() {
    let top = shared_top();
    let tmp = tempfile::tempdir().unwrap();
    let by_nix = tmp.path().join("nix");
    run_ok(
        nix()
            .args(["copy", "--to"])
            .arg(format!(
                "file://{}?write-nar-listing=true&compression=none",
                by_nix.display()
            ))
            .arg(top),
    );
    let want = listings(&by_nix);
    assert_eq!(want.len(), closure_of(top).len(), "{want:?}");
    for (how, url_extra, flag) in [
        ("flag", "", Some("--write-nar-listing")),
        ("url", "?write-nar-listing=true", None),
    ] {
        let ours = tmp.path().join(how);
        let url = format!("file://{}{url_extra}", ours.display());
        let mut c = copy_cmd(&url, None, None, &["-q"]);
        if let Some(f) = flag {
            c.arg(f);
        }
        run_ok(c.arg(top));
        let got = listings(&ours);
        assert_eq!(got, want, "{how}");
    }
    // Without the setting, none (the twin: the listing is not written by accident).
    let plain = tmp.path().join("plain");
    run_ok(copy_cmd(&format!("file://{}", plain.display()), None, None, &["-q"]).arg(top));
    assert!(listings(&plain).is_empty());
}

/// In a bucket the listing is `application/json`, as Nix labels it, and the gateway
/// serves it.
#[test]
fn nar_listings_in_a_bucket_are_labelled_and_served() {
    let s3 = S3::seaweedfs();
    let bucket = s3.new_bucket("listing");
    let top = shared_top();
    run_ok(
        copy_cmd(
            &s3.url(&bucket, ""),
            Some(&s3),
            None,
            &["-q", "--write-nar-listing"],
        )
        .arg(top),
    );
    let hash = &top.file_name().unwrap().to_str().unwrap()[..32];
    let key = format!("{hash}.ls");
    let (ct, _, _) = s3.head(&bucket, &key).expect("no listing in the bucket");
    assert_eq!(ct, "application/json");
    let gw = common::http::Gateway::start(gateway_from(
        &s3.url(&bucket, ""),
        Some(&s3),
        &["--nar-delivery", "proxy"],
    ));
    let r = common::http::get(gw.addr, &format!("/{key}"));
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["root"]["type"], "directory");
}

/// A derivation that writes to its build log, built with a fresh salt.
fn logged_build(tmp: &Path, salt: &str) -> (String, String) {
    let expr = tmp.join("logged.nix");
    std::fs::write(
        &expr,
        r#"{ salt }: derivation {
  name = "logged";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  inherit salt;
  args = [ "-c" "echo building with salt $salt; echo 'a line on stderr' >&2; printf 'ünïcödé ✓\n'; echo $salt > $out" ];
}"#,
    )
    .unwrap();
    require("nix-build");
    let out = run_ok(
        std::process::Command::new("nix-build")
            .arg(&expr)
            .args(["--no-out-link", "--argstr", "salt", salt])
            .args(["--option", "substituters", ""]),
    );
    let path = stdout(&out);
    let drv = stdout(&run_ok(std::process::Command::new("nix-store").args([
        "-q",
        "--deriver",
        &path,
    ])));
    (path, drv)
}

/// `--logs` uploads `log/<drv>` byte for byte as `nix store copy-log --to` writes it, and
/// the real `nix log` reads it back through the gateway (from a store that has no log).
#[test]
fn build_logs_equal_nix_store_copy_log_and_nix_log_reads_them_through_the_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, drv) = logged_build(tmp.path(), &unique("logs"));
    let drv_name = Path::new(&drv)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let by_nix = tmp.path().join("nix");
    run_ok(
        nix()
            .args(["store", "copy-log", "--to"])
            .arg(format!("file://{}", by_nix.display()))
            .arg(&drv),
    );
    let want = std::fs::read(by_nix.join("log").join(&drv_name)).unwrap();
    assert!(
        String::from_utf8_lossy(&want).contains("building with salt"),
        "{}",
        String::from_utf8_lossy(&want)
    );

    let ours = tmp.path().join("ours");
    let url = format!("file://{}", ours.display());
    let o = run_ok(copy_cmd(&url, None, None, &["--logs", "--json"]).arg(&path));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["logs"], 1, "{v}");
    let got = std::fs::read(ours.join("log").join(&drv_name)).unwrap();
    assert_eq!(got, want);
    // Without --logs, none (the twin).
    let plain = tmp.path().join("plain");
    run_ok(copy_cmd(&format!("file://{}", plain.display()), None, None, &["-q"]).arg(&path));
    assert!(!plain.join("log").join(&drv_name).exists());

    // `nix log` with the local log gone (this test's own derivation; Nix keeps logs under
    // its log directory as drvs/<2 chars>/<rest>[.bz2]) finds it through the gateway.
    let gw = common::http::Gateway::start(gateway_from(&url, None, &[]));
    let r = common::http::get(gw.addr, &format!("/log/{drv_name}"));
    assert_eq!((r.status, r.body.clone()), (200, want.clone()));
    let log_dir = std::env::var("NIX_LOG_DIR").unwrap_or_else(|_| "/nix/var/log/nix".into());
    let local = Path::new(&log_dir)
        .join("drvs")
        .join(&drv_name[..2])
        .join(&drv_name[2..]);
    let mut removed = 0;
    for p in [local.clone(), local.with_extension("drv.bz2")] {
        if std::fs::remove_file(&p).is_ok() {
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "no local log at {}", local.display());
    let o = nix()
        .args(["log", "--option", "substituters", &gw.url()])
        .arg(&drv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", stderr_of(&o), gw.log_text());
    assert_eq!(o.stdout, want);
    assert_eq!(
        gw.log_text()
            .matches(&format!("GET /log/{drv_name} 200"))
            .count(),
        2,
        "nix log did not ask the gateway: {}",
        gw.log_text()
    );
}

/// `--priority` and `--want-mass-query` (or `priority=` / `want-mass-query=` in the URL, as
/// Nix spells them) set nix-cache-info on a new cache, and update an existing one only
/// when it says otherwise, with a warning naming the change.
#[test]
fn cache_info_settings_are_written_and_updated_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let url = format!("file://{}", dir.display());
    let top = shared_top();
    let info = || std::fs::read_to_string(dir.join("nix-cache-info")).unwrap();
    let push = |url: &str, extra: &[&str]| {
        let o = copy_cmd(url, None, None, extra).arg(top).output().unwrap();
        assert!(o.status.success(), "{}", stderr_of(&o));
        stderr_of(&o)
    };
    push(&url, &["--priority", "30"]);
    assert!(info().contains("Priority: 30\n"), "{}", info());
    assert!(info().contains("WantMassQuery: 1\n"), "{}", info());
    // The same settings, or none: nothing changes, nothing said.
    for extra in [&["--priority", "30"][..], &[][..]] {
        let said = push(&url, extra);
        assert!(!said.contains("nix-cache-info updated"), "{said}");
        assert!(info().contains("Priority: 30\n"), "{}", info());
    }
    let said = push(&url, &["--want-mass-query", "false"]);
    assert!(said.contains("WantMassQuery 1 -> 0"), "{said}");
    assert!(info().contains("WantMassQuery: 0\n") && info().contains("Priority: 30\n"));
    let said = push(&format!("{url}?priority=50"), &[]);
    assert!(said.contains("Priority 30 -> 50"), "{said}");
    assert!(info().contains("Priority: 50\n"), "{}", info());
    let o = copy_cmd(&format!("{url}?priority=high"), None, None, &[])
        .arg(top)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("priority=high"), "{}", stderr_of(&o));
    assert!(info().contains("Priority: 50\n"));
}
