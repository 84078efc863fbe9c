//! `cachepush verify`: checks a whole cache against the invariants every client relies on.
//!
//! - `nix-cache-info` exists and parses;
//! - every narinfo parses, and names the store path its key says;
//! - its NAR object exists with `FileSize` bytes;
//! - every reference has a narinfo (the closure is complete);
//! - with trusted keys given, a signature by one of them verifies;
//! - with `full`, the NAR's bytes hash to `FileHash`, and decompressed to `NarHash`/`NarSize`;
//! - no multipart upload is left open.
//!
//! Walking the cache uses a listing (the only way to find every narinfo); anything the
//! listing claims is missing is confirmed with a HEAD, since listings lag on some stores.

use std::collections::HashSet;
use std::io::Read;

use bytes::Bytes;
use futures::StreamExt;
use sha2::Digest;
use tokio::sync::mpsc;

use crate::format::{CacheInfo, NarInfo, PublicKey, Sha256, layout};
use crate::storage::{Storage, StorageError};

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub trusted: Vec<PublicKey>,
    pub full: bool,
    pub concurrency: usize,
}

/// One thing wrong, with the object it is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub key: String,
    pub problem: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub narinfos: usize,
    pub nars_checked: usize,
    pub open_uploads: usize,
    pub problems: Vec<Problem>,
    /// Checks the server could not do (an optional API it does not implement), and why.
    pub not_checked: Vec<String>,
}

impl VerifyReport {
    fn add(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            problem: problem.into(),
        });
    }
}

/// Checks the whole cache. Storage errors (the cache cannot be read at all) are errors;
/// everything wrong with its contents is a [`Problem`] in the report.
pub async fn verify<S: Storage>(
    storage: &S,
    opts: &VerifyOptions,
) -> Result<VerifyReport, StorageError> {
    let mut report = VerifyReport::default();
    match storage.get(layout::CACHE_INFO).await? {
        None => report.add("nix-cache-info", "missing: Nix will not use this cache"),
        Some(b) => {
            if let Err(e) = CacheInfo::parse(&String::from_utf8_lossy(&b)) {
                report.add("nix-cache-info", format!("unreadable: {e}"));
            }
        }
    }
    let keys = storage.list("").await?;
    let narinfo_keys: Vec<String> = keys
        .iter()
        .filter(|k| layout::narinfo_hash(k).is_some())
        .cloned()
        .collect();
    let listed: HashSet<String> = narinfo_keys
        .iter()
        .filter_map(|k| layout::narinfo_hash(k).map(str::to_owned))
        .collect();
    report.narinfos = narinfo_keys.len();
    let concurrency = opts.concurrency.max(1);
    let listed = &listed;
    let results = futures::stream::iter(narinfo_keys.into_iter().map(|key| async move {
        let r = check_one(storage, &key, listed, opts).await;
        (key, r)
    }))
    .buffer_unordered(concurrency)
    .collect::<Vec<_>>()
    .await;
    for (key, r) in results {
        let (problems, nar_checked) = r?;
        report.nars_checked += nar_checked as usize;
        for p in problems {
            report.add(key.clone(), p);
        }
    }
    // Listing open uploads is a check, not the cache itself: a server without the API
    // (501 NotImplemented) leaves that one check undone, and says so, rather than the
    // whole cache unchecked.
    let open = match storage.open_uploads().await {
        Err(StorageError::Unsupported { message, .. }) => {
            report.not_checked.push(format!(
                "open multipart uploads: the server does not list them ({message})"
            ));
            Vec::new()
        }
        other => other?,
    };
    for k in open {
        report.open_uploads += 1;
        report.add(
            k,
            "a multipart upload was left open (interrupted push); `cachepush verify --abort-open-uploads` or a lifecycle rule removes it",
        );
    }
    report
        .problems
        .sort_by(|a, b| a.key.cmp(&b.key).then(a.problem.cmp(&b.problem)));
    Ok(report)
}

