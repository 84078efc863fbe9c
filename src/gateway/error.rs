//! Every answer that is not what was asked for, and its HTTP status: one exhaustive match
//! for refusals and one for storage errors, so a new error cannot slip through as a
//! catch-all. The policy: a client must never read an outage or a refusal as "absent"
//! (Nix caches 404s), so only a missing object is 404, credentials problems are 401, and
//! every storage failure is 5xx. Bodies are generic; details go to the log.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use super::response::{Body, plain};
use crate::storage::StorageError;

/// Why a request was not answered with the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A method other than GET or HEAD.
    MethodNotAllowed,
    /// A request-target that is not one of the cache's routes' shapes.
    BadRequest,
    /// A request-target longer than any route.
    UriTooLong,
    /// No such object, or no such route.
    NotFound,
    /// `/v1/public-key` on a gateway without a signing key.
    NoSigningKey,
    /// No credentials, or wrong ones.
    Unauthorized,
    /// Every password-check slot was busy.
    AuthBusy,
    /// This address failed to log in too often lately.
    AuthLimited { retry_after: Duration },
    /// A range no byte of the object is in.
    RangeNotSatisfiable,
    /// A narinfo the gateway must sign but cannot parse.
    UnusableNarinfo,
    /// The storage did not answer in time.
    StorageTimeout,
    /// The storage cannot be reached or is overloaded (worth a retry).
    StorageUnavailable,
    /// The storage answered with an error that a retry will not fix.
    StorageFailed,
    /// A response that could not be built (a presigned URL that is not a header value).
    Internal,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            // Tells the client which methods exist (with an Allow header).
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // Traversal, bad hashes, invalid UTF-8: the request is wrong, not absent.
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            // Longer than any route: refused before it is parsed.
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            // The one answer Nix takes as "this path is not in the cache".
            Refusal::NotFound | Refusal::NoSigningKey => StatusCode::NOT_FOUND,
            // With WWW-Authenticate, so curl and Nix send their netrc credentials.
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            // The credential was not checked: never 401, which would read as "wrong".
            Refusal::AuthBusy => StatusCode::SERVICE_UNAVAILABLE,
            // This address failed too often: slow down (with Retry-After).
            Refusal::AuthLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            // RFC 9110: a range starting past the end, or the empty suffix.
            Refusal::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            // The bucket holds something unusable: the upstream's fault, not the client's.
            Refusal::UnusableNarinfo | Refusal::StorageFailed => StatusCode::BAD_GATEWAY,
            // No answer in time: clients and proxies retry a 504.
            Refusal::StorageTimeout => StatusCode::GATEWAY_TIMEOUT,
            // Unreachable or overloaded storage: temporary.
            Refusal::StorageUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            // Our own fault (a response that could not be built).
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Refusal::MethodNotAllowed => "only GET and HEAD\n",
            Refusal::BadRequest => "bad request\n",
            Refusal::UriTooLong => "URI too long\n",
            Refusal::NotFound => "not found\n",
            Refusal::NoSigningKey => "no signing key configured\n",
            Refusal::Unauthorized => "authentication required\n",
            Refusal::AuthBusy => "too many password checks at once; try again\n",
            Refusal::AuthLimited { .. } => {
                "too many failed logins from this address; try again later\n"
            }
            Refusal::RangeNotSatisfiable => "range not satisfiable\n",
            Refusal::UnusableNarinfo => "the cache holds an unusable narinfo\n",
            Refusal::StorageTimeout => "the cache storage timed out\n",
            Refusal::StorageUnavailable => "the cache storage is unavailable\n",
            Refusal::StorageFailed => "the cache storage answered with an error\n",
            Refusal::Internal => "internal error\n",
        }
    }

    /// The status for a storage error (a missing object is not an error: it is `None`).
    pub fn from_storage(e: &StorageError) -> Refusal {
        match e {
            // No answer in time: 504, so clients and proxies retry rather than give up.
            StorageError::Unavailable { timeout: true, .. } => Refusal::StorageTimeout,
            // Unreachable, throttled or 5xx upstream: temporary, 503.
            StorageError::Unavailable { timeout: false, .. }
            | StorageError::Remote {
                transient: true, ..
            } => Refusal::StorageUnavailable,
            // A final error from the storage (a 4xx other than 404, a broken answer).
            StorageError::Remote {
                transient: false, ..
            } => Refusal::StorageFailed,
            // The gateway's own credentials are refused: its configuration, not the
            // client's; the client must not be told "unauthorized".
            StorageError::Denied { .. } => Refusal::StorageFailed,
            // A cache directory that cannot be read now (moved, unmounted, a disk error):
            // an outage of the storage, as an unreachable bucket is.
            StorageError::Io { .. } => Refusal::StorageUnavailable,
            // A key or setting the storage cannot use.
            StorageError::Config(_) => Refusal::StorageFailed,
            // The storage lacks an API the answer needed (every one the gateway uses is
            // basic S3; HeadBucket's absence is handled in the health check).
            StorageError::Unsupported { .. } => Refusal::StorageFailed,
        }
    }
}

impl From<Refusal> for Response<Body> {
    fn from(r: Refusal) -> Self {
        let mut resp = plain(r.status(), r.text());
        let h = resp.headers_mut();
        match r {
            Refusal::MethodNotAllowed => {
                h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            Refusal::AuthBusy => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            Refusal::AuthLimited { retry_after } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_never_absent_and_refusals_never_unauthorized() {
        let unreachable = StorageError::Unavailable {
            op: "GET",
            key: "k".into(),
            message: "m".into(),
            timeout: false,
        };
        let slow = StorageError::Unavailable {
            op: "GET",
            key: "k".into(),
            message: "m".into(),
            timeout: true,
        };
        let denied = StorageError::Denied {
            op: "GET",
            key: "k".into(),
            message: "m".into(),
        };
        let throttled = StorageError::Remote {
            op: "GET",
            key: "k".into(),
            message: "m".into(),
            transient: true,
        };
        for (e, status) in [
            (unreachable, 503),
            (slow, 504),
            (denied, 502),
            (throttled, 503),
            (StorageError::Config("x".into()), 502),
            (
                StorageError::Io {
                    op: "stat",
                    key: "/cache".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
                503,
            ),
        ] {
            assert_eq!(Refusal::from_storage(&e).status().as_u16(), status, "{e}");
        }
        let r: Response<Body> = Refusal::AuthLimited {
            retry_after: Duration::from_secs(7),
        }
        .into();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let r: Response<Body> = Refusal::MethodNotAllowed.into();
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
    }
}
