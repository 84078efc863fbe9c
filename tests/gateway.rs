//! `cachepush gateway` in front of private buckets on SeaweedFS and Ceph RGW, judged by the
//! real Nix substituting through it and by raw HTTP requests.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::http::{Forwarder, Gateway, get, request};
use common::s3::S3;
use common::*;

/// Pushes `path`'s closure to `bucket`, signed with `sk` when given.
fn push(s3: &S3, bucket: &str, sk: Option<&Path>, path: &Path) {
    run_ok(copy_cmd(&s3.url(bucket, ""), Some(s3), sk, &["-q"]).arg(path));
}

fn gateway_cmd(s3: &S3, bucket: &str, extra: &[&str]) -> Command {
    gateway_from(&s3.url(bucket, ""), Some(s3), extra)
}

fn gateway(s3: &S3, bucket: &str, extra: &[&str]) -> Gateway {
    Gateway::start(gateway_cmd(s3, bucket, extra))
}

/// top's narinfo in `bucket` with its NarHash swapped for dep's: a consistent-looking
/// narinfo that top's signature no longer covers. Returns (key, tampered text).
fn tampered_narinfo(s3: &S3, bucket: &str, top: &Path, dep: &Path) -> (String, String) {
    let key = format!("{}.narinfo", hash_of(top));
    let text = String::from_utf8(s3.get(bucket, &key)).unwrap();
    let dep_text = String::from_utf8(s3.get(bucket, &format!("{}.narinfo", hash_of(dep)))).unwrap();
    let line = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("NarHash: "))
            .unwrap()
            .to_owned()
    };
    let tampered = text.replace(&line(&text), &line(&dep_text));
    assert_ne!(tampered, text);
    (key, tampered)
}

#[test]
fn nix_substitutes_from_a_private_bucket_through_the_gateway_with_netrc() {
    let top = shared_top();
    for s3 in S3::all() {
        let tmp = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(tmp.path(), "gw-test-1");
        let (_, other_pk) = keygen(tmp.path(), "other-1");
        let bucket = s3.new_bucket("gw");
        push(&s3, &bucket, Some(&sk), top);
        // The bucket is private: no anonymous reads on the S3 endpoint itself.
        let anon = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{}/{bucket}/nix-cache-info", s3.endpoint))
            .output()
            .unwrap();
        assert_eq!(
            stdout(&anon),
            "403",
            "{}: the bucket is readable anonymously",
            s3.name
        );

        let pw = htpasswd(tmp.path(), "alice", "correct-horse-battery");
        let good = netrc(tmp.path(), "good", "alice", "correct-horse-battery");
        let bad = netrc(tmp.path(), "bad", "alice", "wrong-horse-battery");
        for mode in ["redirect", "proxy"] {
            let gw = gateway(
                &s3,
                &bucket,
                &["--nar-delivery", mode, "--htpasswd", pw.to_str().unwrap()],
            );
            let url = gw.url();
            let d = |n: &str| tmp.path().join(format!("{mode}-{n}"));

            let r = get(gw.addr, "/nix-cache-info");
            assert_eq!(r.status, 401);
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Basic realm=")),
                "{r:?}"
            );
            let none = nix_via(&url, &d("none"), top, &pk, None);
            assert!(!none.status.success(), "{}/{mode}: no credentials", s3.name);
            // Nix's word for a nix-cache-info it may not read.
            assert!(
                stderr_of(&none).contains("does not appear to be a binary cache"),
                "{}/{mode}: no credentials: {}",
                s3.name,
                stderr_of(&none)
            );
            let wrong = nix_via(&url, &d("wrong"), top, &pk, Some(&bad));
            assert!(
                !wrong.status.success(),
                "{}/{mode}: wrong password",
                s3.name
            );
            assert!(
                stderr_of(&wrong).contains("does not appear to be a binary cache"),
                "{}/{mode}: wrong password: {}",
                s3.name,
                stderr_of(&wrong)
            );
            let untrusted = nix_via(&url, &d("untrusted"), top, &other_pk, Some(&good));
            assert!(
                !untrusted.status.success(),
                "{}/{mode}: untrusted key",
                s3.name
            );
            assert!(
                stderr_of(&untrusted).contains("lacks a valid signature"),
                "{}/{mode}: untrusted key refused for another reason: {}",
                s3.name,
                stderr_of(&untrusted)
            );

            let ok = nix_via(&url, &d("ok"), top, &pk, Some(&good));
            assert!(
                ok.status.success(),
                "{}/{mode}: {}\n{}",
                s3.name,
                stderr_of(&ok),
                gw.log_text()
            );
            for p in closure_of(top) {
                assert!(d("ok").join(p.strip_prefix("/").unwrap()).exists());
            }
            let log = gw.log_text();
            let nar_status = if mode == "redirect" { " 307 " } else { " 200 " };
            assert!(
                log.lines()
                    .any(|l| l.contains("GET /nar/") && l.contains(nar_status)),
                "{}/{mode}: {log}",
                s3.name
            );
            assert!(
                !log.contains("X-Amz-Signature"),
                "presigned URL in the log: {log}"
            );
        }
    }
}

#[test]
fn a_narinfo_tampered_in_the_bucket_is_refused_by_nix() {
    let top = build("", "gw-tamper");
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "gw-test-1");
    let bucket = s3.new_bucket("tamper");
    push(&s3, &bucket, Some(&sk), &top);
    let dep = build("dep", "gw-tamper");
    let (key, tampered) = tampered_narinfo(&s3, &bucket, &top, &dep);

    let gw = gateway(&s3, &bucket, &[]);
    let ok = nix_via(&gw.url(), &tmp.path().join("before"), &top, &pk, None);
    assert!(ok.status.success(), "{}", stderr_of(&ok));
    s3.put(&bucket, &key, tampered.as_bytes());
    let gw = gateway(&s3, &bucket, &[]);
    let refused = nix_via(&gw.url(), &tmp.path().join("after"), &top, &pk, None);
    assert!(!refused.status.success(), "Nix accepted a tampered narinfo");
    assert!(
        stderr_of(&refused).contains("signature"),
        "{}",
        stderr_of(&refused)
    );
}

