//! Retrying S3 requests and classifying what failed: throttling and 5xx are retried with
//! full-jitter backoff or the server's `Retry-After`; absent objects, preconditions and
//! missing uploads are answers, not errors; missing credentials, a wrong clock, a missing
//! bucket and refusals are named. One helper sends every request, so each attempt is
//! counted once in [`RequestCounters`](crate::storage::RequestCounters).

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use rand::Rng;

use super::Inner;
use super::pace::Signal;
use crate::storage::{RequestKind, StorageError};

/// What a failed request means for us.
pub(super) struct Classified {
    pub(super) message: String,
    pub(super) transient: bool,
    pub(super) denied: bool,
    /// The object is absent: 404 with `NoSuchKey`, `NotFound` or no code (a HEAD has no
    /// body). Any other 404 (`NoSuchBucket`, ...) is a fault, never "absent".
    pub(super) not_found: bool,
    /// 404 `NoSuchUpload`: the multipart upload is gone (completed or aborted already).
    pub(super) no_such_upload: bool,
    pub(super) precondition: bool,
    /// 501 or `NotImplemented`: the server lacks this (optional) API.
    pub(super) unsupported: bool,
    /// No answer at all: the endpoint is unreachable or timed out.
    pub(super) unreachable: bool,
    pub(super) timeout: bool,
    /// The HTTP status, when there was a response.
    pub(super) status: Option<u16>,
    /// The S3 error code, when the answer had one.
    pub(super) code: String,
    pub(super) retry_after: Option<Duration>,
}

pub(super) fn classify<E>(err: &SdkError<E, HttpResponse>) -> Classified
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut c = Classified {
        message: String::new(),
        transient: false,
        denied: false,
        not_found: false,
        no_such_upload: false,
        precondition: false,
        unsupported: false,
        unreachable: false,
        timeout: false,
        status: None,
        code: String::new(),
        retry_after: None,
    };
    match err {
        SdkError::TimeoutError(_) => {
            c.transient = true;
            c.unreachable = true;
            c.timeout = true;
            c.message = "request timed out".into();
        }
        SdkError::DispatchFailure(d) => {
            let chain = crate::error_chain(err);
            // The SDK reports "no credentials anywhere" as a failure to dispatch; it is
            // neither the network nor worth retrying, and the user must hear what it is.
            if chain.contains("provided credentials") || chain.contains("loading credentials") {
                c.denied = true;
                c.message = "no AWS credentials were found (looked in: the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY variables, the profile in ~/.aws/credentials and ~/.aws/config, web identity (AWS_WEB_IDENTITY_TOKEN_FILE), the container and instance metadata unless AWS_EC2_METADATA_DISABLED=true): set the variables, or AWS_PROFILE, or give the job a role".into();
                return c;
            }
            c.transient = d.is_io() || d.is_timeout() || d.is_other();
            c.unreachable = true;
            c.timeout = d.is_timeout();
            c.message = format!("cannot reach the endpoint: {chain}");
        }
        SdkError::ResponseError(_) => {
            c.transient = true;
            c.message = format!("broken response: {}", crate::error_chain(err));
        }
        SdkError::ServiceError(se) => {
            let raw = se.raw();
            let status = raw.status().as_u16();
            c.status = Some(status);
            let code = se.err().code().unwrap_or("");
            c.code = code.to_owned();
            c.retry_after = raw
                .headers()
                .get("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // 501 NotImplemented is a server without an optional API: asking again
            // changes nothing.
            c.transient = (status >= 500 && status != 501 && code != "NotImplemented")
                || status == 429
                || matches!(
                    code,
                    "SlowDown"
                        | "RequestTimeout"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "Throttling"
                        | "ThrottlingException"
                        | "TooManyRequests"
                );
            c.denied = status == 401 || status == 403;
            // Only these mean "no such object". A missing bucket must not be served as a
            // missing narinfo: Nix caches that for an hour and builds everything itself.
            c.not_found = status == 404 && matches!(code, "" | "NoSuchKey" | "NotFound");
            c.no_such_upload = status == 404 && code == "NoSuchUpload";
            c.precondition = status == 412;
            c.unsupported = status == 501 || code == "NotImplemented";
            let msg = se.err().message().unwrap_or("");
            c.message = if code.is_empty() {
                format!("HTTP {status}")
            } else {
                format!(
                    "HTTP {status} {code}{}{msg}",
                    if msg.is_empty() { "" } else { ": " }
                )
            };
            // A HEAD has no body, so its 403 carries no error code: the Date header still
            // tells a wrong local clock apart from wrong credentials.
            if status == 403
                && code.is_empty()
                && let Some(skew) = clock_skew(raw.headers().get("date"))
            {
                c.message.push_str(&format!(
                    " (the server's clock and ours differ by {} minutes: the system clock is off; fix it with NTP)",
                    skew.as_secs() / 60
                ));
            }
            if code == "NoSuchBucket" {
                c.message
                    .push_str(" (check the bucket name in the URL, and the endpoint and region)");
            }
            if code == "RequestTimeTooSkewed" {
                c.message
                    .push_str(" (the system clock is off; fix it with NTP)");
            }
            if code == "InvalidAccessKeyId" {
                c.message.push_str(" (this server does not know the access key ID: check AWS_ACCESS_KEY_ID or the profile, and that the endpoint is the one the key was made for)");
            }
            if code == "SignatureDoesNotMatch" {
                c.message.push_str(" (the secret key does not belong to this access key ID: check AWS_SECRET_ACCESS_KEY or the profile)");
            }
            // AWS names the bucket's region when a request went to the wrong one (301
            // PermanentRedirect, 400 AuthorizationHeaderMalformed, a HEAD's bare 301/400).
            if let Some(region) = raw
                .headers()
                .get("x-amz-bucket-region")
                .map(str::trim)
                .filter(|r| !r.is_empty())
                && matches!(status, 301 | 307 | 400 | 403)
            {
                c.message.push_str(&format!(
                    " (the bucket is in region {region}: put region={region} in the URL, or --region {region})"
                ));
            }
        }
        _ => c.message = crate::error_chain(err),
    }
    c
}

