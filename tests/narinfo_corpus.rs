//! Narinfos written by other tools: parsed, rendered back and verified as Nix would
//! (`tests/fixtures/narinfo/README.md` says where each comes from); CA narinfos as the real
//! Nix writes them; and a bucket whose narinfos carry fields cachepush does not know,
//! verified, countersigned by the gateway with those fields kept, and substituted by the
//! real Nix.

mod common;

use std::path::Path;
use std::process::Command;

use cachepush::format::{NarInfo, PublicKey};
use common::http::{Gateway, get};
use common::s3::S3;
use common::*;

const CACHE_NIXOS_ORG: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

fn corpus() -> Vec<(String, String)> {
    let dir = fixture("narinfo");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 6, "the corpus is gone: {out:?}");
    out
}

#[test]
fn other_tools_narinfos_parse_round_trip_and_verify() {
    let key = PublicKey::parse(CACHE_NIXOS_ORG).unwrap();
    let other = PublicKey::parse("other-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=").unwrap();
    for (name, text) in corpus() {
        let ni = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Rendered and parsed again: the same narinfo, unknown fields included.
        let again = NarInfo::parse(&ni.to_string()).unwrap();
        assert_eq!(again, ni, "{name}");
        // cache.nixos.org's signature covers every one of them (and no other key does).
        assert!(ni.is_signed_by_any(std::slice::from_ref(&key)), "{name}");
        assert!(!ni.is_signed_by_any(std::slice::from_ref(&other)), "{name}");
        if name == "cache-nixos-org-ca-source.narinfo" {
            assert!(ni.references.is_empty() && ni.deriver.is_none(), "{name}");
            assert_eq!(
                ni.ca.as_deref(),
                Some("fixed:r:sha256:0555pg9zcr3aazyxqb6g6q8vq3lc5zz3rnqx8ga1i3bs2q04yb4q")
            );
            continue;
        }
        assert_eq!(
            ni.store_path.to_string(),
            "xcp9cav49dmsjbwdjlmkjxj10gkpx553-hello-2.10",
            "{name}"
        );
        assert_eq!(
            ni.fingerprint(),
            "1;/nix/store/xcp9cav49dmsjbwdjlmkjxj10gkpx553-hello-2.10;sha256:16mvl7v0ylzcg2n3xzjn41qhzbmgcn5iyarx16nn5l2r36n2kqci;206104;/nix/store/563528481rvhc5kxwipjmg6rqrl95mdx-glibc-2.33-56,/nix/store/xcp9cav49dmsjbwdjlmkjxj10gkpx553-hello-2.10",
            "{name}"
        );
    }
    let by_name = |n: &str| corpus().into_iter().find(|(f, _)| f == n).unwrap().1;
    // Nix's own output renders back byte for byte.
    let real = by_name("cache-nixos-org-hello.narinfo");
    assert_eq!(NarInfo::parse(&real).unwrap().to_string(), real);
    // Unknown fields stay, in order, after the known ones.
    let prov = NarInfo::parse(&by_name("provenance.narinfo")).unwrap();
    let text = prov.to_string();
    let p = text.find("\nProvenance: {").expect("Provenance kept");
    let x = text
        .find("\nX-Attic-Chunked: 1")
        .expect("vendor field kept");
    assert!(text.find("\nSig: ").unwrap() < p && p < x, "{text}");
    assert_eq!(
        NarInfo::parse(&by_name("unknown-deriver.narinfo"))
            .unwrap()
            .deriver,
        None
    );
    // A tampered one is told apart: the corpus test is not vacuous.
    let bad = real.replace("NarSize: 206104", "NarSize: 206105");
    assert!(!NarInfo::parse(&bad).unwrap().is_signed_by_any(&[key]));
}