/// Security review H2: bucket write access must not become the power to have the
/// gateway's key vouch for anything. The gateway countersigns only narinfos carrying a
/// valid signature by a `--require-signature-by` key; everything else reaches Nix without
/// the gateway's signature and is refused, while the untouched path is accepted.
#[test]
fn a_signing_gateway_countersigns_only_what_a_required_key_signed() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (ci_sk, ci_pk) = keygen(tmp.path(), "ci-1");
    let (gsk, gpk) = keygen(tmp.path(), "gateway-1");
    let gsk = gsk.to_str().unwrap();
    let top = build("", "gw-countersign");
    let dep = build("dep", "gw-countersign");
    let planted = build("", "gw-countersign-planted");
    let bucket = s3.new_bucket("countersign");
    push(&s3, &bucket, Some(&ci_sk), &top);
    // A writer without the CI key adds an unsigned path.
    push(&s3, &bucket, None, &planted);

    // A signing key alone is refused: the operator must choose a policy.
    let o = gateway_cmd(&s3, &bucket, &["--signing-key", gsk])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("--require-signature-by")
            && stderr_of(&o).contains("--sign-unverified"),
        "{}",
        stderr_of(&o)
    );

    let policy = ["--signing-key", gsk, "--require-signature-by", &ci_pk];
    let gw = gateway(&s3, &bucket, &policy);
    let ok = nix_via(&gw.url(), &tmp.path().join("ok"), &top, &gpk, None);
    assert!(ok.status.success(), "{}\n{}", stderr_of(&ok), gw.log_text());
    let r = get(gw.addr, &format!("/{}.narinfo", hash_of(&planted)));
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("Sig: gateway-1:"), "{}", r.text());
    let refused = nix_via(&gw.url(), &tmp.path().join("planted"), &planted, &gpk, None);
    assert!(
        !refused.status.success(),
        "Nix accepted an unsigned planted path"
    );
    assert!(
        gw.log_text()
            .contains("no valid signature by a --require-signature-by key"),
        "{}",
        gw.log_text()
    );
    assert!(gw.metric("cachepush_gateway_unvouched_narinfos_total", "") >= 1);

    // Tampered after CI signed it: the CI signature no longer verifies, so no countersign.
    let key = format!("{}.narinfo", hash_of(&top));
    let text = String::from_utf8(s3.get(&bucket, &key)).unwrap();
    let (_, tampered) = tampered_narinfo(&s3, &bucket, &top, &dep);
    s3.put(&bucket, &key, tampered.as_bytes());
    // A narinfo copied under another path's name is never served.
    let alias = format!("{}.narinfo", "1".repeat(32));
    s3.put(&bucket, &alias, text.as_bytes());
    let gw = gateway(&s3, &bucket, &policy);
    let refused = nix_via(&gw.url(), &tmp.path().join("tampered"), &top, &gpk, None);
    assert!(!refused.status.success(), "Nix accepted a tampered narinfo");
    assert!(
        stderr_of(&refused).contains("signature"),
        "{}",
        stderr_of(&refused)
    );
    assert_eq!(get(gw.addr, &format!("/{alias}")).status, 502);

    // The explicit opt-in signs whatever is there: the planted path is accepted.
    let gw = gateway(&s3, &bucket, &["--signing-key", gsk, "--sign-unverified"]);
    assert!(
        gw.log_text().contains("--sign-unverified"),
        "{}",
        gw.log_text()
    );
    let blessed = nix_via(&gw.url(), &tmp.path().join("blessed"), &planted, &gpk, None);
    assert!(blessed.status.success(), "{}", stderr_of(&blessed));
}

#[test]
fn head_in_redirect_mode_and_ranges_in_proxy_mode() {
    let top = shared_top();
    for s3 in S3::all() {
        let tmp = tempfile::tempdir().unwrap();
        let (sk, _) = keygen(tmp.path(), "gw-test-1");
        let bucket = s3.new_bucket("range");
        push(&s3, &bucket, Some(&sk), top);
        let narinfo = format!("/{}.narinfo", hash_of(top));
        let text = String::from_utf8(s3.get(&bucket, &narinfo[1..])).unwrap();
        let nar_key = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        let nar = s3.get(&bucket, &nar_key);
        let nar_path = format!("/{nar_key}");

        let gw = gateway(&s3, &bucket, &["--nar-delivery", "redirect"]);
        let h = request(gw.addr, "HEAD", &narinfo, &[]);
        assert_eq!(h.status, 200, "{}: {h:?}", s3.name);
        assert_eq!(
            h.header("content-length"),
            Some(text.len().to_string().as_str())
        );
        assert_eq!(h.header("content-type"), Some("text/x-nix-narinfo"));
        let h = request(gw.addr, "HEAD", &nar_path, &[]);
        assert_eq!(h.status, 200, "{}: {h:?}", s3.name);
        assert_eq!(
            h.header("content-length"),
            Some(nar.len().to_string().as_str())
        );
        let missing = format!("/nar/{}.nar.zst", "0".repeat(52));
        assert_eq!(request(gw.addr, "HEAD", &missing, &[]).status, 404);
        let g = get(gw.addr, &nar_path);
        assert_eq!(g.status, 307);
        assert_eq!(g.header("cache-control"), Some("no-store"));
        assert!(g.header("location").unwrap().contains("X-Amz-Signature="));

        let gw = gateway(&s3, &bucket, &["--nar-delivery", "proxy"]);
        let whole = get(gw.addr, &nar_path);
        assert_eq!((whole.status, &whole.body), (200, &nar), "{}", s3.name);
        assert!(whole.header("cache-control").unwrap().contains("immutable"));
        let n = nar.len();
        let cr = |a: usize, b: usize| format!("bytes {a}-{b}/{n}");
        // (Range, status, Content-Range, body)
        let cases: Vec<(String, u16, Option<String>, &[u8])> = vec![
            ("bytes=0-9".into(), 206, Some(cr(0, 9)), &nar[..10]),
            ("bytes=0-0".into(), 206, Some(cr(0, 0)), &nar[..1]),
            (
                format!("bytes={}-{}", n - 1, n - 1),
                206,
                Some(cr(n - 1, n - 1)),
                &nar[n - 1..],
            ),
            (
                format!("bytes={}-", n - 7),
                206,
                Some(cr(n - 7, n - 1)),
                &nar[n - 7..],
            ),
            (
                "bytes=-5".into(),
                206,
                Some(cr(n - 5, n - 1)),
                &nar[n - 5..],
            ),
            (
                format!("bytes=3-{}", n + 100),
                206,
                Some(cr(3, n - 1)),
                &nar[3..],
            ),
            // A suffix longer than the object is the whole object.
            (
                format!("bytes=-{}", n + 100),
                206,
                Some(cr(0, n - 1)),
                &nar[..],
            ),
            ("Bytes=0-9".into(), 206, Some(cr(0, 9)), &nar[..10]),
            // Unsatisfiable: starts at or past the end, or the empty suffix.
            (format!("bytes={n}-"), 416, None, b"range not satisfiable\n"),
            (
                format!("bytes={}-", n + 10),
                416,
                None,
                b"range not satisfiable\n",
            ),
            ("bytes=-0".into(), 416, None, b"range not satisfiable\n"),
            // Not understood (several ranges, inverted, garbage): ignored, as RFC 9110
            // asks, so the whole object.
            ("bytes=0-1,4-5".into(), 200, None, &nar[..]),
            ("bytes=5-3".into(), 200, None, &nar[..]),
            ("bytes=x".into(), 200, None, &nar[..]),
            ("items=0-9".into(), 200, None, &nar[..]),
        ];
        for (range, status, content_range, body) in &cases {
            let r = request(gw.addr, "GET", &nar_path, &[("Range", range)]);
            assert_eq!(r.status, *status, "{}: {range}: {r:?}", s3.name);
            assert_eq!(r.body, *body, "{}: {range}", s3.name);
            assert_eq!(
                r.header("content-range"),
                content_range.as_deref(),
                "{}: {range}",
                s3.name
            );
            if *status != 416 {
                assert_eq!(
                    r.header("content-length"),
                    Some(body.len().to_string().as_str()),
                    "{}: {range}",
                    s3.name
                );
            }
        }
        // HEAD with a Range answers for the whole object; a redirect ignores it.
        let h = request(gw.addr, "HEAD", &nar_path, &[("Range", "bytes=0-9")]);
        assert_eq!(h.status, 200, "{}: {h:?}", s3.name);
        assert_eq!(h.header("content-length"), Some(n.to_string().as_str()));
        let gw = gateway(&s3, &bucket, &["--nar-delivery", "redirect"]);
        let r = request(gw.addr, "GET", &nar_path, &[("Range", "bytes=0-9")]);
        assert_eq!(r.status, 307, "{}: {r:?}", s3.name);
    }
}

