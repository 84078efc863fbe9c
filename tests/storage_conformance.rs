//! One conformance suite for every storage backend: a local directory, SeaweedFS and Ceph
//! RADOS Gateway. The push pipeline relies on exactly these semantics (see storage/mod.rs).

mod common;

use bytes::Bytes;
use cachepush::storage::{
    ByteRange, LocalDir, S3Bucket, S3Config, Staged, Storage, StreamOutcome, content_type,
};
use common::s3::{REGION, S3};
use futures::TryStreamExt;
use tokio::sync::mpsc;

/// Streams `data` into `stage` in pieces of `chunk` bytes, as the NAR producer does.
async fn stage<S: Storage>(s: &S, key: &str, data: &[u8], chunk: usize) -> S::Staged {
    let (tx, rx) = mpsc::channel(4);
    let owned = Bytes::copy_from_slice(data);
    let feeder = tokio::spawn(async move {
        for i in (0..owned.len()).step_by(chunk) {
            let end = (i + chunk).min(owned.len());
            if tx.send(owned.slice(i..end)).await.is_err() {
                return;
            }
        }
    });
    let staged = s
        .stage(key, content_type::NAR, data.len() as u64, rx)
        .await
        .expect("stage");
    feeder.await.expect("feeder");
    staged
}

/// Bytes that are not all alike, so a part boundary bug shows in the comparison.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 4093) as u8).collect()
}