/// How far the server's `Date` is from our clock, when more than S3's 15-minute window.
pub(super) fn clock_skew(date: Option<&str>) -> Option<Duration> {
    let server =
        aws_smithy_types::DateTime::from_str(date?, aws_smithy_types::date_time::Format::HttpDate)
            .ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    let diff = Duration::from_secs(now.abs_diff(server.secs()));
    (diff > Duration::from_secs(15 * 60)).then_some(diff)
}

pub(super) fn to_error(op: &'static str, key: &str, c: Classified) -> StorageError {
    if c.unsupported {
        StorageError::Unsupported {
            op,
            key: key.to_owned(),
            message: c.message,
        }
    } else if c.unreachable {
        StorageError::Unavailable {
            op,
            key: key.to_owned(),
            message: c.message,
            timeout: c.timeout,
        }
    } else if c.denied {
        let mut message = c.message;
        // The key works (it was not refused as unknown or mis-signed) but may not do this:
        // name the permission when the operation writes.
        if message.contains("AccessDenied")
            && matches!(
                op,
                "PUT"
                    | "DELETE"
                    | "CreateMultipartUpload"
                    | "UploadPart"
                    | "CompleteMultipartUpload"
                    | "AbortMultipartUpload"
            )
        {
            message.push_str(
                "; these credentials may not write to this bucket (they need s3:PutObject, and s3:AbortMultipartUpload)",
            );
        }
        StorageError::Denied {
            op,
            key: key.to_owned(),
            message,
        }
    } else {
        StorageError::Remote {
            op,
            key: key.to_owned(),
            message: c.message,
            transient: c.transient,
        }
    }
}

/// Codes that mean "slow down" on every provider (AWS, Ceph, MinIO, R2, B2, GCS, Spaces);
/// a provider's profile may add its own.
const THROTTLE_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    // The client sent its body too slowly: too much in flight for the link.
    "RequestTimeout",
];