/// Request shapes the gateway refuses, each with its exact status, sent with valid
/// credentials (so that a route rejection cannot hide behind a 401), against a gateway with
/// and without authentication; none reaches the bucket, and each valid twin is served.
#[test]
fn bad_requests_get_their_exact_4xx_without_touching_the_bucket() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = s3.new_bucket("hostile");
    let pw = htpasswd(tmp.path(), "alice", "pw");
    let good = "Authorization: Basic YWxpY2U6cHc=\r\n"; // alice:pw
    let long = format!("/{}", "a".repeat(8192));
    let huge = format!("X-Big: {}\r\n", "x".repeat(20_000));
    // (what, request line, extra header lines, status)
    let shapes: Vec<(&str, String, String, u16)> = vec![
        (
            "traversal",
            "GET /../../etc/passwd".into(),
            String::new(),
            400,
        ),
        (
            "encoded traversal",
            "GET /nar/%2e%2e%2fsecret".into(),
            String::new(),
            400,
        ),
        (
            "double encoded",
            "GET /nar/%252e%252e/x".into(),
            String::new(),
            400,
        ),
        ("backslash", "GET /nar\\..\\x".into(), String::new(), 400),
        ("short hash", "GET /abc.narinfo".into(), String::new(), 400),
        (
            "non-nix32 hash",
            format!("GET /{}.narinfo", "e".repeat(32)),
            String::new(),
            400,
        ),
        ("bad NAR name", "GET /nar/x.nar".into(), String::new(), 400),
        (
            "bad drv name",
            "GET /log/notadrv".into(),
            String::new(),
            400,
        ),
        ("8 KiB path", format!("GET {long}"), String::new(), 414),
        ("huge header", "GET /nix-cache-info".into(), huge, 431),
        (
            "POST",
            "POST /nix-cache-info".into(),
            "Content-Length: 0\r\n".into(),
            405,
        ),
        ("DELETE", "DELETE /nar/x".into(), String::new(), 405),
        (
            "PUT",
            format!("PUT /{}.narinfo", "0".repeat(32)),
            "Content-Length: 0\r\n".into(),
            405,
        ),
        (
            "OPTIONS",
            "OPTIONS /nix-cache-info".into(),
            String::new(),
            405,
        ),
        (
            "PATCH",
            "PATCH /nix-cache-info".into(),
            "Content-Length: 0\r\n".into(),
            405,
        ),
        (
            "unknown route",
            "GET /index.html".into(),
            String::new(),
            404,
        ),
        (
            "unknown nested route",
            "GET /a/b/c".into(),
            String::new(),
            404,
        ),
    ];
    let invalid_utf8 = b"GET /\xff\xfe.narinfo HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    let send = |gw: &Gateway, line: &str, extra: &str, creds: &str| {
        let raw = format!("{line} HTTP/1.1\r\nHost: x\r\n{creds}{extra}Connection: close\r\n\r\n");
        common::http::raw(gw.addr, raw.as_bytes(), false)
    };
    let no_leak = |what: &str, r: &common::http::Reply| {
        for secret in [bucket.as_str(), "127.0.0.1:9", "s3://", "Amz"] {
            assert!(
                !r.text().contains(secret),
                "{what}: body leaks {secret}: {}",
                r.text()
            );
        }
    };
    for with_auth in [true, false] {
        let gw = if with_auth {
            gateway(&s3, &bucket, &["--htpasswd", pw.to_str().unwrap()])
        } else {
            gateway(&s3, &bucket, &[])
        };
        let before = gw.bucket_requests();
        for creds in [good, ""] {
            for (what, line, extra, status) in &shapes {
                let r = send(&gw, line, extra, creds);
                assert_eq!(
                    r.status, *status,
                    "{what} (auth {with_auth}, creds {creds:?}): {r:?}"
                );
                no_leak(what, &r);
                if *status == 405 {
                    assert_eq!(r.header("allow"), Some("GET, HEAD"), "{what}");
                }
            }
            let r = common::http::raw(gw.addr, &invalid_utf8, false);
            assert_eq!(r.status, 400, "invalid UTF-8: {r:?}");
        }
        if with_auth {
            // Credentials refused without a look at the bucket.
            for (what, creds) in [
                ("no credentials", String::new()),
                ("malformed basic", "Authorization: Basic %%%\r\n".to_owned()),
                (
                    "oversized bearer",
                    format!("Authorization: Bearer {}\r\n", "t".repeat(6000)),
                ),
            ] {
                let r = send(&gw, "GET /nix-cache-info", "", &creds);
                assert_eq!(r.status, 401, "{what}: {r:?}");
                no_leak(what, &r);
            }
        }
        assert_eq!(
            gw.bucket_requests(),
            before,
            "a refused request reached the bucket"
        );
        // The valid twins of the refused shapes are served (and reach the bucket).
        let creds = if with_auth { good } else { "" };
        for (line, status) in [
            ("GET /nix-cache-info", 200),
            (&*format!("GET /{}.narinfo", "0".repeat(32)), 404),
            (&*format!("GET /nar/{}.nar.zst", "1".repeat(52)), 307),
            (&*format!("GET /log/{}-x.drv", "0".repeat(32)), 404),
            ("GET /v1/version", 200),
        ] {
            let r = send(&gw, line, "", creds);
            assert_eq!(r.status, status, "{line} (auth {with_auth}): {r:?}");
        }
        assert!(gw.bucket_requests() > before);
    }
}

