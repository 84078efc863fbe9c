//! Multipart uploads: parts of a fixed size (R2 requires equal parts) sent in the
//! background within the global part budget, completed as the commit, aborted when
//! dropped; and listing the uploads left open by anyone.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::S3Bucket;
use super::journal::{self, Entry, Journal, JournalPart, part_crc};
use super::retry::to_error;
use crate::storage::{RequestKind, Staged, Storage, StorageError};

/// An open multipart upload: relative key, upload id, start time (seconds since the epoch).
pub(super) type OpenUpload = (String, String, Option<i64>);

impl S3Bucket {
    /// Open multipart uploads under the prefix: (relative key, upload id, when it was
    /// started in seconds since the epoch, if the server says).
    pub(super) async fn list_uploads(&self) -> Result<Vec<OpenUpload>, StorageError> {
        let i = &self.inner;
        let prefix = i.object_key("");
        let strip = prefix.len();
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let res = i
                .retry(RequestKind::List, "ListMultipartUploads", "", || {
                    i.client
                        .list_multipart_uploads()
                        .bucket(&i.cfg.bucket)
                        .prefix(&prefix)
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send()
                })
                .await?
                .map_err(|c| to_error("ListMultipartUploads", "", c))?;
            for u in res.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    out.push((
                        k.get(strip..).unwrap_or(k).to_owned(),
                        id.to_owned(),
                        u.initiated().map(|t| t.secs()),
                    ));
                }
            }
            if res.is_truncated() == Some(true) {
                key_marker = res.next_key_marker().map(str::to_owned);
                id_marker = res.next_upload_id_marker().map(str::to_owned);
                if key_marker.is_none() {
                    break;
                }
            } else {
                break;
            }
        }
        Ok(out)
    }

    /// The parts the server holds for an upload: number → (length, ETag); `None` when the
    /// upload is gone.
    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<HashMap<i32, (u64, Option<String>)>>, StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let mut out = HashMap::new();
        let mut marker: Option<String> = None;
        loop {
            let res = i
                .retry(RequestKind::List, "ListParts", key, || {
                    i.client
                        .list_parts()
                        .bucket(&i.cfg.bucket)
                        .key(&obj)
                        .upload_id(upload_id)
                        .set_part_number_marker(marker.clone())
                        .send()
                })
                .await?;
            let res = match res {
                Ok(r) => r,
                Err(c) if c.no_such_upload || c.not_found => return Ok(None),
                Err(c) => return Err(to_error("ListParts", key, c)),
            };
            for p in res.parts() {
                if let Some(n) = p.part_number() {
                    out.insert(
                        n,
                        (
                            p.size().map_or(0, |s| s.max(0) as u64),
                            p.e_tag().map(str::to_owned),
                        ),
                    );
                }
            }
            match res.next_part_number_marker() {
                Some(m) if res.is_truncated() == Some(true) => marker = Some(m.to_owned()),
                _ => break,
            }
        }
        Ok(Some(out))
    }
}

/// Fills `buf` up to `limit` bytes, first from `carry` (the rest of a chunk that crossed
/// the previous part's end), then from `body`. False when the body ended before `limit`.
pub(super) async fn fill_part(
    buf: &mut BytesMut,
    limit: usize,
    carry: &mut Option<Bytes>,
    body: &mut mpsc::Receiver<Bytes>,
) -> bool {
    while buf.len() < limit {
        let mut chunk = match carry.take() {
            Some(c) => c,
            None => match body.recv().await {
                Some(c) => c,
                None => return false,
            },
        };
        let room = limit - buf.len();
        if chunk.len() > room {
            *carry = Some(chunk.split_off(room));
        }
        buf.extend_from_slice(&chunk);
    }
    true
}

/// A multipart upload in progress; aborted unless completed.
pub struct Multipart {
    bucket: S3Bucket,
    key: String,
    upload_id: String,
    next_part: i32,
    size: u64,
    in_flight: JoinSet<Result<CompletedPart, StorageError>>,
    done: Vec<CompletedPart>,
    finished: bool,
    /// The journal of this upload, when journaled.
    journal: Option<(Journal, Arc<Mutex<Entry>>)>,
    /// Parts an earlier push sent that the server still has, by number.
    resumable: HashMap<i32, JournalPart>,
}

