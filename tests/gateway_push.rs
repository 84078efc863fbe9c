//! Pushing through `cachepush gateway` with no S3 credentials and no signing key: CI
//! identity tokens from a test OIDC issuer on loopback (RS256 keys, one of them rotated
//! in), scoped push tokens, the refusals, pushers that lie, and a 600 MiB NAR through a
//! proxy that refuses request bodies over 100 MiB. Judged by the real Nix substituting
//! what was pushed, with only the gateway's key trusted, and by the bucket's own listing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

use common::fault::{Fault, FaultProxy, Rule};
use common::http::Gateway;
use common::s3::S3;
use common::*;

const AUDIENCE: &str = "cachepush-test";

/// An OIDC issuer on loopback: its discovery document and a JWKS that can be swapped.
struct Issuer {
    url: String,
    jwks: Arc<Mutex<String>>,
    /// What `/gh-token` hands out: GitHub's ID-token endpoint, which answers a job's
    /// `ACTIONS_ID_TOKEN_REQUEST_TOKEN` with a token for the audience it asks for.
    github: Arc<Mutex<String>>,
}

const GITHUB_REQUEST_TOKEN: &str = "gh-request-secret";

struct SigningKey {
    kid: String,
    pair: RsaKeyPair,
}

impl SigningKey {
    fn new(kid: &str) -> SigningKey {
        SigningKey {
            kid: kid.into(),
            pair: RsaKeyPair::generate(KeySize::Rsa2048).unwrap(),
        }
    }

    fn jwk(&self) -> Value {
        let (n, e) = rsa_public_numbers(self.pair.public_key().as_ref());
        json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
               "n": B64.encode(n), "e": B64.encode(e)})
    }

    /// A JWT with these claims, signed RS256 (or with the header's `alg` replaced).
    fn token(&self, claims: &Value) -> String {
        self.token_with_header(
            &json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signed.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{signed}.{}", B64.encode(sig))
    }
}

/// n and e of a PKCS#1 `RSAPublicKey` (DER: a SEQUENCE of two INTEGERs), as a JWK wants
/// them: big-endian, without the sign byte.
fn rsa_public_numbers(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn item(d: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = d[0];
        let (len, head) = if d[1] < 0x80 {
            (d[1] as usize, 2)
        } else {
            let k = (d[1] & 0x7f) as usize;
            let len = d[2..2 + k]
                .iter()
                .fold(0usize, |a, b| (a << 8) | *b as usize);
            (len, 2 + k)
        };
        (tag, &d[head..head + len], &d[head + len..])
    }
    let (seq, body, _) = item(der);
    assert_eq!(seq, 0x30);
    let (_, n, rest) = item(body);
    let (_, e, _) = item(rest);
    let strip = |v: &[u8]| v.iter().skip_while(|b| **b == 0).copied().collect();
    (strip(n), strip(e))
}