/// Every route and method asks for credentials when auth is on (all but /healthz and
/// /metrics), in both delivery modes: none, a wrong password, an unknown user, a malformed
/// header and a wrong token are 401 with `WWW-Authenticate` and never reach the bucket; a
/// good password, a bearer token (any case of the scheme) and a token as a Basic password
/// get each route's own answer.
#[test]
fn every_route_and_method_requires_auth() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let bucket = s3.new_bucket("authall");
    push(&s3, &bucket, None, top);
    let h = hash_of(top);
    let narinfo = String::from_utf8(s3.get(&bucket, &format!("{h}.narinfo"))).unwrap();
    let nar = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    let pw = htpasswd(tmp.path(), "alice", "correct-horse");
    let token = "0123456789abcdef0123456789abcdef";
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, format!("# ci\n{token}\n")).unwrap();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let refused: Vec<(&str, Option<String>)> = vec![
        ("none", None),
        (
            "wrong password",
            Some(format!("Basic {}", b64("alice:wrong-horse"))),
        ),
        (
            "unknown user",
            Some(format!("Basic {}", b64("mallory:correct-horse"))),
        ),
        ("malformed", Some("Basic !!!".into())),
        (
            "wrong token",
            Some("Bearer 0123456789abcdef0123456789abcdeX".into()),
        ),
    ];
    let accepted: Vec<(&str, String)> = vec![
        ("password", format!("Basic {}", b64("alice:correct-horse"))),
        ("bearer token", format!("Bearer {token}")),
        ("lower-case bearer", format!("bearer {token}")),
        (
            "token as password",
            format!("Basic {}", b64(&format!("anyone:{token}"))),
        ),
    ];
    for mode in ["redirect", "proxy"] {
        let gw = gateway(
            &s3,
            &bucket,
            &[
                "--nar-delivery",
                mode,
                "--htpasswd",
                pw.to_str().unwrap(),
                "--tokens",
                tokens.to_str().unwrap(),
                "--auth-failures-per-minute",
                "0",
            ],
        );
        let nar_get = if mode == "redirect" { 307 } else { 200 };
        // (path, GET status, HEAD status) once authenticated.
        let routes: Vec<(String, u16, u16)> = vec![
            ("/nix-cache-info".into(), 200, 200),
            (format!("/{h}.narinfo"), 200, 200),
            (format!("/{}.narinfo", "0".repeat(32)), 404, 404),
            (format!("/{nar}"), nar_get, 200),
            (format!("/{h}.ls"), 404, 404),
            (format!("/log/{}-x.drv", "0".repeat(32)), 404, 404),
            ("/v1/public-key".into(), 404, 404),
            ("/v1/version".into(), 200, 200),
        ];
        for (path, get_status, head_status) in &routes {
            for method in ["GET", "HEAD"] {
                for (what, creds) in &refused {
                    let before = gw.bucket_requests();
                    let headers: Vec<(&str, &str)> = creds
                        .as_deref()
                        .map(|c| vec![("Authorization", c)])
                        .unwrap_or_default();
                    let r = request(gw.addr, method, path, &headers);
                    assert_eq!(r.status, 401, "{mode} {method} {path} with {what}: {r:?}");
                    assert!(
                        r.header("www-authenticate")
                            .is_some_and(|v| v.starts_with("Basic realm=")),
                        "{mode} {method} {path} with {what}: {r:?}"
                    );
                    assert_eq!(
                        gw.bucket_requests(),
                        before,
                        "{mode} {method} {path} with {what} reached the bucket"
                    );
                }
                for (what, creds) in &accepted {
                    let r = request(gw.addr, method, path, &[("Authorization", creds)]);
                    let want = if method == "GET" {
                        *get_status
                    } else {
                        *head_status
                    };
                    assert_eq!(r.status, want, "{mode} {method} {path} with {what}: {r:?}");
                }
            }
        }
        // The two routes without auth, and what /metrics shows of the cache: no names.
        for method in ["GET", "HEAD"] {
            assert_eq!(request(gw.addr, method, "/healthz", &[]).status, 200);
            assert_eq!(request(gw.addr, method, "/metrics", &[]).status, 200);
        }
        let metrics = get(gw.addr, "/metrics").text();
        assert!(metrics.contains("cachepush_gateway_auth_failures_total"));
        for name in [h.as_str(), bucket.as_str(), nar.as_str()] {
            assert!(!metrics.contains(name), "/metrics shows {name}");
        }
    }
}

#[test]
fn a_bucket_outage_is_5xx_not_404_and_the_gateway_recovers() {
    let s3 = S3::ceph();
    let tmp = tempfile::tempdir().unwrap();
    let top = build("", "gw-outage");
    let (sk, _) = keygen(tmp.path(), "gw-test-1");
    let bucket = s3.new_bucket("outage");
    push(&s3, &bucket, Some(&sk), &top);
    let target: SocketAddr = s3.endpoint.trim_start_matches("http://").parse().unwrap();
    let fwd = Forwarder::start(target);
    let gw = gateway(
        &s3,
        &bucket,
        &[
            "--endpoint",
            &fwd.endpoint(),
            "--narinfo-ttl",
            "0",
            "--negative-ttl",
            "0",
        ],
    );
    let narinfo = format!("/{}.narinfo", hash_of(&top));
    let missing = format!("/{}.narinfo", "0".repeat(32));
    assert_eq!(get(gw.addr, &narinfo).status, 200);
    assert_eq!(get(gw.addr, &missing).status, 404);
    assert_eq!(get(gw.addr, "/healthz").status, 200);

    // /healthz asks the bucket at most once every 2 s, however often it is called (L6).
    let before = gw.bucket_requests();
    for _ in 0..20 {
        assert_eq!(get(gw.addr, "/healthz").status, 200);
    }
    assert!(
        gw.bucket_requests() - before <= 2,
        "{}",
        gw.bucket_requests() - before
    );

    fwd.set_up(false);
    // Past the health answer's 2 s lifetime.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    for path in [narinfo.as_str(), missing.as_str(), "/healthz"] {
        let r = get(gw.addr, path);
        assert!(
            (500..600).contains(&r.status),
            "{path} during the outage: {r:?}"
        );
        assert!(!r.text().contains(&bucket), "{}", r.text());
    }

    fwd.set_up(true);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(get(gw.addr, &narinfo).status, 200, "{}", gw.log_text());
    assert_eq!(get(gw.addr, &missing).status, 404);
    assert_eq!(get(gw.addr, "/healthz").status, 200);
}

#[test]
fn gateway_signs_with_its_own_key_serves_tls_unix_sockets_and_config_files() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let top = build("", "gw-sign");
    let bucket = s3.new_bucket("sign");
    // Filled by a tool that does not sign: only the gateway's signature makes it usable.
    push(&s3, &bucket, None, &top);
    let (gsk, gpk) = keygen(tmp.path(), "gateway-1");
    let (_, other) = keygen(tmp.path(), "other-1");

    // TLS with a self-signed certificate, settings from a config file.
    require("openssl");
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    let sock = tmp.path().join("gw.sock");
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "signing-key = {:?}\nsign-unverified = true\ntls-cert = {:?}\ntls-key = {:?}\nlisten = [\"127.0.0.1:0\", \"[::1]:0\", \"unix:{}\"]\n",
            gsk, cert, key, sock.display()
        ),
    )
    .unwrap();
    let mut c = cachepush();
    s3.creds(&mut c);
    c.arg("gateway")
        .arg("--from")
        .arg(s3.url(&bucket, ""))
        .arg("--config")
        .arg(&config);
    let mut gw = Gateway::start(c);
    let https = format!("https://localhost:{}", gw.addr.port());

    require("curl");
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(&cert)
            .args(args)
            .output()
            .unwrap();
        stdout(&out)
    };
    assert_eq!(curl(&[&format!("{https}/v1/public-key")]), gpk);
    let narinfo = curl(&[&format!("{https}/{}.narinfo", hash_of(&top))]);
    assert!(narinfo.contains("Sig: gateway-1:"), "{narinfo}");
    // IPv6 too: the second listener says where it is in the log.
    let v6_port = (0..50)
        .find_map(|_| {
            let log = gw.log_text();
            let port = log
                .lines()
                .find_map(|l| l.split("listening on https://[::1]:").nth(1))
                .map(|p| p.trim().to_owned());
            if port.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            port
        })
        .expect("an IPv6 listener");
    let v6 = curl(&[
        "--resolve",
        &format!("localhost:{v6_port}:[::1]"),
        &format!("https://localhost:{v6_port}/v1/version"),
    ]);
    assert!(v6.starts_with("cachepush "), "{v6}");
    let over_unix = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&sock)
        .arg("http://localhost/nix-cache-info")
        .output()
        .unwrap();
    assert!(
        stdout(&over_unix).contains("StoreDir: /nix/store"),
        "{over_unix:?}"
    );

    // The real Nix over HTTPS, trusting the gateway's key (and not another).
    let nix_tls = |dest: &str, pk: &str| {
        nix()
            .args(["copy", "--from", &https, "--to"])
            .arg(tmp.path().join(dest))
            .arg(&top)
            .args(["--option", "trusted-public-keys", pk])
            .env("NIX_SSL_CERT_FILE", &cert)
            .output()
            .unwrap()
    };
    let ok = nix_tls("ok", &gpk);
    assert!(ok.status.success(), "{}\n{}", stderr_of(&ok), gw.log_text());
    assert!(!nix_tls("bad", &other).status.success());

    // SIGTERM: a clean exit, and the socket file is removed.
    let status = gw.terminate();
    assert!(status.success(), "{status:?}: {}", gw.log_text());
    assert!(!sock.exists());

    // A config file with an unknown key is refused, naming it.
    std::fs::write(
        &config,
        "listen = [\"127.0.0.1:0\"]\nlisten-adress = \"x\"\n",
    )
    .unwrap();
    let mut c = cachepush();
    let out = c
        .arg("gateway")
        .arg("--from")
        .arg(s3.url(&bucket, ""))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = stderr_of(&out);
    assert!(e.contains("listen-adress") && e.contains("line 2"), "{e}");
}