async fn conformance<S: Storage>(s: &S, name: &str) {
    // Absent objects.
    assert_eq!(s.head("nope").await.unwrap(), None, "{name}: head absent");
    assert!(s.get("nope").await.unwrap().is_none(), "{name}: get absent");

    // put, then get and head see the whole object; put replaces it.
    s.put(
        "a.narinfo",
        content_type::NARINFO,
        Bytes::from_static(b"one"),
    )
    .await
    .unwrap();
    assert_eq!(s.head("a.narinfo").await.unwrap(), Some(3), "{name}");
    assert_eq!(&s.get("a.narinfo").await.unwrap().unwrap()[..], b"one");
    s.put(
        "a.narinfo",
        content_type::NARINFO,
        Bytes::from_static(b"second"),
    )
    .await
    .unwrap();
    assert_eq!(&s.get("a.narinfo").await.unwrap().unwrap()[..], b"second");

    // put_if_absent creates once and never replaces.
    let first = s
        .put_if_absent(
            "nix-cache-info",
            content_type::CACHE_INFO,
            Bytes::from_static(b"StoreDir: /nix/store\n"),
        )
        .await
        .unwrap();
    let again = s
        .put_if_absent(
            "nix-cache-info",
            content_type::CACHE_INFO,
            Bytes::from_static(b"StoreDir: /other\n"),
        )
        .await
        .unwrap();
    assert!(first && !again, "{name}: put_if_absent {first} {again}");
    assert_eq!(
        &s.get("nix-cache-info").await.unwrap().unwrap()[..],
        b"StoreDir: /nix/store\n",
        "{name}: put_if_absent replaced the object"
    );

    // A staged upload is invisible until committed; small and multipart alike.
    for (key, size) in [("nar/small.nar", 1000usize), ("nar/large.nar", 11 << 20)] {
        let data = pattern(size);
        let staged = stage(s, key, &data, 1 << 20).await;
        assert_eq!(
            s.head(key).await.unwrap(),
            None,
            "{name}: {key} visible before commit"
        );
        assert_eq!(staged.commit().await.unwrap(), size as u64, "{name}: {key}");
        assert_eq!(s.head(key).await.unwrap(), Some(size as u64), "{name}");
        let got = s.get(key).await.unwrap().unwrap();
        assert!(got[..] == data[..], "{name}: {key} bytes differ");
    }

    // Aborted or dropped uploads leave nothing behind.
    for (key, size) in [
        ("nar/ab-small.nar", 10usize),
        ("nar/ab-large.nar", 12 << 20),
    ] {
        let staged = stage(s, key, &pattern(size), 1 << 20).await;
        staged.abort().await;
        assert_eq!(
            s.head(key).await.unwrap(),
            None,
            "{name}: {key} after abort"
        );
    }
    let dropped = stage(s, "nar/dropped.nar", &pattern(12 << 20), 1 << 20).await;
    drop(dropped);
    // The dropped upload's abort runs in the background; abort_open_uploads (what Ctrl-C
    // calls) finishes it if it has not landed yet, and afterwards nothing is open.
    assert!(s.abort_open_uploads().await <= 1, "{name}");
    assert_eq!(s.abort_open_uploads().await, 0, "{name}: nothing left open");
    assert_eq!(s.head("nar/dropped.nar").await.unwrap(), None, "{name}");

    // list finds what was written (never used for correctness, but `verify` walks it).
    let mut keys = s.list("nar/").await.unwrap();
    keys.sort();
    assert_eq!(keys, vec!["nar/large.nar", "nar/small.nar"], "{name}");

    // The top-level listing (the plan's shortcut): keys in byte order across pages, the
    // nar/ folder left out, each page covering what it holds.
    for i in 0..5 {
        let key = format!("{i}{}.narinfo", "a".repeat(31));
        s.put(&key, content_type::NARINFO, Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    let mut expected: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .filter(|k| !k.contains('/'))
        .collect();
    expected.sort();
    assert!(expected.len() >= 5, "{name}: {expected:?}");
    match s.list_top_page(None, 2).await.unwrap() {
        None => assert!(name.starts_with("local"), "{name} cannot list"),
        Some(mut page) => {
            let mut listed = Vec::new();
            let mut covered: Option<String> = None;
            let mut pages = 1;
            loop {
                assert!(page.keys.len() <= 2, "{name}: {page:?}");
                if let Some(c) = &page.covered_to {
                    assert!(page.keys.iter().all(|k| k <= c), "{name}: {page:?}");
                    assert!(covered.as_ref().is_none_or(|p| p < c), "{name}: {page:?}");
                    covered = Some(c.clone());
                }
                listed.extend(page.keys);
                match page.next {
                    Some(next) => {
                        assert!(page.covered_to.is_some(), "{name}");
                        page = s.list_top_page(Some(next), 2).await.unwrap().unwrap();
                        pages += 1;
                    }
                    None => break,
                }
            }
            assert_eq!(listed, expected, "{name}");
            assert!(pages >= 3, "{name}: {pages} pages");
        }
    }

    // Ranged reads, as the gateway proxies them (RFC 9110 semantics, whatever the backend).
    s.put(
        "nar/ranged.nar",
        content_type::NAR,
        Bytes::from_static(b"0123456789"),
    )
    .await
    .unwrap();
    for (range, body, content_range) in [
        (None, "0123456789", None),
        (Some(ByteRange::FromTo(2, 4)), "234", Some("bytes 2-4/10")),
        (Some(ByteRange::FromTo(8, 100)), "89", Some("bytes 8-9/10")),
        (Some(ByteRange::From(7)), "789", Some("bytes 7-9/10")),
        (Some(ByteRange::Last(3)), "789", Some("bytes 7-9/10")),
        (
            Some(ByteRange::Last(30)),
            "0123456789",
            Some("bytes 0-9/10"),
        ),
    ] {
        let StreamOutcome::Found(o) = s.read_range("nar/ranged.nar", range).await.unwrap() else {
            panic!("{name}: {range:?} not found")
        };
        assert_eq!(o.length, Some(body.len() as u64), "{name}: {range:?}");
        assert_eq!(
            o.content_range.as_deref(),
            content_range,
            "{name}: {range:?}"
        );
        let got: Vec<u8> = o
            .body
            .try_fold(Vec::new(), |mut v, c| async move {
                v.extend_from_slice(&c);
                Ok(v)
            })
            .await
            .unwrap();
        assert_eq!(got, body.as_bytes(), "{name}: {range:?}");
    }
    assert!(
        matches!(
            s.read_range("nar/ranged.nar", Some(ByteRange::From(10)))
                .await,
            Ok(StreamOutcome::RangeNotSatisfiable)
        ),
        "{name}"
    );
    assert!(
        matches!(
            s.read_range("nar/absent.nar", None).await,
            Ok(StreamOutcome::NotFound)
        ),
        "{name}"
    );
    // A small object over its limit is refused rather than read; within it, read whole.
    assert!(s.get_limited("nar/ranged.nar", 9).await.is_err(), "{name}");
    assert_eq!(
        s.get_limited("nar/ranged.nar", 10)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"0123456789"[..]),
        "{name}"
    );
    assert_eq!(
        s.get_limited("nar/absent.nar", 10).await.unwrap(),
        None,
        "{name}"
    );
    s.check_health().await.unwrap();
    s.delete("nar/ranged.nar").await.unwrap();

    // list_meta: sizes, dates and tags; shallow leaves folders out, deep goes into them.
    for (k, body) in [
        ("lm0.narinfo", &b"narinfo"[..]),
        ("nar/lm0.nar", &b"a nar"[..]),
        ("cachepush/pins/lm.json", &b"{}"[..]),
    ] {
        s.put(k, content_type::NARINFO, Bytes::from_static(body))
            .await
            .unwrap();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let top = s.list_meta("lm", true).await.unwrap();
    let keys: Vec<&str> = top.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["lm0.narinfo"], "{name}");
    assert_eq!(top[0].size, 7, "{name}");
    assert!((top[0].modified - now).abs() < 300, "{name}: {top:?}");
    assert!(!top[0].etag.is_empty(), "{name}");
    let nars = s.list_meta("nar/lm", false).await.unwrap();
    assert_eq!(nars.len(), 1, "{name}: {nars:?}");
    assert_eq!(
        (nars[0].key.as_str(), nars[0].size),
        ("nar/lm0.nar", 5),
        "{name}"
    );
    // A rewrite with other bytes changes the tag (gc's index relies on it).
    s.put(
        "lm0.narinfo",
        content_type::NARINFO,
        Bytes::from_static(b"other!!"),
    )
    .await
    .unwrap();
    let again = s.list_meta("lm", true).await.unwrap();
    assert_ne!(again[0].etag, top[0].etag, "{name}");
    let pins = s.list_meta("cachepush/pins/", true).await.unwrap();
    assert_eq!(pins.len(), 1, "{name}: {pins:?}");
    assert!(
        s.list_meta("cachepush/", true).await.unwrap().is_empty(),
        "{name}"
    );
    for k in ["lm0.narinfo", "nar/lm0.nar", "cachepush/pins/lm.json"] {
        s.delete(k).await.unwrap();
    }

    // delete removes, and deleting what is absent is not an error.
    s.delete("nar/small.nar").await.unwrap();
    s.delete("nar/small.nar").await.unwrap();
    assert_eq!(s.head("nar/small.nar").await.unwrap(), None, "{name}");
}

#[tokio::test]
async fn local_directory_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = LocalDir::open(tmp.path()).unwrap();
    conformance(&dir, "local").await;
    // `list` hides temp files, so look at the directory itself: every aborted, dropped or
    // committed upload left no `.tmp-` file behind.
    let mut leftovers = Vec::new();
    let mut dirs = vec![tmp.path().to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                leftovers.push(e.path());
            }
        }
    }
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// Credentials reach the SDK the way they reach users': the standard variables.
fn set_credentials_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let get = |v: &str| {
            std::env::var(v).unwrap_or_else(|_| {
                panic!("{v} is not set; run scripts/test.sh, which starts the S3 servers")
            })
        };
        // SAFETY: std's environment functions hold a lock, and nothing in this test binary
        // reads the environment through libc directly while this runs.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", get("CACHEPUSH_TEST_ACCESS_KEY"));
            std::env::set_var("AWS_SECRET_ACCESS_KEY", get("CACHEPUSH_TEST_SECRET_KEY"));
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        }
    });
}