impl Issuer {
    fn start(keys: &[&SigningKey]) -> Issuer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let jwks = Arc::new(Mutex::new(String::new()));
        let github = Arc::new(Mutex::new(String::new()));
        let issuer = Issuer {
            url: url.clone(),
            jwks: jwks.clone(),
            github: github.clone(),
        };
        issuer.set_keys(keys);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // The rest of the head.
                let mut head = String::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    head.push_str(&h.to_ascii_lowercase());
                }
                let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                let github_ok = head
                    .contains(&format!("authorization: bearer {GITHUB_REQUEST_TOKEN}"))
                    && path.contains(&format!("audience={AUDIENCE}"));
                let (status, body) = match path.as_str() {
                    p if p.starts_with("/gh-token?") && github_ok => {
                        (200, json!({ "value": *github.lock().unwrap() }).to_string())
                    }
                    p if p.starts_with("/gh-token?") => (403, String::new()),
                    "/.well-known/openid-configuration" => (
                        200,
                        json!({"issuer": url, "jwks_uri": format!("{url}/jwks")}).to_string(),
                    ),
                    "/jwks" => (200, jwks.lock().unwrap().clone()),
                    _ => (404, String::new()),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        issuer
    }

    fn set_keys(&self, keys: &[&SigningKey]) {
        let set: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
        *self.jwks.lock().unwrap() = json!({ "keys": set }).to_string();
    }

    /// What GitHub Actions puts in a job's token, for `repository` and `git_ref`.
    fn claims(&self, repository: &str, git_ref: &str) -> Value {
        let now = now();
        json!({"iss": self.url, "aud": AUDIENCE, "sub": format!("repo:{repository}:ref:{git_ref}"),
               "repository": repository, "ref": git_ref, "iat": now, "nbf": now - 5,
               "exp": now + 600})
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A gateway over `bucket` that takes pushes from `issuer`'s tokens for acme/* on main,
/// quarantines acme/* pull requests, and signs with `sk`.
fn push_gateway(s3: &S3, bucket: &str, sk: &Path, issuer: &Issuer, extra: &[&str]) -> Gateway {
    let mut args = vec![
        "--signing-key",
        sk.to_str().unwrap(),
        "--push-oidc-issuer",
        &issuer.url,
        "--push-oidc-audience",
        AUDIENCE,
        "--push-claim",
        "repository=acme/*",
        "--push-claim",
        "ref=refs/heads/main",
        "--push-quarantine-prefix",
        "quarantine",
        "--push-quarantine-claim",
        "repository=acme/*",
        "--push-oidc-insecure-http",
    ];
    args.extend_from_slice(extra);
    Gateway::start(gateway_from(&s3.url(bucket, ""), Some(s3), &args))
}

/// `cachepush copy --to GATEWAY PATH` with only a token: no S3 credentials, no key.
fn push_through(to: &str, token: &str, path: &Path) -> std::process::Output {
    let mut c = cachepush();
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        c.env_remove(v);
    }
    c.env("CACHEPUSH_TOKEN", token)
        .args(["copy", "--to", to])
        .arg(path)
        .output()
        .expect("run cachepush copy")
}