/// Slow clients (slowloris): connections that never finish their request head do not
/// keep others from being served, and the gateway closes them when the header timeout
/// (10 s) runs out instead of holding them open.
#[test]
fn slow_clients_do_not_starve_others_and_are_cut_off() {
    use std::io::{Read, Write};
    let s3 = S3::seaweedfs();
    let bucket = s3.new_bucket("slow");
    let gw = gateway(&s3, &bucket, &[]);
    let mut slow: Vec<std::net::TcpStream> = (0..100)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
            s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: localhost\r\n")
                .unwrap();
            s
        })
        .collect();
    let r = get(gw.addr, "/nix-cache-info");
    assert_eq!(r.status, 200, "{r:?}");
    for s in &mut slow {
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut answer = Vec::new();
        match s.read_to_end(&mut answer) {
            // Closed, with nothing or with a 408 and nothing of the bucket in it.
            Ok(_) => {
                let text = String::from_utf8_lossy(&answer);
                assert!(
                    text.is_empty() || text.starts_with("HTTP/1.1 408"),
                    "{text}"
                );
                assert!(!text.contains(&bucket), "{text}");
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a slow connection was still open after 30 s: {e}"),
        }
    }
    // And the gateway still serves.
    assert_eq!(get(gw.addr, "/nix-cache-info").status, 200);
}

/// Waits until an open socket is closed by the gateway; panics if it is still open at
/// `deadline`. Returns what the gateway sent before closing.
fn closed_by(s: &mut std::net::TcpStream, deadline: std::time::Instant) -> Vec<u8> {
    use std::io::Read;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            !left.is_zero(),
            "a connection was still open at the deadline"
        );
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("a connection was still open at the deadline: {e}"),
        }
    }
}