async fn check_one<S: Storage>(
    storage: &S,
    key: &str,
    listed: &HashSet<String>,
    opts: &VerifyOptions,
) -> Result<(Vec<String>, bool), StorageError> {
    let mut problems = Vec::new();
    let Some(text) = storage.get(key).await? else {
        // Listed, then gone: deleted meanwhile. Not a problem of the cache.
        return Ok((problems, false));
    };
    let ni = match std::str::from_utf8(&text)
        .map_err(|e| e.to_string())
        .and_then(|t| NarInfo::parse(t).map_err(|e| e.to_string()))
    {
        Ok(ni) => ni,
        Err(e) => {
            problems.push(format!("unreadable narinfo: {e}"));
            return Ok((problems, false));
        }
    };
    let hash = layout::narinfo_hash(key).unwrap_or(key);
    if ni.store_path.hash_part() != hash {
        problems.push(format!(
            "describes {} but is stored under {hash}",
            ni.store_path
        ));
    }
    // A URL the backend refuses as a key (`../x`, `/x`) is this narinfo's problem, not a
    // reason to stop checking the rest of the cache (security review L12).
    let nar = match storage.head(&ni.url).await {
        Err(StorageError::Config(why)) => {
            problems.push(format!("its URL {:?} names no object: {why}", ni.url));
            None
        }
        other => Some(other?),
    };
    match nar {
        None => {}
        Some(None) => problems.push(format!("its NAR {} is missing", ni.url)),
        Some(Some(size)) => {
            if let Some(fs) = ni.file_size
                && fs != size
            {
                problems.push(format!(
                    "its NAR {} has {size} bytes, FileSize says {fs}",
                    ni.url
                ));
            }
        }
    }
    for r in &ni.references {
        if r.hash_part() == hash || listed.contains(r.hash_part()) {
            continue;
        }
        if storage.head(&layout::narinfo_of(r)).await?.is_none() {
            problems.push(format!("refers to {r}, which has no narinfo"));
        }
    }
    if !opts.trusted.is_empty() && !ni.is_signed_by_any(&opts.trusted) {
        let names: Vec<&str> = ni.sigs.iter().map(|s| s.key_name()).collect();
        problems.push(if names.is_empty() {
            "not signed".to_owned()
        } else {
            format!(
                "no valid signature by a trusted key (signed by: {})",
                names.join(", ")
            )
        });
    }
    let mut checked = false;
    if opts.full && nar.is_some() {
        checked = true;
        problems.extend(check_nar(storage, &ni).await?);
    }
    Ok((problems, checked))
}

/// Downloads the NAR, checks FileHash/FileSize on the bytes and NarHash/NarSize after
/// decompression, streaming: memory does not grow with the NAR.
async fn check_nar<S: Storage>(storage: &S, ni: &NarInfo) -> Result<Vec<String>, StorageError> {
    // A missing NAR is already reported as missing.
    Ok(check_nar_at(storage, &ni.url, ni, true).await?.problems)
}

/// What reading one NAR object found.
#[derive(Debug, Default)]
pub struct NarCheck {
    /// Each way the object differs from the narinfo; empty when it matches.
    pub problems: Vec<String>,
    pub found: bool,
    /// The tag of the bytes that were checked (the S3 ETag).
    pub etag: Option<String>,
    pub file_size: u64,
}

