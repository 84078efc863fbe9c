//! Hostile input to the parsers, on the stable toolchain and inside the normal test run:
//! - a corpus of malformed narinfos and keys, each with the error it must give;
//! - property tests: `parse(render(x)) == x` for generated narinfos;
//! - a bounded mutation fuzzer over the committed seed corpus (`fuzz/corpus/`), for every
//!   parser a client or a bucket can feed: narinfo, store paths, keys, nix-cache-info,
//!   cache URLs, gateway request paths, credentials, htpasswd and tokens files.
//!   The seed is printed; `CACHEPUSH_FUZZ_SEED` replays a run, `CACHEPUSH_FUZZ_SECS` sets
//!   the time per target (default 3). The cargo-fuzz targets in `fuzz/` go deeper.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use cachepush::format::{CacheInfo, NarInfo, PublicKey, SecretKey, Signature, StoreDir, StorePath};
use cachepush::gateway::auth::{Auth, parse_htpasswd, parse_tokens};
use cachepush::gateway::route::Route;
use cachepush::target::TargetUrl;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GOOD: &str = "StorePath: /nix/store/0zmlp8zf0ryq8vcpzbqbzgncrnn1q1xa-hello-2.12
URL: nar/1bb7q10qimpar3z3hac26xxhyvis7j1pq8891b9a99y5zmy4zsv9.nar.zst
Compression: zstd
FileHash: sha256:0jj27m408zd48pycbms0sh61krv3ddxnj0zglmxqnyfmw1bcdajq
FileSize: 6374766
NarHash: sha256:1bb7q10qimpar3z3hac26xxhyvis7j1pq8891b9a99y5zmy4zsv9
NarSize: 25166376
References: 0zmlp8zf0ryq8vcpzbqbzgncrnn1q1xa-hello-2.12 2dxdhisrzis8v6j9fd96v23m5wc328a3-small
Deriver: 7bhlk19gmzasnkmwd98b6gns11g5qxdv-hello-2.12.drv
Sig: cache.example.org-1:Uf80yJWrcyVU6PtP8e9iuO3jC0bKZE2vht3lJQu64dpz7STN6VnnkQiAkAR4cJylYEB6oxSnElt4DYuu+9w8AA==
";

#[test]
fn the_good_narinfo_parses() {
    let ni = NarInfo::parse(GOOD).unwrap();
    assert_eq!(ni.to_string(), GOOD);
}

/// Each malformed narinfo is refused, and the error names the line and the problem.
#[test]
fn malformed_narinfos_give_the_expected_errors() {
    let line = |n: usize| GOOD.lines().nth(n - 1).unwrap().to_owned();
    let without = |n: usize| {
        GOOD.lines()
            .enumerate()
            .filter(|(i, _)| *i != n - 1)
            .map(|(_, l)| format!("{l}\n"))
            .collect::<String>()
    };
    let replace = |n: usize, with: &str| GOOD.replace(&line(n), with);
    let cases: Vec<(String, &str)> = vec![
        (without(1), "StorePath"),
        (without(2), "URL"),
        (without(6), "NarHash"),
        (without(7), "NarSize"),
        (format!("{GOOD}{}\n", line(3)), "line 11"),
        (replace(1, "StorePath: /nix/store/short-hello"), "line 1"),
        (replace(1, "StorePath: /etc/passwd"), "line 1"),
        (replace(6, "NarHash: sha256:xyz"), "line 6"),
        (
            replace(
                6,
                "NarHash: md5:1bb7q10qimpar3z3hac26xxhyvis7j1pq8891b9a99y5zmy4zsv9",
            ),
            "line 6",
        ),
        (replace(7, "NarSize: -1"), "line 7"),
        (replace(7, "NarSize: 12x"), "line 7"),
        (replace(5, "FileSize: 99999999999999999999999"), "line 5"),
        (replace(8, "References: ../../etc"), "line 8"),
        (replace(10, "Sig: no-colon-here"), "line 10"),
        (replace(10, "Sig: k:!!!notbase64"), "line 10"),
        (GOOD.replace("URL: ", "URL:"), "line 2"),
        (format!("{GOOD}Garbage without colon\n"), "line 11"),
        (String::new(), "StorePath"),
    ];
    for (text, want) in cases {
        let e = NarInfo::parse(&text).expect_err(&format!("accepted:\n{text}"));
        let msg = e.to_string();
        assert!(
            msg.contains(want),
            "{msg:?} does not mention {want:?} for:\n{text}"
        );
        assert!(msg.starts_with("narinfo line "), "{msg}");
    }
}