/// Security review M1: a socket that sends nothing, one that sends only the HTTP/2
/// preface, and a keep-alive connection left idle are each closed within their timeout
/// plus slack; a thousand of them at once do not keep a legitimate client out.
#[test]
fn idle_sockets_and_idle_http2_prefaces_are_closed_and_do_not_lock_others_out() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let s3 = S3::seaweedfs();
    let bucket = s3.new_bucket("idle");
    let gw = gateway(
        &s3,
        &bucket,
        &["--header-timeout", "3", "--idle-timeout", "3"],
    );
    let opened = Instant::now();
    let mut idle: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(gw.addr).expect("connect"))
        .collect();
    let mut h2 = std::net::TcpStream::connect(gw.addr).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    // A keep-alive connection that made one request and then went quiet.
    let mut kept = std::net::TcpStream::connect(gw.addr).unwrap();
    kept.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();

    // Meanwhile, a legitimate client is served.
    let r = get(gw.addr, "/nix-cache-info");
    assert_eq!(r.status, 200, "{r:?}");

    // 3 s to the first request, plus 3 s of slack for a busy machine.
    let deadline = opened + Duration::from_secs(6);
    for s in &mut idle {
        assert!(closed_by(s, deadline).is_empty());
    }
    closed_by(&mut h2, deadline);
    // The keep-alive one got its answer, then was closed for idling.
    let answer = closed_by(&mut kept, Instant::now() + Duration::from_secs(6));
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(get(gw.addr, "/nix-cache-info").status, 200);

    // Past --max-connections, new connections are closed at once and counted.
    let gw = gateway(&s3, &bucket, &["--max-connections", "5"]);
    let _held: Vec<_> = (0..5)
        .map(|_| std::net::TcpStream::connect(gw.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = std::net::TcpStream::connect(gw.addr).unwrap();
    closed_by(&mut extra, Instant::now() + Duration::from_secs(5));
    drop(_held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(gw.addr, "/healthz").status, 200);
    assert!(gw.metric("cachepush_gateway_connections_refused_total", "") >= 1);
}

/// Security review M2: 200 concurrent wrong passwords from one host do not delay another
/// host's first login (a credential the gateway has not verified yet, so a real bcrypt
/// run) by more than a second; the attacker gets 401, 429 or 503, never 200.
#[test]
fn a_flood_of_wrong_passwords_does_not_delay_a_legitimate_first_login() {
    use std::time::{Duration, Instant};
    require("htpasswd");
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = s3.new_bucket("bcrypt");
    // Cost 10, a common production setting (htpasswd's default is 5).
    let pw = tmp.path().join("htpasswd");
    let entry = |user: &str| {
        let mut child = Command::new("htpasswd")
            .args(["-niB", "-C", "10", user])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"correct-horse").unwrap();
        stdout(&child.wait_with_output().unwrap())
    };
    std::fs::write(&pw, format!("{}\n{}\n", entry("alice"), entry("bob"))).unwrap();
    let pw = pw.to_str().unwrap();
    let gw = gateway(
        &s3,
        &bucket,
        &["--htpasswd", pw, "--listen", "[::1]:0", "-q"],
    );
    // The legitimate user comes from another address: [::1].
    let v6: SocketAddr = (0..50)
        .find_map(|_| {
            let port = gw
                .log_text()
                .lines()
                .find_map(|l| l.split("listening on http://[::1]:").nth(1))
                .map(|p| p.trim().to_owned());
            if port.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            port
        })
        .map(|p| format!("[::1]:{p}").parse().unwrap())
        .expect("an IPv6 listener");
    let basic = |user: &str, pass: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };

    // Nix opens many connections at once with one credential: all of them get in (one
    // bcrypt run answers them all), none is refused for being many.
    let burst: Vec<_> = (0..30)
        .map(|_| {
            let addr = gw.addr;
            let h = basic("bob", "correct-horse");
            std::thread::spawn(move || {
                request(addr, "GET", "/nix-cache-info", &[("Authorization", &h)]).status
            })
        })
        .collect();
    let burst: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(burst.iter().all(|s| *s == 200), "{burst:?}");

    let attackers: Vec<_> = (0..200)
        .map(|i| {
            let addr = gw.addr;
            let h = basic("alice", &format!("wrong-{i}"));
            std::thread::spawn(move || {
                request(addr, "GET", "/nix-cache-info", &[("Authorization", &h)]).status
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let r = request(
        v6,
        "GET",
        "/nix-cache-info",
        &[("Authorization", &basic("alice", "correct-horse"))],
    );
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    let statuses: Vec<u16> = attackers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| [401, 429, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "the first login took {took:?} under a flood of wrong passwords"
    );
    // Wrong passwords one after another: each is checked (401) until the address has
    // used up its failures for the minute; then 429 with the time to come back, never a
    // 401 (which Nix would read as "absent").
    let limited = (0..40)
        .map(|i| {
            request(
                gw.addr,
                "GET",
                "/nix-cache-info",
                &[("Authorization", &basic("alice", &format!("again-{i}")))],
            )
        })
        .find(|r| r.status != 401)
        .expect("40 wrong passwords in a row and never limited");
    assert_eq!(limited.status, 429, "{limited:?}");
    assert!(limited.header("retry-after").is_some(), "{limited:?}");
    // The other host is not affected.
    let r = request(
        v6,
        "GET",
        "/nix-cache-info",
        &[("Authorization", &basic("alice", "correct-horse"))],
    );
    assert_eq!(r.status, 200, "{r:?}");
}

/// Security review M3 and M4: a missing bucket is an outage (5xx everywhere, /healthz
/// 503, a warning at startup), never "absent"; and responses that needed credentials are
/// `private` with `Vary: Authorization`, unless the operator says a CDN authenticates.
#[test]
fn a_missing_bucket_is_5xx_and_authenticated_answers_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let top = build("", "gw-nobucket");
    for s3 in S3::all() {
        let bucket = s3.new_bucket("present");
        push(&s3, &bucket, None, &top);
        let narinfo = format!("/{}.narinfo", hash_of(&top));
        let missing = format!("/{}.narinfo", "0".repeat(32));
        let nar = format!("/nar/{}.nar", "1".repeat(52));

        // The twin that works: the same requests against the existing bucket.
        let gw = gateway(&s3, &bucket, &[]);
        assert_eq!(get(gw.addr, "/healthz").status, 200, "{}", s3.name);
        assert_eq!(get(gw.addr, &narinfo).status, 200, "{}", s3.name);
        assert_eq!(get(gw.addr, &missing).status, 404, "{}", s3.name);
        assert_eq!(
            request(gw.addr, "HEAD", &nar, &[]).status,
            404,
            "{}",
            s3.name
        );
        let r = get(gw.addr, &narinfo);
        assert_eq!(r.header("cache-control"), Some("public, max-age=60"));

        let gone = gateway(&s3, &unique("no-such-bucket"), &[]);
        for (path, head) in [
            ("/healthz", false),
            (narinfo.as_str(), false),
            (missing.as_str(), false),
            ("/nix-cache-info", false),
            (nar.as_str(), true),
        ] {
            let r = request(gone.addr, if head { "HEAD" } else { "GET" }, path, &[]);
            assert!(
                (500..600).contains(&r.status),
                "{}: {path} with no bucket: {r:?}\n{}",
                s3.name,
                gone.log_text()
            );
            // The body is generic: no bucket name, no S3 error code or message.
            for leak in ["no-such-bucket", "NoSuchBucket", "does not exist", "s3://"] {
                assert!(
                    !r.text().contains(leak),
                    "{}: {path}: {}",
                    s3.name,
                    r.text()
                );
            }
        }
        assert!(
            gone.log_text().contains("does not exist"),
            "{}: {}",
            s3.name,
            gone.log_text()
        );
    }

    // M4: private behind auth, public only on request.
    let s3 = S3::seaweedfs();
    let bucket = s3.new_bucket("private");
    push(&s3, &bucket, None, &top);
    let pw = htpasswd(tmp.path(), "alice", "correct-horse");
    let pw = pw.to_str().unwrap();
    let auth = [(
        "Authorization",
        "Basic YWxpY2U6Y29ycmVjdC1ob3JzZQ==", // alice:correct-horse
    )];
    let narinfo = format!("/{}.narinfo", hash_of(&top));
    let gw = gateway(&s3, &bucket, &["--htpasswd", pw, "--nar-delivery", "proxy"]);
    let r = request(gw.addr, "GET", &narinfo, &auth);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("private, max-age=60"));
    assert_eq!(r.header("vary"), Some("authorization"));
    let nar_url = r
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    let r = request(gw.addr, "GET", &format!("/{nar_url}"), &auth);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("cache-control"),
        Some("private, max-age=31536000, immutable")
    );
    let r = request(gw.addr, "GET", "/nix-cache-info", &auth);
    assert_eq!(r.header("cache-control"), Some("private, max-age=3600"));
    let gw = gateway(
        &s3,
        &bucket,
        &["--htpasswd", pw, "--cache-control", "public"],
    );
    let r = request(gw.addr, "GET", &narinfo, &auth);
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    assert_eq!(r.header("vary"), None);
}

/// A NAR whose bytes changed in the bucket is refused by the real Nix, through the gateway
/// and straight from the bucket alike, and accepted again once restored; and the gateway,
/// even with a signing key, never writes to the bucket.
#[test]
fn a_nar_changed_in_the_bucket_is_refused_by_nix_and_the_gateway_never_writes() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "gw-nar-1");
    let (gsk, gpk) = keygen(tmp.path(), "gateway-1");
    let top = build("", &unique("gw-nar"));
    let (bucket, prefix) = s3.new_public_cache("narflip");
    let mut c = cachepush();
    s3.creds(&mut c);
    // Uncompressed, so that the changed byte reaches Nix's NarHash check rather than a
    // decompressor.
    run_ok(
        c.args(["copy", "-q", "--compression", "none", "--to"])
            .arg(s3.url(&bucket, &prefix))
            .arg("--signing-key")
            .arg(&sk)
            .arg(&top),
    );
    let key = |k: &str| format!("{prefix}/{k}");
    let text =
        String::from_utf8(s3.get(&bucket, &key(&format!("{}.narinfo", hash_of(&top))))).unwrap();
    let nar_key = key(text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap());
    let nar = s3.get(&bucket, &nar_key);
    // Change one character of file contents (a store path the files mention), not the
    // NAR's framing, so that only the hash can tell.
    let mut flipped = nar.clone();
    let at = flipped
        .windows(11)
        .position(|w| w == b"/nix/store/")
        .expect("top's files mention a store path")
        + 11;
    flipped[at] = if flipped[at] == b'0' { b'1' } else { b'0' };

    let mut c = cachepush();
    s3.creds(&mut c);
    c.arg("gateway")
        .arg("--from")
        .arg(s3.url(&bucket, &prefix))
        .args(["--listen", "127.0.0.1:0", "--nar-delivery", "proxy"])
        .arg("--signing-key")
        .arg(&gsk)
        .args(["--require-signature-by", &pk]);
    let gw = Gateway::start(c);
    let both = format!("{pk} {gpk}");
    let before: Vec<(String, Vec<u8>)> = s3
        .keys(&bucket, &prefix)
        .into_iter()
        .map(|k| {
            let b = s3.get(&bucket, &k);
            (k, b)
        })
        .collect();
    s3.put(&bucket, &nar_key, &flipped);
    for (via, url) in [
        ("gateway", gw.url()),
        ("bucket", s3.http_url(&bucket, &prefix)),
    ] {
        let o = nix_via(
            &url,
            &tmp.path().join(format!("bad-{via}")),
            &top,
            &both,
            None,
        );
        assert!(!o.status.success(), "{via}: Nix accepted a changed NAR");
        assert!(
            stderr_of(&o).contains("hash mismatch"),
            "{via}: refused for another reason: {}",
            stderr_of(&o)
        );
    }
    s3.put(&bucket, &nar_key, &nar);
    for (via, url) in [
        ("gateway", gw.url()),
        ("bucket", s3.http_url(&bucket, &prefix)),
    ] {
        let o = nix_via(
            &url,
            &tmp.path().join(format!("good-{via}")),
            &top,
            &both,
            None,
        );
        assert!(o.status.success(), "{via}: {}", stderr_of(&o));
    }
    // The bucket holds exactly what it held before the gateway served it.
    let after: Vec<(String, Vec<u8>)> = s3
        .keys(&bucket, &prefix)
        .into_iter()
        .map(|k| {
            let b = s3.get(&bucket, &k);
            (k, b)
        })
        .collect();
    assert_eq!(before.len(), after.len());
    assert!(before == after, "the gateway changed the bucket");
}