/// Reads the object at `key` and checks it against `ni`: FileHash and FileSize on its
/// bytes, and with `decompress` also NarHash and NarSize after decompressing, streaming
/// (memory does not grow with the NAR). For verify, and for the gateway's push API.
pub async fn check_nar_at<S: Storage>(
    storage: &S,
    key: &str,
    ni: &NarInfo,
    decompress: bool,
) -> Result<NarCheck, StorageError> {
    let mut problems = Vec::new();
    let stream = match storage.read_range(key, None).await? {
        crate::storage::StreamOutcome::Found(s) => s,
        _ => return Ok(NarCheck::default()),
    };
    let etag = stream.etag.clone();
    let mut body = stream.body;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let compression = ni.compression.clone();
    let decoder = decompress.then(|| {
        let limit = ni.nar_size;
        tokio::task::spawn_blocking(move || decompress_and_hash(&compression, rx, limit))
    });
    let mut file_hash = sha2::Sha256::new();
    let mut file_size = 0u64;
    let mut read_error = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                file_hash.update(&c);
                file_size += c.len() as u64;
                if decoder.is_some() && tx.send(c).await.is_err() {
                    break; // the decoder stopped: it says why
                }
            }
            Err(e) => {
                read_error = Some(e.to_string());
                break;
            }
        }
    }
    drop(tx);
    let done = |problems| NarCheck {
        problems,
        found: true,
        etag,
        file_size,
    };
    if let Some(e) = read_error {
        problems.push(format!("reading {}: {e}", ni.url));
        return Ok(done(problems));
    }
    let file_hash = Sha256::from_bytes(file_hash.finalize().into());
    if ni.file_hash.is_some_and(|h| h != file_hash) || ni.file_size.is_some_and(|s| s != file_size)
    {
        problems.push(format!(
            "{} hashes to {file_hash} ({file_size} bytes), FileHash/FileSize say otherwise",
            ni.url
        ));
    }
    let Some(decoder) = decoder else {
        return Ok(done(problems));
    };
    match decoder.await {
        Ok(Ok((nar_hash, nar_size))) => {
            if nar_hash != ni.nar_hash || nar_size != ni.nar_size {
                problems.push(format!(
                    "{} decompresses to {nar_hash} ({nar_size} bytes), NarHash says {} ({} bytes)",
                    ni.url, ni.nar_hash, ni.nar_size
                ));
            }
        }
        Ok(Err(e)) => problems.push(format!("{} does not decompress: {e}", ni.url)),
        Err(e) => problems.push(format!("{}: decoder failed: {e}", ni.url)),
    }
    Ok(done(problems))
}

/// A `Read` over chunks arriving on a channel.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

fn decompress_and_hash(
    compression: &str,
    rx: mpsc::Receiver<Bytes>,
    limit: u64,
) -> Result<(Sha256, u64), String> {
    let input = ChannelReader {
        rx,
        cur: Bytes::new(),
    };
    hash_decompressed(compression, input, limit)
}

/// SHA-256 and size of what `input` decompresses to; stops with an error past `limit`
/// bytes (the NarSize claimed), so that a small file that inflates without end costs no
/// more than the NAR it claims to be.
fn hash_decompressed(
    compression: &str,
    input: impl Read,
    limit: u64,
) -> Result<(Sha256, u64), String> {
    let mut reader = crate::compression::decoder(compression, input)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        if total > limit {
            return Err(format!(
                "it decompresses to more than the {limit} bytes of NarSize"
            ));
        }
    }
    Ok((Sha256::from_bytes(hasher.finalize().into()), total))
}