#[test]
fn malformed_keys_give_the_expected_errors() {
    let good_secret = SecretKey::generate("k-1").unwrap().to_file_text();
    let (name, b64) = good_secret.split_once(':').unwrap();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "is empty"),
        ("nocolon".into(), "no ':'"),
        (format!(":{b64}"), "the key name is empty"),
        (format!("bad name:{b64}"), "whitespace"),
        (format!("{name}:***"), "not valid base64"),
        (format!("{name}:{}", &b64[..40]), "truncated"),
    ];
    for (text, want) in &cases {
        let e = SecretKey::parse(text).expect_err(text).to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    // The public half of a secret key, swapped: caught, not silently accepted.
    let other = SecretKey::generate("k-1").unwrap().to_file_text();
    let mut bytes = base64_decode(b64);
    let other_bytes = base64_decode(other.split_once(':').unwrap().1);
    bytes[32..].copy_from_slice(&other_bytes[32..]);
    let mixed = format!("{name}:{}", base64_encode(&bytes));
    let e = SecretKey::parse(&mixed).unwrap_err().to_string();
    assert!(e.contains("public half does not match"), "{e}");
    // And a public key given where a secret key belongs says so.
    let public = SecretKey::parse(&good_secret).unwrap().public().to_string();
    let e = SecretKey::parse(&public).unwrap_err().to_string();
    assert!(e.contains("this is a public key"), "{e}");
    assert!(PublicKey::parse(&public).is_ok());
    assert!(PublicKey::parse(&good_secret).is_err());
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

fn nix32(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| NIX32[rng.random_range(0..32)] as char)
        .collect()
}

fn name(rng: &mut StdRng) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=";
    let len = rng.random_range(1..40);
    let mut s: String = (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect();
    if s.starts_with('.') {
        s.insert(0, 'x');
    }
    s
}

/// Random valid narinfos render to text that parses back to the same value.
#[test]
fn narinfo_parse_render_round_trips() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let key = SecretKey::generate("prop-1").unwrap();
    for i in 0..2000 {
        let path = |rng: &mut StdRng| {
            StorePath::from_base_name(&format!("{}-{}", nix32(rng, 32), name(rng))).unwrap()
        };
        let store_path = path(&mut rng);
        let mut references: Vec<StorePath> = (0..rng.random_range(0..6))
            .map(|_| path(&mut rng))
            .collect();
        references.sort();
        references.dedup();
        let compression = ["zstd", "xz", "none", "bzip2"][rng.random_range(0..4)].to_owned();
        let text = format!(
            "StorePath: /nix/store/{store_path}\nURL: nar/{}.nar\nCompression: {compression}\nNarHash: sha256:{}\nNarSize: {}\nReferences: {}\n",
            nix32(&mut rng, 52),
            cachepush::format::nix32::encode(&rng.random::<[u8; 32]>()),
            rng.random_range(0..u64::MAX / 2),
            references
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        );
        let mut ni =
            NarInfo::parse(&text).unwrap_or_else(|e| panic!("seed {seed} case {i}: {e}\n{text}"));
        if rng.random_bool(0.5) {
            ni.sign(&key);
        }
        if rng.random_bool(0.5) {
            ni.deriver = Some(
                StorePath::from_base_name(&format!(
                    "{}-{}.drv",
                    nix32(&mut rng, 32),
                    name(&mut rng)
                ))
                .unwrap(),
            );
        }
        let rendered = ni.to_string();
        let again = NarInfo::parse(&rendered)
            .unwrap_or_else(|e| panic!("seed {seed} case {i}: {e}\n{rendered}"));
        assert_eq!(again, ni, "seed {seed} case {i}");
        assert_eq!(again.to_string(), rendered);
        if !ni.sigs.is_empty() {
            assert!(again.is_signed_by_any(&[key.public()]));
        }
    }
}

fn seed() -> u64 {
    let s = std::env::var("CACHEPUSH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("fuzz seed {s} (replay with CACHEPUSH_FUZZ_SEED={s})");
    s
}

fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(dir);
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .collect();
    assert!(!v.is_empty(), "empty corpus {}", d.display());
    v.push(Vec::new());
    v
}

