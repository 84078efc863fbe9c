//! Reading from the bucket: small objects whole (with a size limit), streams with an
//! optional byte range, presigned GET URLs, and the bucket check.

use std::time::Duration;

use bytes::Bytes;

use super::S3Bucket;
use super::retry::{backoff, classify, to_error};
use crate::storage::{ByteRange, ObjectStream, RequestKind, StorageError, StreamOutcome};

impl S3Bucket {
    /// Reads a whole object into memory, refusing (before reading) one larger than
    /// `limit` bytes: for narinfos, whose real size is a few KiB, so that a huge object
    /// under that name cannot take the gateway's memory.
    pub(super) async fn get_at_most(
        &self,
        key: &str,
        limit: Option<u64>,
    ) -> Result<Option<Bytes>, StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let mut attempt = 0;
        loop {
            let res = i
                .retry(RequestKind::Get, "GET", key, || {
                    i.client.get_object().bucket(&i.cfg.bucket).key(&obj).send()
                })
                .await?;
            let out = match res {
                Ok(o) => o,
                Err(c) if c.not_found => return Ok(None),
                Err(c) => return Err(to_error("GET", key, c)),
            };
            if let (Some(limit), Some(len)) = (limit, out.content_length())
                && len.max(0) as u64 > limit
            {
                return Err(StorageError::Remote {
                    op: "GET",
                    key: key.to_owned(),
                    message: format!("the object is {len} bytes, more than the {limit} expected"),
                    transient: false,
                });
            }
            // A body cut short is retried like any other transient failure.
            match out.body.collect().await {
                Ok(b) => return Ok(Some(b.into_bytes())),
                Err(e) => {
                    attempt += 1;
                    if attempt >= i.cfg.max_attempts {
                        return Err(StorageError::Remote {
                            op: "GET",
                            key: key.to_owned(),
                            message: format!("body cut short: {e}"),
                            transient: true,
                        });
                    }
                    i.counts.retried();
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// The error a denied HEAD of `key` stands for, with the code a GET's body names.
    pub(super) async fn explain_denied_head(&self, key: &str) -> StorageError {
        let i = &self.inner;
        let obj = i.object_key(key);
        i.counts.sent(RequestKind::Get);
        let res = i
            .client
            .get_object()
            .bucket(&i.cfg.bucket)
            .key(&obj)
            .range("bytes=0-0")
            .send()
            .await;
        match res {
            Err(e) => to_error("HEAD", key, classify(&e)),
            // Allowed after all (a policy that treats HEAD apart): say what HEAD said.
            Ok(_) => StorageError::Denied {
                op: "HEAD",
                key: key.to_owned(),
                message: "HTTP 403 (GET of the same object is allowed: check the bucket policy)"
                    .into(),
            },
        }
    }

    /// Whether the bucket itself exists and answers (`HeadBucket`). An object HEAD cannot
    /// tell: its 404 carries no error code, so a missing bucket looks like a missing key.
    pub async fn check_bucket(&self) -> Result<(), StorageError> {
        let i = &self.inner;
        let where_ = format!("s3://{}", i.cfg.bucket);
        let res = i
            .retry(RequestKind::Head, "HeadBucket", &where_, || {
                i.client.head_bucket().bucket(&i.cfg.bucket).send()
            })
            .await?;
        match res {
            Ok(_) => Ok(()),
            Err(c) if c.not_found => Err(StorageError::Remote {
                op: "HeadBucket",
                key: where_,
                message: "the bucket does not exist (check the bucket name in the URL, and the endpoint and region)".into(),
                transient: false,
            }),
            Err(c) => Err(to_error("HeadBucket", &where_, c)),
        }
    }

    /// A URL that lets its holder GET `key` without credentials until it expires.
    pub(super) async fn presign(
        &self,
        key: &str,
        expires: Duration,
    ) -> Result<String, StorageError> {
        let i = &self.inner;
        let cfg = aws_sdk_s3::presigning::PresigningConfig::expires_in(expires)
            .map_err(|e| StorageError::Config(format!("presigned URL lifetime: {e}")))?;
        let req = i
            .client
            .get_object()
            .bucket(&i.cfg.bucket)
            .key(i.object_key(key))
            .presigned(cfg)
            .await
            .map_err(|e| to_error("presign GET", key, classify(&e)))?;
        Ok(req.uri().to_owned())
    }

    /// Opens `key` for streaming, optionally one byte range.
    pub(super) async fn get_stream(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<StreamOutcome, StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let res = i
            .retry(RequestKind::Get, "GET", key, || {
                i.client
                    .get_object()
                    .bucket(&i.cfg.bucket)
                    .key(&obj)
                    .set_range(range.map(|r| r.header()))
                    .send()
            })
            .await?;
        match res {
            Ok(o) => Ok(StreamOutcome::Found(ObjectStream {
                length: o.content_length().map(|n| n.max(0) as u64),
                content_range: o.content_range().map(str::to_owned),
                etag: o.e_tag().map(str::to_owned),
                body: Box::pin(futures::stream::unfold(o.body, |mut body| async move {
                    body.next()
                        .await
                        .map(|r| (r.map_err(std::io::Error::other), body))
                })),
            })),
            Err(c) if c.not_found => Ok(StreamOutcome::NotFound),
            Err(c) if c.status == Some(416) => Ok(StreamOutcome::RangeNotSatisfiable),
            Err(c) => Err(to_error("GET", key, c)),
        }
    }
}