/// Whether an answer asks us to slow down: 429, 503 (AWS SlowDown, B2's "too busy"), or a
/// throttling code with another status.
pub(super) fn is_throttle(c: &Classified, extra: &[&str]) -> bool {
    matches!(c.status, Some(429 | 503))
        || THROTTLE_CODES.contains(&c.code.as_str())
        || extra.contains(&c.code.as_str())
}

/// Attempts a request gets while the answers are throttling, as a multiple of the
/// configured attempts: a throttling server is asking for a slower client, not refusing,
/// and a push that slows down must still finish (with the backoff's 20 s cap, 5 × 6
/// attempts is minutes of patience for one request).
const THROTTLE_PATIENCE: u32 = 5;

/// The server's `Retry-After` when it gave one (at most two minutes: a server asking for
/// an hour is not worth holding a push for), else our own backoff.
pub(super) fn wait_before_retry(c: &Classified, attempt: u32) -> Duration {
    c.retry_after
        .map(|d| d.min(Duration::from_secs(120)))
        .unwrap_or_else(|| backoff(attempt))
}

/// Full-jitter exponential backoff: a random wait up to min(cap, base × 2^attempt).
pub(super) fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_secs(20);
    let exp = Duration::from_millis(200).saturating_mul(1u32 << attempt.min(10));
    let max = exp.min(cap);
    let ms = rand::rng().random_range(0..=max.as_millis() as u64);
    Duration::from_millis(ms.max(50))
}