const INTERESTING: &[&[u8]] = &[
    b"\n",
    b":",
    b": ",
    b"/",
    b"..",
    b"%2e%2e",
    b"\0",
    b"\xff\xfe",
    b"sha256:",
    b"nar/",
    b"Sig: ",
    b"StorePath: ",
    b"References: ",
    b"9999999999999999999999",
    b"-1",
    b"=",
    b"\r\n",
    "é".as_bytes(),
    b"/nix/store/",
    b"-",
    b"==",
    b" ",
];

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..6) {
        let at = if d.is_empty() {
            0
        } else {
            rng.random_range(0..=d.len())
        };
        match rng.random_range(0..7) {
            0 if !d.is_empty() => {
                let i = rng.random_range(0..d.len());
                d[i] ^= 1 << rng.random_range(0..8);
            }
            1 => d.insert(at, rng.random()),
            2 if !d.is_empty() => {
                let end = (at + rng.random_range(1..16)).min(d.len());
                d.drain(at.min(end)..end);
            }
            3 => {
                let s = INTERESTING[rng.random_range(0..INTERESTING.len())];
                d.splice(at..at, s.iter().copied());
            }
            4 => d.truncate(at),
            5 => {
                // Splice in a slice of another seed (lines from one narinfo into another).
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let a = rng.random_range(0..other.len());
                    let b = rng.random_range(a..=other.len());
                    d.splice(at..at, other[a..b].iter().copied());
                }
            }
            _ => {
                // Duplicate a line.
                if let Some(line) = d.split(|&b| b == b'\n').nth(rng.random_range(0..4)) {
                    let line = [line, b"\n"].concat();
                    d.splice(at..at, line);
                }
            }
        }
    }
    d
}

/// Runs `check` on mutated inputs for the configured time; a panic is a failure that
/// prints the input that caused it.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, check: impl Fn(&[u8])) {
    let secs = std::env::var("CACHEPUSH_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    for s in &seeds {
        check(s);
    }
    while Instant::now() < deadline {
        for _ in 0..256 {
            let input = mutate(&mut rng, &seeds);
            if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
                panic!(
                    "{name}: panic on input {:?} (seed {seed})",
                    String::from_utf8_lossy(&input)
                );
            }
            n += 1;
        }
    }
    eprintln!("{name}: {n} inputs, no panic");
    assert!(n > 1000, "{name}: too few inputs ({n}) to mean anything");
}

fn text(d: &[u8]) -> Option<&str> {
    std::str::from_utf8(d).ok()
}

#[test]
fn fuzz_narinfo() {
    fuzz("narinfo", corpus("narinfo"), |d| {
        if let Some(ni) = text(d).and_then(|t| NarInfo::parse(t).ok()) {
            let r = ni.to_string();
            assert_eq!(NarInfo::parse(&r).as_ref(), Ok(&ni), "round trip of {r:?}");
        }
    });
}

#[test]
fn fuzz_store_paths_and_cache_urls() {
    let mut seeds = corpus("store_path");
    seeds.push(b"s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1".to_vec());
    seeds.push(b"file:///srv/cache?compression=xz".to_vec());
    fuzz("store paths and URLs", seeds, |d| {
        let Some(t) = text(d) else { return };
        if let Ok(p) = StorePath::from_base_name(t) {
            assert_eq!(p.to_string(), t);
        }
        let _ = StoreDir::default().parse_path(t);
        // Whatever parses names something usable: an absolute directory, or a bucket
        // name without a slash and a prefix without empty segments at its ends; and
        // parsing the same text twice gives the same answer.
        if let Ok(u) = TargetUrl::parse(t) {
            match &u {
                TargetUrl::File { dir, .. } => assert!(dir.is_absolute(), "{t}: {dir:?}"),
                TargetUrl::S3 { bucket, prefix, .. } => {
                    assert!(!bucket.is_empty() && !bucket.contains('/'), "{t}");
                    assert!(!prefix.starts_with('/') && !prefix.ends_with('/'), "{t}");
                }
                TargetUrl::Gateway { base, .. } => {
                    assert!(base.starts_with("http") && !base.ends_with('/'), "{t}");
                    assert!(!base.contains('@') && !base.contains('?'), "{t}");
                }
            }
            assert_eq!(TargetUrl::parse(t).ok(), Some(u), "{t}");
        }
    });
}

#[test]
fn fuzz_keys_and_signatures() {
    fuzz("keys", corpus("keys"), |d| {
        let Some(t) = text(d) else { return };
        if let Ok(k) = SecretKey::parse(t) {
            // The secret is everything after the name; Debug may show the name (which a
            // mutated input can make contain the same text), never the secret.
            let (_, secret) = t.trim().split_once(':').expect("a parsed key has a colon");
            let shown = format!("{k:?}").replace(k.name(), "");
            assert!(!shown.contains(secret), "{shown}");
        }
        if let Ok(k) = PublicKey::parse(t) {
            assert_eq!(PublicKey::parse(&k.to_string()).ok(), Some(k));
        }
        if let Ok(s) = Signature::parse(t) {
            assert_eq!(Signature::parse(&s.to_string()).ok(), Some(s));
        }
    });
}