fn s3_conforms(server: S3) {
    set_credentials_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for prefix in ["", "some/prefix"] {
        let bucket = server.new_bucket("conf");
        let mut cfg = S3Config::new(&bucket);
        cfg.prefix = prefix.to_owned();
        cfg.endpoint = Some(server.endpoint.clone());
        cfg.region = Some(REGION.into());
        // The smallest part S3 allows, so that 11 MiB goes in three parts.
        cfg.part_size = 5 << 20;
        rt.block_on(async {
            let b = S3Bucket::connect(cfg).await.unwrap();
            conformance(&b, &format!("{} prefix {prefix:?}", server.name)).await;
        });
        let open = server.open_uploads(&bucket, "");
        assert!(
            open.is_empty(),
            "{}: uploads left open: {open:?}",
            server.name
        );
        // Everything went under the prefix.
        let all = server.keys(&bucket, "");
        assert!(
            !all.is_empty() && all.iter().all(|k| k.starts_with(prefix)),
            "{}: keys outside the prefix {prefix:?}: {all:?}",
            server.name
        );
    }
}

#[test]
fn seaweedfs_conforms() {
    s3_conforms(S3::seaweedfs());
}

#[test]
fn ceph_rgw_conforms() {
    s3_conforms(S3::ceph());
}
