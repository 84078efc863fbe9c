//! A fault-injecting HTTP proxy between cachepush and a real S3 server. Requests that
//! match a rule get the rule's fault (an S3 error status, a reset connection, a stall, a
//! truncated response); everything else is forwarded unchanged, Host header included, so
//! SigV4 signatures still verify at the real server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[derive(Clone, Debug)]
pub enum Fault {
    /// An S3 error response: status, error code, optional Retry-After seconds.
    Status(u16, &'static str, Option<u32>),
    /// Close the connection without answering, after reading the whole request.
    Reset,
    /// Close the connection half-way through reading the request body.
    ResetMidBody,
    /// Wait this long, then forward (the client's read timeout should fire first).
    Stall(Duration),
    /// Wait this long, then close the connection without forwarding: a request held open
    /// that never reaches the server, even after its client is gone.
    StallThenDrop(Duration),
    /// Forward, then send only half of the response body and close.
    Truncate,
    /// Wait a random time up to this long, then forward: requests in flight together
    /// reach the server, and answer, in an order of the proxy's choosing.
    Jitter(Duration),
    /// One of these faults (chosen at random) for this percentage of the matching
    /// requests; the rest are forwarded: a server that throttles a share of its traffic.
    Share(u32, Vec<Fault>),
    /// As `Status`, but only for requests carrying this header (e.g. `if-none-match`: a
    /// server without conditional writes); others are forwarded.
    StatusIfHeader(&'static str, u16, &'static str),
    /// 413 for a request whose body is over this many bytes, as reverse proxies with a
    /// body limit answer (nginx's `client_max_body_size`); others are forwarded.
    BodyOver(u64),
}

#[derive(Clone, Debug)]
pub struct Rule {
    /// `"*"` for every method.
    pub method: &'static str,
    /// A substring of the path and query, e.g. ".narinfo", "partNumber=", "uploadId=".
    pub target: &'static str,
    /// How many matching requests get the fault; `usize::MAX` for all.
    pub times: usize,
    pub fault: Fault,
}

#[derive(Clone)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    rules: Arc<Mutex<Vec<Rule>>>,
    injected: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Logged>>>,
}

/// One request as the proxy saw it: when it came, when its answer was complete, and the
/// status (0 when the connection was reset instead of answered).
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub target: String,
    pub started: Instant,
    pub ended: Instant,
    pub status: u16,
}