impl Inner {
    /// Runs `f` until it succeeds, fails for good, or runs out of attempts.
    /// `Ok(Err(c))` hands a definite, non-transient answer (404, 412) back to the caller.
    pub(super) async fn retry<T, E, F, Fut>(
        &self,
        kind: RequestKind,
        op: &'static str,
        key: &str,
        f: F,
    ) -> Result<Result<T, Classified>, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.retry_sized(kind, op, key, 0, f).await
    }

    /// [`retry`](Self::retry) for a request with a body of `body` bytes. Every attempt
    /// but a part's or a listing's waits for a slot of the adaptive limit (when the client is paced) and
    /// tells it how the answer came; a body over 1 MiB makes the time no round-trip sample.
    pub(super) async fn retry_sized<T, E, F, Fut>(
        &self,
        kind: RequestKind,
        op: &'static str,
        key: &str,
        body: usize,
        mut f: F,
    ) -> Result<Result<T, Classified>, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        // Parts have their own budget; a listing page answers up to 1,000 of the plan's
        // questions at once and must never wait behind the HEADs it would save.
        let pace = self
            .pace
            .as_ref()
            .filter(|_| !matches!(op, "UploadPart" | "LIST"));
        let sample = body <= 1 << 20;
        let (mut attempt, mut throttled) = (0, 0);
        loop {
            self.counts.sent(kind);
            let permit = match pace {
                Some(p) => Some(p.acquire().await),
                None => None,
            };
            let mut c = match f().await {
                Ok(v) => {
                    if let Some(p) = permit {
                        p.finish(Signal::Answered { sample });
                    }
                    return Ok(Ok(v));
                }
                Err(e) => classify(&e),
            };
            let throttle = is_throttle(&c, self.cfg.throttle_codes);
            if let Some(p) = permit {
                p.finish(if throttle {
                    Signal::Throttled
                } else if c.status.is_none() {
                    Signal::Nothing
                } else {
                    Signal::Answered { sample }
                });
            }
            if c.not_found || c.no_such_upload || c.precondition || c.status == Some(416) {
                return Ok(Err(c));
            }
            if throttle {
                self.counts.throttled();
                c.transient = true;
                throttled += 1;
            } else {
                attempt += 1;
            }
            let out_of_attempts = attempt >= self.cfg.max_attempts
                || throttled >= self.cfg.max_attempts.saturating_mul(THROTTLE_PATIENCE);
            if !c.transient || out_of_attempts {
                return Err(to_error(op, key, c));
            }
            self.counts.retried();
            tokio::time::sleep(wait_before_retry(&c, attempt.max(throttled))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::ErrorMetadata;
    use aws_sdk_s3::operation::get_object::GetObjectError;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    /// An S3 error answer as the SDK hands it over: status, error code (none for a HEAD,
    /// which has no body) and headers.
    fn answer(status: u16, code: &str, headers: &[(&str, &str)]) -> Classified {
        let mut raw = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        for (k, v) in headers {
            raw.headers_mut().insert(k.to_string(), v.to_string());
        }
        let mut meta = ErrorMetadata::builder().message("from the server");
        if !code.is_empty() {
            meta = meta.code(code);
        }
        let err: SdkError<GetObjectError, HttpResponse> =
            SdkError::service_error(GetObjectError::generic(meta.build()), raw);
        classify(&err)
    }

    #[test]
    fn absent_means_no_such_key_or_a_bare_404_and_nothing_else() {
        for (code, absent) in [
            ("NoSuchKey", true),
            ("NotFound", true),
            ("", true),
            ("NoSuchBucket", false),
            ("NoSuchUpload", false),
            ("NoSuchLifecycleConfiguration", false),
        ] {
            let c = answer(404, code, &[]);
            assert_eq!(c.not_found, absent, "404 {code:?}");
            assert!(!c.transient, "404 {code:?}");
        }
        assert!(answer(404, "NoSuchUpload", &[]).no_such_upload);
        let bucket = answer(404, "NoSuchBucket", &[]);
        assert!(
            bucket.message.contains("check the bucket name"),
            "{}",
            bucket.message
        );
        assert!(matches!(
            to_error("GET", "x.narinfo", bucket),
            StorageError::Remote {
                transient: false,
                ..
            }
        ));
    }

    #[test]
    fn throttling_and_server_errors_are_retried_with_the_servers_pause() {
        // AWS, Ceph and MinIO say SlowDown/503; B2 and R2 say 429 or 503; GCS-style
        // gateways say 500 InternalError; a slow upload is 400 RequestTimeout.
        for (status, code) in [
            (503, "SlowDown"),
            (503, "ServiceUnavailable"),
            (429, "TooManyRequests"),
            (429, ""),
            (500, "InternalError"),
            (502, ""),
            (400, "RequestTimeout"),
            (400, "Throttling"),
            (400, "ThrottlingException"),
        ] {
            let c = answer(status, code, &[]);
            assert!(c.transient, "{status} {code:?}");
            assert!(!c.not_found && !c.denied, "{status} {code:?}");
        }
        let c = answer(503, "SlowDown", &[("retry-after", "7")]);
        assert_eq!(c.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(
            answer(503, "SlowDown", &[("retry-after", "soon")]).retry_after,
            None
        );
    }

    #[test]
    fn throttling_is_told_apart_from_other_failures() {
        // AWS/Ceph/MinIO SlowDown, B2's 503 "too busy" (ServiceUnavailable), R2's and
        // GCS's 429 with or without a code, a body sent too slowly.
        for (status, code) in [
            (503, "SlowDown"),
            (503, "ServiceUnavailable"),
            (503, ""),
            (429, ""),
            (429, "TooManyRequests"),
            (400, "RequestTimeout"),
            (400, "ThrottlingException"),
        ] {
            assert!(
                is_throttle(&answer(status, code, &[]), &[]),
                "{status} {code}"
            );
        }
        for (status, code) in [
            (500, "InternalError"),
            (502, ""),
            (403, "AccessDenied"),
            (404, "NoSuchKey"),
        ] {
            assert!(
                !is_throttle(&answer(status, code, &[]), &[]),
                "{status} {code}"
            );
        }
        // A provider's own code counts only under its profile.
        let gcs = answer(403, "rateLimitExceeded", &[]);
        assert!(!is_throttle(&gcs, &[]));
        assert!(is_throttle(&gcs, &["rateLimitExceeded"]));
    }

    #[test]
    fn denials_preconditions_and_missing_features_are_final() {
        for (status, code) in [(403, "AccessDenied"), (403, "ExpiredToken"), (401, "")] {
            let c = answer(status, code, &[]);
            assert!(c.denied && !c.transient, "{status} {code:?}");
            assert!(matches!(
                to_error("PUT", "k", c),
                StorageError::Denied { .. }
            ));
        }
        let c = answer(412, "PreconditionFailed", &[]);
        assert!(c.precondition && !c.transient);
        // A server without an optional API: a definite answer, not an outage to retry.
        let c = answer(501, "NotImplemented", &[]);
        assert!(!c.transient && !c.not_found && !c.denied && c.unsupported);
        assert!(
            c.message.contains("HTTP 501 NotImplemented"),
            "{}",
            c.message
        );
        assert!(matches!(
            to_error("ListMultipartUploads", "", c),
            StorageError::Unsupported { .. }
        ));
        // Some servers say NotImplemented with another status.
        let c = answer(400, "NotImplemented", &[]);
        assert!(c.unsupported && !c.transient);
    }

    #[test]
    fn refused_credentials_wrong_regions_and_write_denials_are_named() {
        let c = answer(403, "InvalidAccessKeyId", &[]);
        assert!(c.denied && !c.transient);
        assert!(
            c.message.contains("does not know the access key ID"),
            "{}",
            c.message
        );
        let c = answer(403, "SignatureDoesNotMatch", &[]);
        assert!(c.denied && !c.transient);
        assert!(c.message.contains("AWS_SECRET_ACCESS_KEY"), "{}", c.message);
        for (status, code) in [
            (301, "PermanentRedirect"),
            (400, "AuthorizationHeaderMalformed"),
            (301, ""),
        ] {
            let c = answer(status, code, &[("x-amz-bucket-region", "eu-west-1")]);
            assert!(!c.transient, "{status} {code}");
            assert!(
                c.message.contains("region eu-west-1") && c.message.contains("region=eu-west-1"),
                "{status} {code}: {}",
                c.message
            );
        }
        // Without the header nothing is guessed.
        assert!(
            !answer(400, "InvalidRequest", &[])
                .message
                .contains("region")
        );
        let e = to_error("PUT", "x.narinfo", answer(403, "AccessDenied", &[]));
        assert!(
            matches!(&e, StorageError::Denied { .. }) && e.to_string().contains("s3:PutObject"),
            "{e}"
        );
        let e = to_error("GET", "x.narinfo", answer(403, "AccessDenied", &[]));
        assert!(!e.to_string().contains("s3:PutObject"), "{e}");
    }

    #[test]
    fn a_wrong_clock_is_named_whether_or_not_there_is_a_body() {
        let c = answer(403, "RequestTimeTooSkewed", &[]);
        assert!(
            c.message.contains("the system clock is off"),
            "{}",
            c.message
        );
        // A HEAD's 403 has no code: the server's Date tells.
        let c = answer(403, "", &[("date", "Mon, 01 Jan 2001 00:00:00 GMT")]);
        assert!(c.message.contains("clock"), "{}", c.message);
        let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now())
            .fmt(aws_smithy_types::date_time::Format::HttpDate)
            .unwrap();
        let c = answer(403, "", &[("date", &now)]);
        assert!(!c.message.contains("clock"), "{}", c.message);
    }

    #[test]
    fn waits_between_attempts_are_bounded() {
        for attempt in 1..40 {
            let w = backoff(attempt);
            assert!(
                w >= Duration::from_millis(50) && w <= Duration::from_secs(20),
                "{attempt}: {w:?}"
            );
        }
        let told = |secs: &str| answer(503, "SlowDown", &[("retry-after", secs)]);
        assert_eq!(wait_before_retry(&told("3"), 1), Duration::from_secs(3));
        assert_eq!(
            wait_before_retry(&told("3600"), 1),
            Duration::from_secs(120)
        );
        // An HTTP-date Retry-After is not parsed: our own backoff applies.
        let date = told("Wed, 21 Oct 2015 07:28:00 GMT");
        assert!(wait_before_retry(&date, 1) <= Duration::from_millis(400));
    }

    #[test]
    fn no_answer_at_all_is_unreachable_and_retried() {
        let err: SdkError<GetObjectError, HttpResponse> =
            SdkError::timeout_error("operation timed out");
        let c = classify(&err);
        assert!(c.unreachable && c.timeout && c.transient);
        assert!(matches!(
            to_error("GET", "k", c),
            StorageError::Unavailable { timeout: true, .. }
        ));
    }
}