impl Multipart {
    /// Resumes the journaled upload of `key` when the server still has it, else starts one.
    pub(super) async fn start(
        bucket: S3Bucket,
        key: &str,
        ct: &'static str,
        part_size: usize,
    ) -> Result<Self, StorageError> {
        let mut journal = bucket.inner.cfg.journal.clone();
        if let Some(j) = journal.clone() {
            let target = bucket.describe();
            if let Some(e) = j.load(&target, key).filter(|e| {
                // Another push of the same NAR is running (two CI jobs on one runner, a
                // watch and a manual push): its upload is its own, and so is its journal.
                let live = e.owner_alive();
                if live {
                    journal = None;
                }
                !live
            }) {
                let server = if e.part_size == part_size {
                    bucket.list_parts(key, &e.upload_id).await.ok().flatten()
                } else {
                    None
                };
                match server {
                    Some(server) => {
                        let resumable = journal::confirmed(&e, &server);
                        // Ours now: saved at once, so that a third push sees it taken.
                        let entry = Entry {
                            parts: resumable.values().cloned().collect(),
                            host: crate::host::host_name(),
                            pid: std::process::id(),
                            ..e
                        };
                        j.save(&entry);
                        let mut mp = Self::open(bucket, key, entry.upload_id.clone());
                        mp.journal = Some((j, Arc::new(Mutex::new(entry))));
                        mp.resumable = resumable;
                        return Ok(mp);
                    }
                    // Gone (completed, aborted by gc), unreadable, or cut differently: a
                    // fresh upload; the old one, if any, is left for gc.
                    None => j.remove(&target, key),
                }
            }
        }
        let mut mp = Self::create(bucket, key, ct).await?;
        if let Some(j) = journal {
            let entry = Entry {
                target: mp.bucket.describe(),
                key: key.to_owned(),
                upload_id: mp.upload_id.clone(),
                part_size,
                started: journal::now(),
                host: crate::host::host_name(),
                pid: std::process::id(),
                parts: Vec::new(),
            };
            j.save(&entry);
            mp.journal = Some((j, Arc::new(Mutex::new(entry))));
        }
        Ok(mp)
    }

    async fn create(bucket: S3Bucket, key: &str, ct: &'static str) -> Result<Self, StorageError> {
        let upload_id = create_upload(&bucket, key, ct).await?;
        Ok(Self::open(bucket, key, upload_id))
    }

    /// An upload the server has under `upload_id`, registered as open until it is
    /// completed or aborted.
    fn open(bucket: S3Bucket, key: &str, upload_id: String) -> Self {
        if let Ok(mut open) = bucket.inner.open.lock() {
            open.insert(upload_id.clone(), key.to_owned());
        }
        Multipart {
            bucket,
            key: key.to_owned(),
            upload_id,
            next_part: 1,
            size: 0,
            in_flight: JoinSet::new(),
            done: Vec::new(),
            finished: false,
            journal: None,
            resumable: HashMap::new(),
        }
    }

    /// Forgets the journal: the upload is complete or aborted.
    fn drop_journal(&mut self) {
        if let Some((j, e)) = self.journal.take()
            && let Ok(e) = e.lock()
        {
            j.remove(&e.target, &e.key);
        }
    }

    /// Uploads a part in the background once the global part budget has room.
    pub(super) async fn send_part(&mut self, body: Bytes) -> Result<(), StorageError> {
        // Reap finished parts first so an early failure stops the upload promptly.
        while let Some(r) = self.in_flight.try_join_next() {
            self.done.push(joined(r, &self.key)??);
        }
        let permit: OwnedSemaphorePermit = self
            .bucket
            .inner
            .parts
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StorageError::Config("part budget closed".into()))?;
        let n = self.next_part;
        self.next_part += 1;
        self.size += body.len() as u64;
        let crc = part_crc(&body);
        // Sent by an earlier push and still on the server with these very bytes.
        if let Some(p) = self.resumable.remove(&n)
            && p.size == body.len() as u64
            && p.crc32 == crc
        {
            self.bucket.inner.counts.resumed(p.size);
            self.done.push(
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(p.etag)
                    .build(),
            );
            return Ok(());
        }
        let journal = self.journal.clone();
        let bucket = self.bucket.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone();
        self.in_flight.spawn(async move {
            let _permit = permit;
            let i = &bucket.inner;
            let obj = i.object_key(&key);
            let md5 = i.content_md5(&body);
            let out = i
                .retry(RequestKind::Multipart, "UploadPart", &key, || {
                    i.client
                        .upload_part()
                        .bucket(&i.cfg.bucket)
                        .key(&obj)
                        .upload_id(&upload_id)
                        .part_number(n)
                        .set_content_md5(md5.clone())
                        .body(ByteStream::from(body.clone()))
                        .send()
                })
                .await?
                .map_err(|c| to_error("UploadPart", &key, c))?;
            let etag = out.e_tag().map(str::to_owned);
            if let Some((j, entry)) = journal
                && let Ok(mut e) = entry.lock()
            {
                e.parts.retain(|p| p.n != n);
                e.parts.push(JournalPart {
                    n,
                    size: body.len() as u64,
                    crc32: crc,
                    etag: etag.clone(),
                });
                // Under the lock: a later state is never overwritten by an earlier one.
                j.save(&e);
            }
            Ok(CompletedPart::builder()
                .part_number(n)
                .set_e_tag(etag)
                .build())
        });
        Ok(())
    }

    pub(super) async fn wait_parts(&mut self) -> Result<(), StorageError> {
        while let Some(r) = self.in_flight.join_next().await {
            self.done.push(joined(r, &self.key)??);
        }
        Ok(())
    }

    pub(super) async fn complete(mut self) -> Result<(), StorageError> {
        self.done.sort_by_key(|p| p.part_number());
        let parts = std::mem::take(&mut self.done);
        let i = self.bucket.inner.clone();
        let obj = i.object_key(&self.key);
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let res = match i
            .retry(
                RequestKind::Multipart,
                "CompleteMultipartUpload",
                &self.key,
                || {
                    i.client
                        .complete_multipart_upload()
                        .bucket(&i.cfg.bucket)
                        .key(&obj)
                        .upload_id(&self.upload_id)
                        .multipart_upload(upload.clone())
                        .send()
                },
            )
            .await
        {
            Err(e) => Err(e),
            Ok(Ok(_)) => Ok(()),
            // A retried Complete whose first attempt succeeded (its answer was lost) finds
            // the upload gone: the object is there, and that is success.
            Ok(Err(c)) if c.no_such_upload => match self.bucket.head(&self.key).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(to_error("CompleteMultipartUpload", &self.key, c)),
                Err(e) => Err(e),
            },
            Ok(Err(c)) => Err(to_error("CompleteMultipartUpload", &self.key, c)),
        };
        self.drop_journal();
        match &res {
            Ok(()) => {
                if let Ok(mut open) = i.open.lock() {
                    open.remove(&self.upload_id);
                }
            }
            // A Complete that failed for good aborts its upload before the error is
            // reported, so no upload outlives the push that made it.
            Err(_) => {
                abort_upload(&self.bucket, &self.key, &self.upload_id).await;
            }
        }
        self.finished = true;
        res
    }

    pub(super) async fn abort(mut self) {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        // A failed abort leaves the upload registered, for `left_open` to report.
        abort_upload(&self.bucket, &self.key, &self.upload_id).await;
        self.drop_journal();
        self.finished = true;
    }
}