/// One request to the gateway's push API: status and body.
fn api(gw: &Gateway, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .request(
                method.parse().unwrap(),
                format!("http://{}/_cachepush/push/v1/{path}", gw.addr),
            )
            .bearer_auth(token)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// A PUT of `body` to a presigned URL: the bucket's status.
fn put_url(url: &str, body: &[u8]) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::Client::new()
            .put(url)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

fn nix_has_closure(dest: &Path, top: &Path) {
    for p in closure_of(top) {
        assert!(
            dest.join(p.strip_prefix("/").unwrap()).exists(),
            "{} was not substituted",
            p.display()
        );
    }
}

fn narinfo_keys(keys: &[String]) -> Vec<&String> {
    keys.iter().filter(|k| k.ends_with(".narinfo")).collect()
}

/// The acceptance case, on both servers: a CI job with nothing but its identity token
/// pushes a closure; the real Nix substitutes it through the gateway trusting only the
/// gateway's key. The issuer's key is rotated: a token signed by the new key pushes at
/// once, one signed by the retired key no longer does. A pull request's token pushes into
/// the quarantine, unsigned and apart from the cache.
#[test]
fn ci_identity_tokens_push_through_the_gateway_with_no_secrets_and_nix_substitutes_it() {
    for s3 in S3::all() {
        let tmp = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(tmp.path(), "gw-push-1");
        let bucket = s3.new_bucket("gwpush");
        let old = SigningKey::new("k-2026-11");
        let issuer = Issuer::start(&[&old]);
        let gw = push_gateway(&s3, &bucket, &sk, &issuer, &[]);
        let top = build("", &unique("gwpush"));

        let token = old.token(&issuer.claims("acme/app", "refs/heads/main"));
        let out = push_through(&gw.url(), &token, &top);
        assert!(
            out.status.success(),
            "{}: {}\n{}",
            s3.name,
            stderr_of(&out),
            gw.log_text()
        );
        assert!(!stderr_of(&out).contains(&token), "the token was printed");
        assert!(!gw.log_text().contains(&token), "the token was logged");
        let dest = tmp.path().join("nix");
        let got = nix_via(&gw.url(), &dest, &top, &pk, None);
        assert!(got.status.success(), "{}: {}", s3.name, stderr_of(&got));
        nix_has_closure(&dest, &top);
        let keys = s3.keys(&bucket, "");
        assert_eq!(
            narinfo_keys(&keys).len(),
            closure_of(&top).len(),
            "{keys:?}"
        );
        assert!(
            !keys.iter().any(|k| k.starts_with("_incoming/")),
            "staging objects left: {keys:?}"
        );
        run_ok(
            command("verify", Some(&s3))
                .arg(s3.url(&bucket, ""))
                .args(["--trusted-key", &pk]),
        );
        // A NAR too big to go along with its narinfo (about 1 MiB compressed) goes to
        // the bucket on a presigned PUT; the small ones of the same closure go along.
        let mid = build_big(&unique("gwpush-mid"), 3);
        let out = push_through(&gw.url(), &token, &mid);
        assert!(out.status.success(), "{}", stderr_of(&out));
        let got = nix_via(&gw.url(), &tmp.path().join("nix-mid"), &mid, &pk, None);
        assert!(got.status.success(), "{}: {}", s3.name, stderr_of(&got));
        nix_has_closure(&tmp.path().join("nix-mid"), &mid);
        assert!(
            gw.log_text().contains("POST /_cachepush/push/v1/uploads"),
            "no grant was asked for: {}",
            gw.log_text()
        );
        let keys = s3.keys(&bucket, "");
        assert!(
            !keys.iter().any(|k| k.starts_with("_incoming/")),
            "{keys:?}"
        );
        // Nothing to send the second time: asked in bulk, answered present.
        let again = push_through(&gw.url(), &token, &top);
        assert!(again.status.success(), "{}", stderr_of(&again));
        assert_eq!(s3.keys(&bucket, ""), keys);

        // Rotation: the issuer now publishes only its new key.
        let new = SigningKey::new("k-2026-12");
        issuer.set_keys(&[&new]);
        // The gateway asks the issuer again for an unknown key at most once a second.
        std::thread::sleep(Duration::from_millis(1100));
        let top2 = build("", &unique("gwpush-rotated"));
        let rotated = push_through(
            &gw.url(),
            &new.token(&issuer.claims("acme/app", "refs/heads/main")),
            &top2,
        );
        assert!(rotated.status.success(), "{}", stderr_of(&rotated));
        let top3 = build("", &unique("gwpush-retired"));
        let retired = push_through(&gw.url(), &token, &top3);
        assert!(!retired.status.success(), "a retired key's token pushed");
        assert!(
            s3.head(&bucket, &format!("{}.narinfo", hash_of(&top3)))
                .is_none(),
            "published with a retired key's token"
        );

        // On GitHub Actions the client asks for the job's token itself, for its audience.
        *issuer.github.lock().unwrap() = new.token(&issuer.claims("acme/app", "refs/heads/main"));
        let top4 = build("", &unique("gwpush-github"));
        let mut gh = cachepush();
        gh.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env(
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                format!("{}/gh-token?api-version=2.0", issuer.url),
            )
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", GITHUB_REQUEST_TOKEN)
            .args(["copy", "--audience", AUDIENCE, "--to", &gw.url()])
            .arg(&top4);
        run_ok(&mut gh);
        assert!(
            s3.head(&bucket, &format!("{}.narinfo", hash_of(&top4)))
                .is_some()
        );

        // A pull request: into the quarantine, not the cache.
        let pr = new.token(&issuer.claims("acme/app", "refs/pull/7/merge"));
        let q = push_through(&gw.url(), &pr, &top3);
        assert!(q.status.success(), "{}", stderr_of(&q));
        assert!(stderr_of(&q).contains("quarantine"), "{}", stderr_of(&q));
        let h3 = hash_of(&top3);
        assert!(s3.head(&bucket, &format!("{h3}.narinfo")).is_none());
        let qtext =
            String::from_utf8(s3.get(&bucket, &format!("quarantine/{h3}.narinfo"))).unwrap();
        assert!(!qtext.contains("Sig:"), "a quarantined narinfo was signed");
        let denied = nix_via(&gw.url(), &tmp.path().join("nix3"), &top3, &pk, None);
        assert!(
            !denied.status.success(),
            "the quarantine was served as the cache"
        );
    }
}

/// Every refusal is a 401 or 403 before anything reaches the bucket, and the bucket's own
/// listing is unchanged; the acceptance cases (a good identity token, a push-scope
/// token, a grant used as granted) work on the same gateway.
#[test]
fn refused_pushers_write_nothing_to_the_bucket() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "gw-refuse-1");
    let (tk, _) = keygen(tmp.path(), "tokens-refuse-1");
    let revoked_file = tmp.path().join("revoked");
    std::fs::write(&revoked_file, "").unwrap();
    let bucket = s3.new_bucket("gwrefuse");
    let key = SigningKey::new("k1");
    let issuer = Issuer::start(&[&key]);
    let gw = push_gateway(
        &s3,
        &bucket,
        &sk,
        &issuer,
        &[
            "--token-key",
            tk.to_str().unwrap(),
            "--token-revocations",
            revoked_file.to_str().unwrap(),
            "--push-grant-ttl",
            "3",
        ],
    );
    let nar_key = format!("nar/{}.nar", "0".repeat(52));
    let ask = json!({"key": nar_key, "size": 10}).to_string();

    // Acceptance: a good token and a push-scope token both get a grant.
    let good = key.token(&issuer.claims("acme/app", "refs/heads/main"));
    let (st, body) = api(&gw, "POST", "uploads", &good, ask.as_bytes());
    assert_eq!(st, 200, "{body}");
    let push_token = issue_token(&tk, "push", "", "1d");
    assert_eq!(
        api(&gw, "POST", "uploads", &push_token, ask.as_bytes()).0,
        200
    );
    let grant: Value = serde_json::from_str(&body).unwrap();
    let url = grant["url"].as_str().unwrap().to_owned();
    // A grant is its owner's: another pusher cannot abort (or complete) it.
    let abort = format!("uploads/{}/abort", grant["id"].as_str().unwrap());
    assert_eq!(api(&gw, "POST", &abort, &push_token, b"").0, 404);
    // The grant is for exactly its key: the same signature on another key is refused.
    let elsewhere = url.replacen("/_incoming/", "/_elsewhere/", 1);
    assert_ne!(elsewhere, url);
    assert_eq!(put_url(&elsewhere, b"0123456789"), 403);
    assert_eq!(put_url(&url, b"0123456789"), 200, "the grant itself works");
    // Its owner can: the staged object goes with it.
    assert_eq!(api(&gw, "POST", &abort, &good, b"").0, 200);
    assert!(s3.head(&bucket, &url_key(&url, &bucket)).is_none());
    let before = s3.keys(&bucket, "");
    assert!(before.is_empty(), "{before:?}");
    // ...and not after it expires.
    let (_, late) = api(&gw, "POST", "uploads", &good, ask.as_bytes());
    let late: Value = serde_json::from_str(&late).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(put_url(late["url"].as_str().unwrap(), b"0123456789"), 403);

    let c = |repo: &str, r: &str| issuer.claims(repo, r);
    let mut expired = c("acme/app", "refs/heads/main");
    expired["exp"] = json!(now() - 3600);
    let mut early = c("acme/app", "refs/heads/main");
    early["nbf"] = json!(now() + 3600);
    let mut wrong_iss = c("acme/app", "refs/heads/main");
    wrong_iss["iss"] = json!("https://token.actions.githubusercontent.com");
    let mut wrong_aud = c("acme/app", "refs/heads/main");
    wrong_aud["aud"] = json!("someone-else");
    let forger = SigningKey::new("k1");
    let mut altered = good.clone().into_bytes();
    let i = altered.len() - 5;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    let none = format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "kid": "k1"}).to_string()),
        B64.encode(c("acme/app", "refs/heads/main").to_string())
    );
    let hs256 = key.token_with_header(
        &json!({"alg": "HS256", "kid": "k1"}),
        &c("acme/app", "refs/heads/main"),
    );
    let revoked = issue_token(&tk, "push", "", "1d");
    let revoked_id = tmp.path().join("revoked.token");
    std::fs::write(&revoked_id, &revoked).unwrap();
    run_ok(
        cachepush()
            .args(["token", "revoke", "--revocations"])
            .arg(&revoked_file)
            .arg("--token-file")
            .arg(&revoked_id),
    );
    std::thread::sleep(Duration::from_secs(6)); // the list is reread within 5 s
    let cases: Vec<(&str, String, u16)> = vec![
        ("no token", String::new(), 401),
        ("expired", key.token(&expired), 401),
        ("not yet valid", key.token(&early), 401),
        ("another issuer", key.token(&wrong_iss), 401),
        ("another audience", key.token(&wrong_aud), 403),
        (
            "another repository",
            key.token(&c("evil/app", "refs/heads/main")),
            403,
        ),
        (
            "a forged key",
            forger.token(&c("acme/app", "refs/heads/main")),
            401,
        ),
        ("an altered token", String::from_utf8(altered).unwrap(), 401),
        ("alg none", none, 401),
        ("alg HS256", hs256, 401),
        ("a pull-only token", issue_token(&tk, "pull", "", "1d"), 403),
        (
            "a token for another cache",
            issue_token(&tk, "push", "other", "1d"),
            403,
        ),
        ("a revoked token", revoked, 401),
    ];
    for (what, token, want) in &cases {
        for (method, path, body) in [
            ("POST", "uploads", ask.as_str()),
            ("POST", "missing", r#"{"hashes": []}"#),
            ("POST", "narinfo", "StorePath: /nix/store/x"),
        ] {
            let (st, text) = api(&gw, method, path, token, body.as_bytes());
            assert_eq!(st, *want, "{what} on {path}: {text}");
        }
    }
    // The same through the client: it fails, naming why, and writes nothing.
    let top = build("", &unique("gwrefuse"));
    let out = push_through(&gw.url(), &key.token(&expired), &top);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("expired"), "{}", stderr_of(&out));
    assert_eq!(
        s3.keys(&bucket, ""),
        before,
        "a refused pusher wrote to the bucket"
    );
    assert_eq!(
        s3.open_uploads(&bucket, "").len(),
        0,
        "a refused pusher started an upload"
    );
    let log = gw.log_text();
    for (_, token, _) in &cases {
        if !token.is_empty() {
            assert!(!log.contains(token.as_str()), "a refused token was logged");
        }
    }
}