/// `nix-store --add` makes a content-addressed path; `nix copy --to file://` writes its
/// narinfo with a `CA:` line. cachepush reads it, renders it back byte for byte, and its
/// own push of the same path carries the same CA.
#[test]
fn ca_narinfos_written_by_nix_round_trip_and_cachepush_writes_the_same_ca() {
    require("nix-store");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("ca-source.txt");
    std::fs::write(&file, format!("content addressed {}\n", unique("ca"))).unwrap();
    let out = run_ok(Command::new("nix-store").arg("--add").arg(&file));
    let path = stdout(&out);
    let nix_dir = tmp.path().join("by-nix");
    run_ok(
        nix()
            .args(["copy", "--to"])
            .arg(format!("file://{}?compression=none", nix_dir.display()))
            .arg(&path),
    );
    let narinfos = narinfos(&nix_dir);
    assert_eq!(narinfos.len(), 1, "{narinfos:?}");
    let text = std::fs::read_to_string(&narinfos[0]).unwrap();
    let ni = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let ca = ni
        .ca
        .clone()
        .unwrap_or_else(|| panic!("no CA line:\n{text}"));
    assert!(ca.starts_with("fixed:r:sha256:"), "{ca}");
    assert_eq!(ni.to_string(), text, "not rendered back byte for byte");

    let ours = tmp.path().join("by-cachepush");
    let (sk, pk) = keygen(tmp.path(), "ca-test-1");
    run_ok(
        copy_cmd(
            &format!("file://{}", ours.display()),
            None,
            Some(&sk),
            &["-q"],
        )
        .arg(&path),
    );
    let mine =
        NarInfo::parse(&std::fs::read_to_string(&common::narinfos(&ours)[0]).unwrap()).unwrap();
    assert_eq!(mine.ca.as_deref(), Some(ca.as_str()));
    assert_eq!((mine.nar_hash, mine.nar_size), (ni.nar_hash, ni.nar_size));
    // And the real Nix substitutes the CA path from cachepush's cache.
    let o = nix_substitute(
        &format!("file://{}", ours.display()),
        &tmp.path().join("dest"),
        Path::new(&path),
        &pk,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
}

/// A bucket whose narinfos carry `Provenance:` and a vendor field (as Determinate Nix and
/// other tools write them): `verify` is clean, a signing gateway serves them with the
/// fields kept and its signature added, and the real Nix substitutes through it trusting
/// only the gateway's key.
#[test]
fn a_bucket_with_unknown_narinfo_fields_is_verified_countersigned_and_substituted() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (ci_sk, ci_pk) = keygen(tmp.path(), "ci-1");
    let (gsk, gpk) = keygen(tmp.path(), "gateway-1");
    let top = build("", "unknown-fields");
    let bucket = s3.new_bucket("foreign");
    run_ok(copy_cmd(&s3.url(&bucket, ""), Some(&s3), Some(&ci_sk), &["-q"]).arg(&top));
    let keys: Vec<String> = s3
        .keys(&bucket, "")
        .into_iter()
        .filter(|k| k.ends_with(".narinfo"))
        .collect();
    assert!(keys.len() >= 4, "{keys:?}");
    for k in &keys {
        let text = String::from_utf8(s3.get(&bucket, k)).unwrap();
        let more = format!(
            "{text}Provenance: {{\"type\":\"build\",\"flake\":\"github:example/x\"}}\nX-Vendor-Field: kept\n"
        );
        s3.put(&bucket, k, more.as_bytes());
    }
    let o = command("verify", Some(&s3))
        .args(["--full", "--trusted-key", &ci_pk])
        .arg(s3.url(&bucket, ""))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr_of(&o));

    let gw = Gateway::start(gateway_from(
        &s3.url(&bucket, ""),
        Some(&s3),
        &[
            "--signing-key",
            gsk.to_str().unwrap(),
            "--require-signature-by",
            &ci_pk,
        ],
    ));
    let hash = &top.file_name().unwrap().to_str().unwrap()[..32];
    let served = get(gw.addr, &format!("/{hash}.narinfo"));
    assert_eq!(served.status, 200, "{}", gw.log_text());
    let text = served.text();
    let ni = NarInfo::parse(&text).unwrap();
    assert!(text.contains("\nProvenance: {\"type\":\"build\""), "{text}");
    assert!(text.contains("\nX-Vendor-Field: kept\n"), "{text}");
    let g = PublicKey::parse(&gpk).unwrap();
    let c = PublicKey::parse(&ci_pk).unwrap();
    assert!(
        ni.is_signed_by_any(&[g]) && ni.is_signed_by_any(&[c]),
        "{text}"
    );
    let o = nix_via(&gw.url(), &tmp.path().join("dest"), &top, &gpk, None);
    assert!(o.status.success(), "{}\n{}", stderr_of(&o), gw.log_text());
}