fn joined(
    r: Result<Result<CompletedPart, StorageError>, tokio::task::JoinError>,
    key: &str,
) -> Result<Result<CompletedPart, StorageError>, StorageError> {
    r.map_err(|e| StorageError::Remote {
        op: "UploadPart",
        key: key.to_owned(),
        message: format!("part task failed: {e}"),
        transient: false,
    })
}

/// Aborts one upload; true once the store confirmed it is gone.
/// Starts a multipart upload of `key`; its upload id.
pub(super) async fn create_upload(
    bucket: &S3Bucket,
    key: &str,
    ct: &'static str,
) -> Result<String, StorageError> {
    let i = &bucket.inner;
    let obj = i.object_key(key);
    let out = i
        .retry(RequestKind::Multipart, "CreateMultipartUpload", key, || {
            i.client
                .create_multipart_upload()
                .bucket(&i.cfg.bucket)
                .key(&obj)
                .content_type(ct)
                .send()
        })
        .await?
        .map_err(|c| to_error("CreateMultipartUpload", key, c))?;
    out.upload_id()
        .map(str::to_owned)
        .ok_or_else(|| StorageError::Remote {
            op: "CreateMultipartUpload",
            key: key.to_owned(),
            message: "the response has no UploadId".into(),
            transient: false,
        })
}

pub(super) async fn abort_upload(bucket: &S3Bucket, key: &str, upload_id: &str) -> bool {
    let i = &bucket.inner;
    let obj = i.object_key(key);
    let res = i
        .retry(RequestKind::Multipart, "AbortMultipartUpload", key, || {
            i.client
                .abort_multipart_upload()
                .bucket(&i.cfg.bucket)
                .key(&obj)
                .upload_id(upload_id)
                .send()
        })
        .await;
    // Forgotten only once the store confirmed, so that an abort cut short by Ctrl-C is
    // still found by `abort_open_uploads`.
    let gone =
        matches!(res, Ok(Ok(_))) || matches!(&res, Ok(Err(c)) if c.not_found || c.no_such_upload);
    if gone && let Ok(mut open) = i.open.lock() {
        open.remove(upload_id);
    }
    gone
}

impl Drop for Multipart {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Dropped mid-way (a failed part, Ctrl-C): abort it so no upload is left open and
        // billed. Best effort; on shutdown the runtime may already be gone.
        self.in_flight.abort_all();
        self.drop_journal();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let bucket = self.bucket.clone();
            let key = self.key.clone();
            let upload_id = self.upload_id.clone();
            handle.spawn(async move {
                abort_upload(&bucket, &key, &upload_id).await;
            });
        }
    }
}

/// Bytes stored but not yet visible.
pub enum S3Staged {
    /// Small enough for one PUT, which is the commit.
    Single {
        bucket: S3Bucket,
        key: String,
        ct: &'static str,
        body: Bytes,
    },
    /// All parts uploaded; CompleteMultipartUpload is the commit.
    Multi(Multipart),
}

impl Staged for S3Staged {
    async fn commit(self) -> Result<u64, StorageError> {
        match self {
            S3Staged::Single {
                bucket,
                key,
                ct,
                body,
            } => {
                let n = body.len() as u64;
                bucket.inner.put_bytes(&key, ct, body, false).await?;
                Ok(n)
            }
            S3Staged::Multi(mp) => {
                let n = mp.size;
                mp.complete().await?;
                Ok(n)
            }
        }
    }

    async fn abort(self) {
        if let S3Staged::Multi(mp) = self {
            mp.abort().await;
        }
    }
}