/// The object key a presigned URL of a path-style bucket names.
fn url_key(url: &str, bucket: &str) -> String {
    let path = url.split('?').next().unwrap();
    path.split(&format!("/{bucket}/"))
        .nth(1)
        .unwrap()
        .to_owned()
}

fn sha256_nix32(data: &[u8]) -> String {
    cachepush::format::Sha256::digest(data).nix32()
}

fn narinfo(
    path: &str,
    url: &str,
    compression: &str,
    file: &[u8],
    nar: &[u8],
    refs: &str,
) -> String {
    format!(
        "StorePath: /nix/store/{path}\nURL: {url}\nCompression: {compression}\nFileHash: sha256:{}\nFileSize: {}\nNarHash: sha256:{}\nNarSize: {}\nReferences: {refs}\n",
        sha256_nix32(file),
        file.len(),
        sha256_nix32(nar),
        nar.len()
    )
}

/// Submits a narinfo for publishing: status and body.
fn publish(gw: &Gateway, token: &str, text: &str) -> (u16, String) {
    api(gw, "POST", "narinfo", token, text.as_bytes())
}

/// Grants, uploads and completes `file` for `key`; returns the grant id.
fn upload(gw: &Gateway, token: &str, key: &str, file: &[u8]) -> String {
    let (st, body) = api(
        gw,
        "POST",
        "uploads",
        token,
        json!({"key": key, "size": file.len()})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(st, 200, "{body}");
    let g: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(put_url(g["url"].as_str().unwrap(), file), 200);
    let id = g["id"].as_str().unwrap().to_owned();
    let (st, body) = api(
        gw,
        "POST",
        &format!("uploads/{id}/complete"),
        token,
        br#"{"etags": []}"#,
    );
    assert_eq!(st, 200, "{body}");
    id
}

/// A pusher that lies about a NAR (its NarHash, its FileSize) or publishes a narinfo
/// whose references are not in the cache gets an error naming the path; nothing is
/// signed or published for it or its dependents, and the bucket keeps nothing of it.
#[test]
fn a_pusher_that_lies_gets_the_path_named_and_nothing_published() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "gw-liar-1");
    let bucket = s3.new_bucket("gwliar");
    let key = SigningKey::new("k1");
    let issuer = Issuer::start(&[&key]);
    let gw = push_gateway(&s3, &bucket, &sk, &issuer, &[]);
    let token = key.token(&issuer.claims("acme/app", "refs/heads/main"));
    let h = |c: char| c.to_string().repeat(32);

    // Acceptance: an honest zstd NAR and its narinfo are published and signed.
    let nar = b"honest nar bytes, any bytes will do for the gateway's hash check".repeat(100);
    let file = zstd::encode_all(&nar[..], 3).unwrap();
    let honest_key = format!("nar/{}.nar.zst", sha256_nix32(&nar));
    upload(&gw, &token, &honest_key, &file);
    let honest = format!("{}-honest", h('a'));
    let (st, body) = publish(
        &gw,
        &token,
        &narinfo(&honest, &honest_key, "zstd", &file, &nar, ""),
    );
    assert_eq!(st, 200, "{body}");
    let published = String::from_utf8(s3.get(&bucket, &format!("{}.narinfo", h('a')))).unwrap();
    assert!(published.contains("Sig: gw-liar-1:"), "{published}");
    // A second narinfo for the same path, with other bytes, replaces nothing.
    let swap = b"other bytes for a path that is already published".to_vec();
    let swap_key = format!("nar/{}.nar", sha256_nix32(&swap));
    upload(&gw, &token, &swap_key, &swap);
    let (st, body) = publish(
        &gw,
        &token,
        &narinfo(&honest, &swap_key, "none", &swap, &swap, ""),
    );
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"already\":true"), "{body}");
    let after = String::from_utf8(s3.get(&bucket, &format!("{}.narinfo", h('a')))).unwrap();
    assert_eq!(after, published, "a published narinfo was replaced");

    // A NAR that decompresses to something else than its NarHash says.
    let other = b"what the narinfo claims the NAR is".repeat(10);
    let lie_nar = format!("nar/{}.nar.zst", sha256_nix32(&other));
    upload(&gw, &token, &lie_nar, &file);
    let liar = format!("{}-liar", h('b'));
    let (st, body) = publish(
        &gw,
        &token,
        &narinfo(&liar, &lie_nar, "zstd", &file, &other, ""),
    );
    assert_eq!(st, 422, "{body}");
    assert!(body.contains(&liar), "the error names the path: {body}");

    // The same lie with the NAR sent along with its narinfo.
    let along = json!({
        "narinfo": narinfo(&format!("{}-along", h('f')), &lie_nar, "zstd", &file, &other, ""),
        "nar": base64::engine::general_purpose::STANDARD.encode(&file),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (st, body) = rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{}/_cachepush/push/v1/narinfo", gw.addr))
            .bearer_auth(&token)
            .header("Content-Type", "application/json")
            .body(along.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("-along"), "{body}");

    // A FileSize that is not the upload's.
    let small = b"a small nar".to_vec();
    let size_key = format!("nar/{}.nar", sha256_nix32(&small));
    upload(&gw, &token, &size_key, &small);
    let sizer = format!("{}-sizer", h('c'));
    let text = narinfo(&sizer, &size_key, "none", &small, &small, "").replace(
        &format!("FileSize: {}", small.len()),
        &format!("FileSize: {}", small.len() + 1),
    );
    let (st, body) = publish(&gw, &token, &text);
    assert_eq!(st, 422, "{body}");
    assert!(body.contains(&sizer), "{body}");

    // References that are not in the cache: the liar's, and one never pushed.
    let dep_nar = b"a dependent".to_vec();
    let dep_key = format!("nar/{}.nar", sha256_nix32(&dep_nar));
    upload(&gw, &token, &dep_key, &dep_nar);
    let dependent = format!("{}-dependent", h('d'));
    let (st, body) = publish(
        &gw,
        &token,
        &narinfo(&dependent, &dep_key, "none", &dep_nar, &dep_nar, &liar),
    );
    assert_eq!(st, 409, "{body}");
    assert!(body.contains(&dependent) && body.contains(&liar), "{body}");

    // What is left: the honest path, its NAR and nix-cache-info; nothing staged.
    let keys = s3.keys(&bucket, "");
    assert_eq!(
        keys,
        vec![
            format!("{}.narinfo", h('a')),
            honest_key.clone(),
            "nix-cache-info".to_owned()
        ],
        "the liars left objects behind"
    );
    run_ok(
        command("verify", Some(&s3))
            .arg(s3.url(&bucket, ""))
            .args(["--trusted-key", &pk]),
    );
}

/// A 600 MiB NAR pushed through a gateway behind a proxy that refuses request bodies
/// over 100 MiB: the NAR goes to the bucket on presigned part URLs, never through the
/// proxy, and the gateway checks and publishes it.
#[test]
fn a_600_mib_nar_goes_past_a_proxy_that_refuses_bodies_over_100_mib() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "gw-big-1");
    let bucket = s3.new_bucket("gwbig");
    let key = SigningKey::new("k1");
    let issuer = Issuer::start(&[&key]);
    let gw = push_gateway(&s3, &bucket, &sk, &issuer, &[]);
    let proxy = FaultProxy::start(&format!("http://{}", gw.addr));
    proxy.add(Rule {
        method: "*",
        target: "/",
        times: usize::MAX,
        fault: Fault::BodyOver(100 << 20),
    });
    let token = key.token(&issuer.claims("acme/app", "refs/heads/main"));
    // The proxy's limit is real: a 101 MiB body through it is refused (with a 413, or
    // by closing the connection before the body is read, as nginx may).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/_cachepush/push/v1/missing", proxy.endpoint()))
            .bearer_auth(&token)
            .body(vec![b' '; 101 << 20])
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert!(!matches!(answer, Ok(200)), "{answer:?}");
    assert_eq!(proxy.log().iter().filter(|l| l.status == 413).count(), 1);

    let top = build_big(&unique("gwbig"), 600);
    let out = push_through(&proxy.endpoint(), &token, &top);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr_of(&out),
        gw.log_text()
    );
    run_ok(
        command("verify", Some(&s3))
            .arg(s3.url(&bucket, ""))
            .args(["--trusted-key", &pk]),
    );
    let keys = s3.keys(&bucket, "");
    assert_eq!(
        narinfo_keys(&keys).len(),
        closure_of(&top).len(),
        "{keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.starts_with("_incoming/")),
        "{keys:?}"
    );
    assert!(s3.open_uploads(&bucket, "").is_empty());
    // Only the deliberate request was refused: the NAR bytes went around the proxy.
    assert_eq!(proxy.log().iter().filter(|l| l.status == 413).count(), 1);
}