#[test]
fn fuzz_cache_info() {
    fuzz("nix-cache-info", corpus("cache_info"), |d| {
        if let Some(c) = text(d).and_then(|t| CacheInfo::parse(t).ok()) {
            assert_eq!(CacheInfo::parse(&c.to_string()).ok(), Some(c));
        }
    });
}

#[test]
fn fuzz_gateway_paths_and_credentials() {
    let hash = "0zmlp8zf0ryq8vcpzbqbzgncrnn1q1xa";
    let seeds = vec![
        format!("/{hash}.narinfo").into_bytes(),
        b"/nar/1bb7q10qimpar3z3hac26xxhyvis7j1pq8891b9a99y5zmy4zsv9.nar.zst".to_vec(),
        format!("/log/{hash}-hello.drv").into_bytes(),
        b"/nix-cache-info".to_vec(),
        b"Basic YWxpY2U6cHc=".to_vec(),
        b"Bearer 0123456789abcdef0123".to_vec(),
        b"alice:$2y$05$abcdefghijklmnopqrstuuJ1yMWVhTTRrRUxaWDZ6eVZ2WnVLSmlk\n".to_vec(),
    ];
    let hash_pw = bcrypt::hash("pw", 4).unwrap();
    let auth = Auth::new(
        parse_htpasswd("t", &format!("alice:{hash_pw}\n")).unwrap(),
        parse_tokens("t", "0123456789abcdef0123\n").unwrap(),
    );
    fuzz("gateway", seeds, |d| {
        if let Some(t) = text(d) {
            if let Ok(r) = Route::parse(t) {
                // Whatever is accepted maps to a key inside the cache, never outside it.
                if let Some(k) = r.object_key() {
                    assert!(
                        !k.starts_with('/')
                            && k.split('/')
                                .all(|seg| !seg.is_empty() && seg != "." && seg != ".."),
                        "{k}"
                    );
                }
            }
            // Whatever parses renders back to a file that parses to the same entries.
            if let Ok(users) = parse_htpasswd("f", t) {
                let rendered: String = users.iter().map(|(u, h)| format!("{u}:{h}\n")).collect();
                assert_eq!(parse_htpasswd("f", &rendered).unwrap(), users);
            }
            let _ = parse_tokens("f", t);
        }
        // Cached answers only: a bcrypt per input would make this a benchmark of bcrypt.
        // Nothing was verified with a password here, so the only credentials that may be
        // let in are the token's own two forms: anything else accepted is a bypass.
        if auth.check_cached(Some(d)) == Some(true) {
            assert!(
                carries_token(d, "0123456789abcdef0123"),
                "accepted without the token: {:?}",
                String::from_utf8_lossy(d)
            );
        }
    });
    assert_eq!(
        auth.check_cached(Some(b"Bearer 0123456789abcdef0123")),
        Some(true)
    );
}

/// The fuzz oracle for authentication, written apart from the gateway's code: `Bearer
/// TOKEN` (any case of the scheme), or Basic auth whose password is the token.
fn carries_token(d: &[u8], token: &str) -> bool {
    use base64::Engine;
    let Ok(h) = std::str::from_utf8(d) else {
        return false;
    };
    let h = h.trim();
    let Some((scheme, value)) = h.split_once(' ') else {
        return false;
    };
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return value == token;
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(value) else {
        return false;
    };
    decoded
        .iter()
        .position(|&b| b == b':')
        .is_some_and(|i| &decoded[i + 1..] == token.as_bytes())
}

/// Found by the mutation fuzzer: a key whose name repeats its own secret text. Debug shows
/// the name, and must still not show the secret part.
#[test]
fn a_key_name_that_repeats_the_secret_does_not_make_debug_show_it() {
    let secret =
        "3hZGvia8I+99UDEPTK+5pcthoM6c0QTJOxrELqFk5OqGHaa/ZlKSHz/T/ki7rvnQ83gsWszE1Y1VZb09syTvtw==";
    let t = format!("a-1>{secret}a-1:{secret}");
    let k = SecretKey::parse(&t).expect("any name before the first colon is accepted");
    assert_eq!(k.name(), format!("a-1>{secret}a-1"));
    let shown = format!("{k:?}").replace(k.name(), "");
    assert!(!shown.contains(secret), "{shown}");
    // The plain case, for comparison: the secret is not shown either.
    let plain = SecretKey::parse(&format!("a-1:{secret}")).unwrap();
    assert!(!format!("{plain:?}").contains(secret));
}
