//! What the gateway needs to let a pusher upload without credentials: presigned PUTs and
//! multipart uploads whose parts are presigned, completing them with the parts the pusher
//! reports, and the server-side copy that moves a verified upload to its published key.

use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use super::S3Bucket;
use super::multipart::{abort_upload, create_upload};
use super::retry::{classify, to_error};
use crate::storage::{RequestKind, StorageError};

/// Largest object a single CopyObject may copy (S3's limit).
const MAX_COPY: u64 = 5 << 30;

fn lifetime(ttl: Duration) -> Result<PresigningConfig, StorageError> {
    PresigningConfig::expires_in(ttl)
        .map_err(|e| StorageError::Config(format!("presigned URL lifetime: {e}")))
}

impl S3Bucket {
    /// A URL that lets its holder PUT exactly `key` until it expires.
    pub(super) async fn presign_put_url(
        &self,
        key: &str,
        ttl: Duration,
    ) -> Result<String, StorageError> {
        let i = &self.inner;
        let req = i
            .client
            .put_object()
            .bucket(&i.cfg.bucket)
            .key(i.object_key(key))
            .presigned(lifetime(ttl)?)
            .await
            .map_err(|e| to_error("presign PUT", key, classify(&e)))?;
        Ok(req.uri().to_owned())
    }

    /// Starts a multipart upload of `key` and presigns its parts 1..=`parts`.
    pub(super) async fn presign_parts(
        &self,
        key: &str,
        parts: u32,
        ttl: Duration,
    ) -> Result<(String, Vec<String>), StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let id = create_upload(self, key, crate::storage::content_type::NAR).await?;
        let mut urls = Vec::with_capacity(parts as usize);
        for n in 1..=parts as i32 {
            let signed = i
                .client
                .upload_part()
                .bucket(&i.cfg.bucket)
                .key(&obj)
                .upload_id(&id)
                .part_number(n)
                .presigned(lifetime(ttl)?)
                .await;
            match signed {
                Ok(req) => urls.push(req.uri().to_owned()),
                Err(e) => {
                    abort_upload(self, key, &id).await;
                    return Err(to_error("presign UploadPart", key, classify(&e)));
                }
            }
        }
        Ok((id, urls))
    }

    /// Completes a multipart upload with the ETags the uploader got for parts 1..=n.
    pub(super) async fn complete_parts(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), StorageError> {
        let i = &self.inner;
        let obj = i.object_key(key);
        let parts: Vec<CompletedPart> = etags
            .iter()
            .enumerate()
            .map(|(n, e)| {
                CompletedPart::builder()
                    .part_number(n as i32 + 1)
                    .e_tag(e)
                    .build()
            })
            .collect();
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        i.retry(
            RequestKind::Multipart,
            "CompleteMultipartUpload",
            key,
            || {
                i.client
                    .complete_multipart_upload()
                    .bucket(&i.cfg.bucket)
                    .key(&obj)
                    .upload_id(upload_id)
                    .multipart_upload(upload.clone())
                    .send()
            },
        )
        .await?
        .map(|_| ())
        .map_err(|c| to_error("CompleteMultipartUpload", key, c))
    }

    pub(super) async fn cancel_parts(&self, key: &str, upload_id: &str) {
        abort_upload(self, key, upload_id).await;
    }

    /// Copies `from` to `to` inside the bucket, only if `from` still has the ETag it had
    /// when it was checked (so that a pusher who writes again after the check cannot get
    /// unchecked bytes published).
    pub(super) async fn copy_checked(
        &self,
        from: &str,
        to: &str,
        etag: &str,
        size: u64,
    ) -> Result<(), StorageError> {
        if size > MAX_COPY {
            return Err(StorageError::Remote {
                op: "CopyObject",
                key: to.to_owned(),
                message: format!("{size} bytes is more than a single copy may move (5 GiB)"),
                transient: false,
            });
        }
        let i = &self.inner;
        let source = format!("{}/{}", i.cfg.bucket, urlencode_key(&i.object_key(from)));
        let obj = i.object_key(to);
        i.retry(RequestKind::Put, "CopyObject", to, || {
            i.client
                .copy_object()
                .bucket(&i.cfg.bucket)
                .key(&obj)
                .copy_source(&source)
                .copy_source_if_match(etag)
                .content_type(crate::storage::content_type::NAR)
                .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                .send()
        })
        .await?
        .map(|_| ())
        .map_err(|c| to_error("CopyObject", to, c))
    }
}

/// `x-amz-copy-source` is URL-encoded; keys here are ASCII letters, digits and `/._-`,
/// which need none, but anything else is encoded rather than trusted.
fn urlencode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
