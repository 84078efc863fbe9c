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
