//! `GET`/`HEAD /nar/...` (and the `.ls` listings and `log/` files, which are proxied the
//! same way): by a redirect to a presigned URL when the storage can make one, else
//! streamed through the gateway, honouring one `Range`. HEAD is always answered here, as
//! a presigned GET URL cannot answer a HEAD.

use std::time::Instant;

use futures::TryStreamExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::config::Delivery;
use super::error::Refusal;
use super::handler::State;
use super::response::{Body, empty};
use super::route::Route;
use crate::format::layout::content_type;
use crate::storage::{ByteRange, Storage, StreamOutcome};

impl<S: Storage> State<S> {
    pub(super) async fn nar(
        &self,
        route: &Route,
        req: &Request<Incoming>,
        head: bool,
    ) -> Response<Body> {
        let key = route.object_key().unwrap_or_default();
        if head {
            let started = Instant::now();
            let res = self.storage.head(&key).await;
            self.metrics.upstream(started.elapsed());
            return match res {
                Ok(Some(len)) => {
                    let mut r = Response::new(empty());
                    let h = r.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(content_type::NAR),
                    );
                    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
                    r
                }
                // A HEAD's 404 has no error code: absent object or absent bucket?
                Ok(None) => match self.storage_health().await {
                    Ok(()) => Refusal::NotFound.into(),
                    Err(r) => r.into(),
                },
                Err(e) => self.storage_failure(route, &e).into(),
            };
        }
        if self.cfg.delivery == Delivery::Proxy {
            return self.proxy(route, req, false).await;
        }
        match self.storage.presign_get(&key, self.cfg.presign_ttl).await {
            Ok(Some(url)) => match HeaderValue::from_str(&url) {
                Ok(loc) => {
                    let mut r = Response::new(empty());
                    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                    r.headers_mut().insert(header::LOCATION, loc);
                    // The URL carries a signature that expires: never store it.
                    r.headers_mut()
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    r
                }
                Err(_) => Refusal::Internal.into(),
            },
            // A storage with no URLs of its own (a local directory): the bytes go through
            // the gateway instead.
            Ok(None) => self.proxy(route, req, false).await,
            Err(e) => self.storage_failure(route, &e).into(),
        }
    }

    /// Streams an object from the storage, honouring a single `Range`.
    pub(super) async fn proxy(
        &self,
        route: &Route,
        req: &Request<Incoming>,
        head: bool,
    ) -> Response<Body> {
        let key = route.object_key().unwrap_or_default();
        let range = match range_of(req.headers().get(header::RANGE)) {
            RangeAsk::Whole => None,
            RangeAsk::Part(r) => Some(r),
            RangeAsk::Unsatisfiable => return Refusal::RangeNotSatisfiable.into(),
        };
        let started = Instant::now();
        let res = self.storage.read_range(&key, range).await;
        self.metrics.upstream(started.elapsed());
        let obj = match res {
            Ok(StreamOutcome::Found(o)) => o,
            Ok(StreamOutcome::NotFound) => return Refusal::NotFound.into(),
            Ok(StreamOutcome::RangeNotSatisfiable) => return Refusal::RangeNotSatisfiable.into(),
            Err(e) => return self.storage_failure(route, &e).into(),
        };
        let mut builder = Response::builder()
            .status(if obj.content_range.is_some() {
                StatusCode::PARTIAL_CONTENT
            } else {
                StatusCode::OK
            })
            .header(header::ACCEPT_RANGES, "bytes");
        let ct = match route {
            Route::Nar(_) => content_type::NAR,
            Route::Listing(_) | Route::Realisation(_) | Route::DebugInfo(_) => {
                content_type::LISTING
            }
            _ => content_type::LOG,
        };
        builder = builder.header(header::CONTENT_TYPE, ct);
        if let Some(n) = obj.length {
            builder = builder.header(header::CONTENT_LENGTH, n);
        }
        if let Some(cr) = &obj.content_range {
            builder = builder.header(header::CONTENT_RANGE, cr.as_str());
        }
        if let Some(e) = &obj.etag {
            builder = builder.header(header::ETAG, e.as_str());
        }
        let body = if head {
            empty()
        } else {
            StreamBody::new(obj.body.map_ok(Frame::data)).boxed_unsync()
        };
        let mut r = builder
            .body(body)
            .unwrap_or_else(|_| Refusal::Internal.into());
        if matches!(route, Route::Nar(_)) && r.status().is_success() {
            // NARs are named by their hash: the bytes under a name never change.
            self.cacheable(&mut r, "max-age=31536000, immutable");
        }
        r
    }
}

/// What a `Range` header asks of the storage.
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    Whole,
    /// One `bytes=A-B`, `bytes=A-` or `bytes=-N` range.
    Part(ByteRange),
    /// `bytes=-0`: the empty suffix, which no object can satisfy.
    Unsatisfiable,
}

/// RFC 9110 §14.2: a server may ignore `Range`, and must ignore one it cannot parse; so a
/// malformed header, another unit, or several ranges (which Nix never sends) get the whole
/// object, 200, rather than an error.
fn range_of(v: Option<&HeaderValue>) -> RangeAsk {
    let Some(r) = v.and_then(|v| v.to_str().ok()) else {
        return RangeAsk::Whole;
    };
    let r = r.trim();
    let Some(spec) = r
        .get(..6)
        .filter(|u| u.eq_ignore_ascii_case("bytes="))
        .map(|_| r[6..].trim())
    else {
        return RangeAsk::Whole;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let num = |s: &str| {
        (!s.is_empty() && s.len() <= 19 && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match (num(a), num(b), a.is_empty(), b.is_empty()) {
        (Some(x), None, false, true) => RangeAsk::Part(ByteRange::From(x)),
        (None, Some(0), true, false) => RangeAsk::Unsatisfiable,
        (None, Some(n), true, false) => RangeAsk::Part(ByteRange::Last(n)),
        (Some(x), Some(y), false, false) if x <= y => RangeAsk::Part(ByteRange::FromTo(x, y)),
        _ => RangeAsk::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let ask = |r: &str| range_of(Some(&HeaderValue::from_str(r).unwrap()));
        for (given, passed) in [
            ("bytes=0-99", "bytes=0-99"),
            ("bytes=100-", "bytes=100-"),
            ("bytes=-500", "bytes=-500"),
            ("bytes=5-5", "bytes=5-5"),
            ("Bytes=0-9", "bytes=0-9"),
            ("bytes= 0-9 ", "bytes=0-9"),
        ] {
            let RangeAsk::Part(r) = ask(given) else {
                panic!("{given}")
            };
            assert_eq!(r.header(), passed, "{given}");
        }
        assert_eq!(ask("bytes=-0"), RangeAsk::Unsatisfiable);
        for ignored in [
            "bytes=0-1,5-6",
            "bytes=9-1",
            "bytes=-",
            "items=0-1",
            "bytes=a-b",
            "bytes=99999999999999999999-",
            "",
        ] {
            assert_eq!(ask(ignored), RangeAsk::Whole, "{ignored}");
        }
        assert_eq!(range_of(None), RangeAsk::Whole);
    }
}