/// [`check_nar_at`] for a NAR file already in memory (the small NARs a push through the
/// gateway sends along with their narinfo): each way it differs from `ni`.
pub fn check_nar_bytes(file: &[u8], ni: &NarInfo, decompress: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let file_hash = Sha256::digest(file);
    let file_size = file.len() as u64;
    if ni.file_hash.is_some_and(|h| h != file_hash) || ni.file_size.is_some_and(|s| s != file_size)
    {
        problems.push(format!(
            "{} hashes to {file_hash} ({file_size} bytes), FileHash/FileSize say otherwise",
            ni.url
        ));
    }
    if decompress {
        match hash_decompressed(&ni.compression, file, ni.nar_size) {
            Ok((nar_hash, nar_size)) if nar_hash != ni.nar_hash || nar_size != ni.nar_size => {
                problems.push(format!(
                    "{} decompresses to {nar_hash} ({nar_size} bytes), NarHash says {} ({} bytes)",
                    ni.url, ni.nar_hash, ni.nar_size
                ))
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("{} does not decompress: {e}", ni.url)),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{SecretKey, StoreDir};
    use crate::storage::{LocalDir, content_type};

    /// A one-path cache written by hand (uncompressed NAR), signed by `key`; returns its
    /// narinfo text.
    async fn one_path_cache(s: &LocalDir, key: &SecretKey, refs: &[&str]) -> String {
        let nar = b"nix-archive-1 pretend".to_vec();
        let hash = Sha256::digest(&nar);
        let dir = StoreDir::default();
        let mut ni = NarInfo {
            store_path: dir
                .parse_path("/nix/store/h7jx3wrzn6m9vjl9604id854qx1xyqw6-hello")
                .unwrap(),
            store_dir: dir.clone(),
            url: format!("nar/{}.nar", hash.nix32()),
            compression: "none".into(),
            file_hash: Some(hash),
            file_size: Some(nar.len() as u64),
            nar_hash: hash,
            nar_size: nar.len() as u64,
            references: refs.iter().map(|r| dir.parse_path(r).unwrap()).collect(),
            deriver: None,
            system: None,
            sigs: vec![],
            ca: None,
            extra: vec![],
        };
        ni.sign(key);
        s.put(&ni.url, content_type::NAR, Bytes::from(nar))
            .await
            .unwrap();
        s.put(
            "nix-cache-info",
            content_type::CACHE_INFO,
            Bytes::from_static(b"StoreDir: /nix/store\n"),
        )
        .await
        .unwrap();
        let text = ni.to_string();
        s.put(
            "h7jx3wrzn6m9vjl9604id854qx1xyqw6.narinfo",
            content_type::NARINFO,
            Bytes::from(text.clone()),
        )
        .await
        .unwrap();
        text
    }

    fn opts(key: &SecretKey, full: bool) -> VerifyOptions {
        VerifyOptions {
            trusted: vec![key.public()],
            full,
            concurrency: 4,
        }
    }

    #[tokio::test]
    async fn a_whole_cache_passes_and_each_damage_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let s = LocalDir::open(tmp.path()).unwrap();
        let key = SecretKey::generate("v-1").unwrap();
        let text = one_path_cache(&s, &key, &[]).await;
        let r = verify(&s, &opts(&key, true)).await.unwrap();
        assert_eq!((r.narinfos, r.nars_checked), (1, 1));
        assert!(r.problems.is_empty(), "{:?}", r.problems);

        let problems = |r: VerifyReport| -> Vec<String> {
            r.problems.into_iter().map(|p| p.problem).collect()
        };
        // Another key trusted: the signature does not count.
        let other = SecretKey::generate("v-2").unwrap();
        let p = problems(verify(&s, &opts(&other, false)).await.unwrap());
        assert!(p.iter().any(|x| x.contains("no valid signature")), "{p:?}");
        // A reference without a narinfo.
        let key_name = "h7jx3wrzn6m9vjl9604id854qx1xyqw6.narinfo";
        let refs = ["/nix/store/0zmlp8zf0ryq8vcpzbqbzgncrnn1q1xa-dep"];
        one_path_cache(&s, &key, &refs).await;
        let p = problems(verify(&s, &opts(&key, false)).await.unwrap());
        assert!(
            p.iter().any(|x| x.contains("which has no narinfo")),
            "{p:?}"
        );
        // Unreadable, and no nix-cache-info.
        s.put(
            key_name,
            content_type::NARINFO,
            Bytes::from_static(b"garbage\n"),
        )
        .await
        .unwrap();
        s.delete("nix-cache-info").await.unwrap();
        let r = verify(&s, &opts(&key, false)).await.unwrap();
        let keys: Vec<&str> = r.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec![key_name, "nix-cache-info"], "{:?}", r.problems);
        // Restored: clean again.
        s.put(key_name, content_type::NARINFO, Bytes::from(text))
            .await
            .unwrap();
        one_path_cache(&s, &key, &[]).await;
        let r = verify(&s, &opts(&key, true)).await.unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }
}