impl Logged {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream.trim_end_matches('/').to_owned();
        let rules: Arc<Mutex<Vec<Rule>>> = Arc::default();
        let injected = Arc::new(AtomicUsize::new(0));
        let log: Arc<Mutex<Vec<Logged>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let (r, inj, lg) = (rules.clone(), injected.clone(), log.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let client = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .build()
                    .unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (r, inj, lg, client, upstream) = (
                        r.clone(),
                        inj.clone(),
                        lg.clone(),
                        client.clone(),
                        upstream.clone(),
                    );
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let (method, target, started) = (
                                req.method().to_string(),
                                req.uri()
                                    .path_and_query()
                                    .map_or("/".into(), |p| p.to_string()),
                                Instant::now(),
                            );
                            let fut = handle(
                                req,
                                r.clone(),
                                inj.clone(),
                                client.clone(),
                                upstream.clone(),
                            );
                            let lg = lg.clone();
                            async move {
                                let res = fut.await;
                                lg.lock().unwrap().push(Logged {
                                    method,
                                    target,
                                    started,
                                    ended: Instant::now(),
                                    status: res.as_ref().map_or(0, |r| r.status().as_u16()),
                                });
                                res
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        FaultProxy {
            addr: rx.recv().unwrap(),
            rules,
            injected,
            log,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add(&self, rule: Rule) {
        self.rules.lock().unwrap().push(rule);
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Every request so far, in the order their answers completed.
    pub fn log(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn take_fault(rules: &Mutex<Vec<Rule>>, method: &str, target: &str) -> Option<Fault> {
    let mut rules = rules.lock().unwrap();
    let rule = rules.iter_mut().find(|r| {
        r.times > 0 && (r.method == "*" || r.method == method) && target.contains(r.target)
    })?;
    if rule.times != usize::MAX {
        rule.times -= 1;
    }
    Some(rule.fault.clone())
}

async fn handle(
    req: Request<Incoming>,
    rules: Arc<Mutex<Vec<Rule>>>,
    injected: Arc<AtomicUsize>,
    client: reqwest::Client,
    upstream: String,
) -> Result<Response<Body>, std::io::Error> {
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().clone();
    let fault = match take_fault(&rules, method.as_str(), &target) {
        Some(Fault::StatusIfHeader(h, status, code)) => req
            .headers()
            .contains_key(h)
            .then_some(Fault::Status(status, code, None)),
        Some(Fault::Share(percent, faults)) => (rand::random_range(0..100) < percent
            && !faults.is_empty())
        .then(|| faults[rand::random_range(0..faults.len())].clone()),
        other => other,
    };
    if let Some(Fault::BodyOver(limit)) = fault {
        let declared = req
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let (parts, body) = req.into_parts();
        let over = declared.is_some_and(|n| n > limit);
        let collected = if over {
            None
        } else {
            http_body_util::Limited::new(body, limit as usize)
                .collect()
                .await
                .ok()
                .map(|c| c.to_bytes())
        };
        let Some(bytes) = collected else {
            injected.fetch_add(1, Ordering::SeqCst);
            return Ok(Response::builder()
                .status(413)
                .body(full("request body over the proxy's limit\n"))
                .unwrap());
        };
        return forward(parts, bytes, method, target, client, upstream, None).await;
    }
    if fault.is_some() {
        injected.fetch_add(1, Ordering::SeqCst);
    }
    let (parts, mut body) = req.into_parts();
    if let Some(Fault::ResetMidBody) = fault {
        // Read the first frame only, then drop the connection mid-body.
        let _ = body.frame().await;
        return Err(std::io::Error::other("injected reset mid-body"));
    }
    let bytes = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    match &fault {
        Some(Fault::Status(status, code, retry_after)) => {
            let mut r = Response::builder()
                .status(*status)
                .header("content-type", "application/xml");
            if let Some(s) = retry_after {
                r = r.header("retry-after", s.to_string());
            }
            if *code == "RequestTimeTooSkewed" {
                // What a server whose clock is an hour from ours says, in every response.
                let then = std::time::SystemTime::now() - Duration::from_secs(3600);
                let date = aws_smithy_types::DateTime::from(then)
                    .fmt(aws_smithy_types::date_time::Format::HttpDate)
                    .unwrap();
                r = r.header("date", date);
            }
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test</Message></Error>"
            );
            let body = if method == hyper::Method::HEAD {
                full(Bytes::new())
            } else {
                full(xml)
            };
            return Ok(r.body(body).unwrap());
        }
        Some(Fault::Reset) => return Err(std::io::Error::other("injected reset")),
        Some(Fault::Stall(d)) => tokio::time::sleep(*d).await,
        Some(Fault::Jitter(d)) => {
            let ms = rand::random_range(0..=d.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some(Fault::StallThenDrop(d)) => {
            tokio::time::sleep(*d).await;
            return Err(std::io::Error::other("injected stall, then dropped"));
        }
        _ => {}
    }
    forward(parts, bytes, method, target, client, upstream, fault).await
}

async fn forward(
    parts: http::request::Parts,
    bytes: Bytes,
    method: hyper::Method,
    target: String,
    client: reqwest::Client,
    upstream: String,
    fault: Option<Fault>,
) -> Result<Response<Body>, std::io::Error> {
    let mut fwd = client.request(method.clone(), format!("{upstream}{target}"));
    for (k, v) in parts.headers.iter() {
        fwd = fwd.header(k, v);
    }
    let resp = fwd
        .body(bytes)
        .send()
        .await
        .map_err(std::io::Error::other)?;
    let mut out = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        out = out.header(k, v);
    }
    let body = resp.bytes().await.map_err(std::io::Error::other)?;
    if let Some(Fault::Truncate) = fault {
        // Declared length, half the bytes, then the connection ends.
        let half = body.slice(..body.len() / 2);
        let stream = futures::stream::iter(vec![
            Ok(hyper::body::Frame::data(half)),
            Err(std::io::Error::other("injected truncation")),
        ]);
        return Ok(out
            .body(http_body_util::StreamBody::new(stream).boxed())
            .unwrap());
    }
    Ok(out.body(full(body)).unwrap())
}