/// The gateway's other routes and settings: `.ls` and `log/` are streamed with their
/// content types; a bucket without `nix-cache-info` gets one from `--store-dir` and
/// `--priority`; a 404 is remembered for `--negative-ttl` and no longer; presigned URLs
/// stop working after `--presign-ttl`; bad settings are refused at start.
#[test]
fn listings_logs_generated_cache_info_negative_ttl_and_presign_expiry() {
    use std::time::{Duration, Instant};
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = s3.new_bucket("routes");
    let h = "0".repeat(32);
    let drv = format!("{}-hello.drv", "1".repeat(32));
    s3.put(
        &bucket,
        &format!("{h}.ls"),
        br#"{"version":1,"root":{"type":"regular"}}"#,
    );
    s3.put(&bucket, &format!("log/{drv}"), b"building hello\n");
    let gw = gateway(
        &s3,
        &bucket,
        &[
            "--store-dir",
            "/nix/store",
            "--priority",
            "17",
            "--negative-ttl",
            "2",
            "--nar-delivery",
            "redirect",
            "--presign-ttl",
            "1",
        ],
    );
    let r = get(gw.addr, &format!("/{h}.ls"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.text().contains("\"version\":1"));
    let r = get(gw.addr, &format!("/log/{drv}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.text(), "building hello\n");
    let r = get(gw.addr, "/nix-cache-info");
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("StoreDir: /nix/store") && r.text().contains("Priority: 17"),
        "{}",
        r.text()
    );

    // Negative TTL: a narinfo that appears after a 404 is served once the 404 expires.
    let top = build("", &unique("gw-negative"));
    let narinfo = format!("/{}.narinfo", hash_of(&top));
    assert_eq!(get(gw.addr, &narinfo).status, 404);
    push(&s3, &bucket, None, &top);
    assert_eq!(
        get(gw.addr, &narinfo).status,
        404,
        "the 404 was not remembered"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(gw.addr, &narinfo).status != 200 {
        assert!(Instant::now() < deadline, "the 404 outlived --negative-ttl");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A presigned URL works at once and not after its lifetime.
    let text = get(gw.addr, &narinfo).text();
    let nar = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    let r = get(gw.addr, &format!("/{nar}"));
    assert_eq!(r.status, 307);
    let location = r.header("location").unwrap().to_owned();
    let fetch = |url: &str| {
        stdout(
            &Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
                .output()
                .unwrap(),
        )
    };
    assert_eq!(fetch(&location), "200");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        fetch(&location),
        "403",
        "a presigned URL outlived --presign-ttl"
    );

    // Settings refused at start, each with one error line.
    for (args, needle) in [
        (vec!["--presign-ttl", "0"], "--presign-ttl"),
        (vec!["--presign-ttl", "604801"], "--presign-ttl"),
        (vec!["--header-timeout", "0"], "--header-timeout"),
        (vec!["--max-connections", "0"], "--max-connections"),
        (vec!["--cache-control", "shared"], "--cache-control"),
        (vec!["--tls-cert", "/nonexistent.pem"], "--tls-key"),
    ] {
        let o = gateway_cmd(&s3, &bucket, &args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr_of(&o));
        assert!(
            stderr_of(&o).contains(needle),
            "{args:?}: {}",
            stderr_of(&o)
        );
    }
    // A cache directory that is not there is named (the gateway serves file:// caches,
    // but never creates one); exit 3, as for a bucket that cannot be reached.
    let missing = tmp.path().join("no-such-cache");
    let mut c = cachepush();
    let o = c
        .args(["gateway", "--listen", "127.0.0.1:0", "--from"])
        .arg(format!("file://{}", missing.display()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("no-such-cache") && stderr_of(&o).contains("does not exist"),
        "{}",
        stderr_of(&o)
    );
    assert!(!missing.exists(), "the gateway created the directory");
}

/// The gateway's settings: flag > `CACHEPUSH_GATEWAY_*` variable > `--config` file, seen in
/// the `nix-cache-info` it generates for a bucket without one.
#[test]
fn gateway_settings_precedence_flag_env_file() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = s3.new_bucket("gwprec");
    let config = tmp.path().join("gateway.toml");
    std::fs::write(&config, "priority = 11\n").unwrap();
    let priority = |env: bool, flag: bool| {
        let mut c = gateway_cmd(&s3, &bucket, &["--config", config.to_str().unwrap()]);
        if env {
            c.env("CACHEPUSH_GATEWAY_PRIORITY", "12");
        }
        if flag {
            c.args(["--priority", "13"]);
        }
        let gw = Gateway::start(c);
        let text = get(gw.addr, "/nix-cache-info").text();
        text.lines()
            .find_map(|l| l.strip_prefix("Priority: "))
            .unwrap_or_else(|| panic!("{text}"))
            .to_owned()
    };
    assert_eq!(priority(true, true), "13");
    assert_eq!(priority(true, false), "12");
    assert_eq!(priority(false, false), "11");
}

/// Revalidation: narinfo and nix-cache-info answers carry an ETag; `If-None-Match` with it
/// is 304 without a bucket request while the answer is cached, and a changed object gets a
/// new tag. Realisations and debug-info objects are served when present, 404 when not.
#[test]
fn etags_revalidate_without_the_bucket_and_realisations_are_served() {
    let s3 = S3::seaweedfs();
    let bucket = s3.new_bucket("etag");
    let top = shared_top();
    push(&s3, &bucket, None, top);
    let gw = gateway(&s3, &bucket, &["--negative-ttl", "0"]);
    let path = format!("/{}.narinfo", hash_of(top));
    for p in [path.as_str(), "/nix-cache-info"] {
        let first = get(gw.addr, p);
        assert_eq!(first.status, 200, "{p}");
        let tag = first.header("etag").expect("no ETag").to_owned();
        assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");
        let before = gw.bucket_requests();
        let again = request(gw.addr, "GET", p, &[("If-None-Match", &tag)]);
        assert_eq!(again.status, 304, "{p}");
        assert!(again.body.is_empty());
        assert_eq!(again.header("etag"), Some(tag.as_str()));
        assert_eq!(gw.bucket_requests(), before, "{p}: a 304 asked the bucket");
        let other = request(gw.addr, "GET", p, &[("If-None-Match", "\"nope\"")]);
        assert_eq!(other.status, 200, "{p}");
        assert_eq!(other.body, first.body);
        let any = request(
            gw.addr,
            "GET",
            p,
            &[("If-None-Match", &format!("W/\"x\", {tag}"))],
        );
        assert_eq!(any.status, 304, "{p}: a tag in a list");
    }
    // A changed narinfo (after the cache's TTL) gets another tag.
    let gw2 = gateway(&s3, &bucket, &["--narinfo-ttl", "0"]);
    let old = get(gw2.addr, &path).header("etag").unwrap().to_owned();
    let key = format!("{}.narinfo", hash_of(top));
    let text = String::from_utf8(s3.get(&bucket, &key)).unwrap();
    s3.put(&bucket, &key, format!("{text}X-Changed: 1\n").as_bytes());
    let new = get(gw2.addr, &path);
    assert_ne!(new.header("etag"), Some(old.as_str()));
    assert_eq!(
        request(gw2.addr, "GET", &path, &[("If-None-Match", &old)]).status,
        200
    );

    let id = format!("sha256:{}!out", "ab".repeat(32));
    let doi = format!("realisations/{id}.doi");
    assert_eq!(get(gw.addr, &format!("/{doi}")).status, 404);
    s3.put(&bucket, &doi, br#"{"id":"x"}"#);
    let r = get(gw.addr, &format!("/{doi}"));
    assert_eq!((r.status, r.text().as_str()), (200, r#"{"id":"x"}"#));
    let dbg = "debuginfo/8a2c1f9e0b7d6c5a4f3e2d1c0b9a8f7e6d5c4b3a";
    assert_eq!(get(gw.addr, &format!("/{dbg}")).status, 404);
    s3.put(
        &bucket,
        dbg,
        br#"{"archive":"../nar/x.nar.xz","member":"lib/debug/x"}"#,
    );
    assert_eq!(get(gw.addr, &format!("/{dbg}")).status, 200);
    assert_eq!(get(gw.addr, "/realisations/sha256:zz!out.doi").status, 400);
}

fn bearer_status(gw: &Gateway, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    request(
        gw.addr,
        "GET",
        "/nix-cache-info",
        &[("Authorization", &auth)],
    )
    .status
}

/// Waits (up to 15 s: the gateway rereads its revocation list every 5 s) until `token`
/// is refused.
fn refused_within_seconds(gw: &Gateway, token: &str, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while bearer_status(gw, token) != 401 {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Scoped tokens: the real Nix pulls with one as its netrc password; a bearer token works
/// too; a push token, a token for another cache, an expired, altered or foreign-key token
/// are refused with 401, as is a revoked one once the revocation list says so, and every
/// token while that list cannot be read. No token appears in the gateway's log.
#[test]
fn scoped_tokens_pull_until_they_expire_or_are_revoked_and_only_their_scope_and_cache() {
    let top = shared_top();
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "gw-test-1");
    let (tk, _) = keygen(tmp.path(), "tokens-1");
    let (foreign, _) = keygen(tmp.path(), "tokens-1-forged");
    let bucket = s3.new_bucket("tokens");
    run_ok(copy_cmd(&s3.url(&bucket, "team"), Some(&s3), Some(&sk), &["-q"]).arg(top));
    let revoked = tmp.path().join("revoked");
    std::fs::write(&revoked, "").unwrap();
    let gw = Gateway::start(gateway_from(
        &s3.url(&bucket, "team"),
        Some(&s3),
        &[
            "--token-key",
            tk.to_str().unwrap(),
            "--token-revocations",
            revoked.to_str().unwrap(),
        ],
    ));

    let pull = issue_token(&tk, "pull", "team", "1d");
    let push = issue_token(&tk, "push", "team", "1d");
    let other = issue_token(&tk, "pull", "other", "1d");
    let brief = issue_token(&tk, "pull", "team", "1s");
    let forged = issue_token(&foreign, "pull", "team", "1d");

    // The acceptance cases first: a bearer token, and the real Nix with it in netrc.
    assert_eq!(bearer_status(&gw, &pull), 200);
    let netrc_file = netrc(tmp.path(), "netrc", "ci", &pull);
    let ok = nix_via(
        &gw.url(),
        &tmp.path().join("ok"),
        top,
        &pk,
        Some(&netrc_file),
    );
    assert!(ok.status.success(), "{}\n{}", stderr_of(&ok), gw.log_text());
    for p in closure_of(top) {
        assert!(
            tmp.path()
                .join("ok")
                .join(p.strip_prefix("/").unwrap())
                .exists()
        );
    }

    // Refusals: no credentials, a push token, another cache, another key, an altered one.
    assert_eq!(get(gw.addr, "/nix-cache-info").status, 401);
    assert_eq!(bearer_status(&gw, &push), 401);
    assert_eq!(bearer_status(&gw, &other), 401);
    assert_eq!(bearer_status(&gw, &forged), 401);
    let mut altered = pull.clone().into_bytes();
    let i = altered.len() - 10;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        bearer_status(&gw, &String::from_utf8(altered).unwrap()),
        401
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(bearer_status(&gw, &brief), 401, "an expired token");

    // Revoked by its token (read from a file, never the command line): refused within
    // seconds, by the bearer and by the real Nix; the list changes nothing for others.
    let token_file = tmp.path().join("pull.token");
    std::fs::write(&token_file, &pull).unwrap();
    run_ok(
        cachepush()
            .args(["token", "revoke", "--revocations"])
            .arg(&revoked)
            .arg("--token-file")
            .arg(&token_file)
            .args(["--reason", "left the team"]),
    );
    refused_within_seconds(&gw, &pull, "the revocation was never read");
    let no = nix_via(
        &gw.url(),
        &tmp.path().join("no"),
        top,
        &pk,
        Some(&netrc_file),
    );
    assert!(!no.status.success(), "a revoked token still pulls");
    let fresh = issue_token(&tk, "pull", "team", "1d");
    assert_eq!(bearer_status(&gw, &fresh), 200);
    // The list unreadable: every scoped token is refused (fail closed).
    std::fs::remove_file(&revoked).unwrap();
    refused_within_seconds(&gw, &fresh, "a lost revocation list was not noticed");

    let log = gw.log_text();
    for t in [&pull, &push, &other, &brief, &forged, &fresh] {
        let sig = t.rsplit_once('.').unwrap().1;
        assert!(!log.contains(sig), "a token in the log: {log}");
    }
    assert!(log.contains("revoked token"), "{log}");
    assert!(log.contains("expired token"), "{log}");
}
