//! A wide-area link on loopback, for the benchmarks (benches/bench.py): a TCP proxy that
//! delays every byte by half the round trip in each direction, optionally caps the
//! bandwidth shared by all connections, and optionally answers a share of HTTP requests
//! with throttling errors (503 SlowDown) instead of forwarding them.
//!
//!   wan_proxy UPSTREAM_HOST:PORT RTT_MS [MBIT_PER_S|0] [THROTTLE_PERCENT]
//!
//! Prints `listening on 127.0.0.1:PORT` once ready. Every connection pays the round trip
//! for its handshake too, as over a real link (the first bytes wait half a round trip each
//! way). Not a test: built with `cargo bench --no-run`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A token bucket shared by every connection in one direction.
struct Rate {
    bytes_per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl Rate {
    async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // Tokens accrue up to 50 ms worth: a burst no longer than a real link's queue.
            let cap = self.bytes_per_sec * 0.05;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.bytes_per_sec).min(cap);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.bytes_per_sec)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Copies `from` to `to`, each chunk released `delay` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    rate: Option<Arc<Rate>>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = Instant::now() + delay;
                    if tx
                        .send((due, Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, b)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if let Some(r) = &rate {
                r.take(b.len()).await;
            }
            if to.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

async fn link(client: TcpStream, upstream: String, delay: Duration, rates: [Option<Arc<Rate>>; 2]) {
    // The handshake: SYN there, SYN-ACK back.
    tokio::time::sleep(delay * 2).await;
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let [up, down] = rates;
    tokio::join!(pump(cr, sw, delay, up), pump(sr, cw, delay, down));
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// The throttling hop: answers `percent` of the requests with 503 SlowDown, forwards the
/// rest (Host header included, so signatures still verify).
async fn throttle(
    req: hyper::Request<hyper::body::Incoming>,
    client: reqwest::Client,
    upstream: String,
    percent: u32,
) -> Result<hyper::Response<Body>, Infallible> {
    let full = |b: Bytes| Full::new(b).map_err(|e| match e {}).boxed();
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if rand::random_range(0..100) < percent {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let body = if parts.method == hyper::Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from_static(xml.as_bytes())
        };
        return Ok(hyper::Response::builder()
            .status(503)
            .header("content-type", "application/xml")
            .body(full(body))
            .unwrap_or_default());
    }
    let mut fwd = client.request(parts.method.clone(), format!("http://{upstream}{target}"));
    for (k, v) in parts.headers.iter() {
        fwd = fwd.header(k, v);
    }
    let answer = async {
        let resp = fwd.body(bytes).send().await.ok()?;
        let mut out = hyper::Response::builder().status(resp.status().as_u16());
        for (k, v) in resp.headers() {
            out = out.header(k, v);
        }
        let body = resp.bytes().await.ok()?;
        out.body(full(body)).ok()
    };
    Ok(answer.await.unwrap_or_else(|| {
        hyper::Response::builder()
            .status(502)
            .body(full(Bytes::new()))
            .unwrap_or_default()
    }))
}

/// Starts the throttling hop on an ephemeral port; returns its address.
async fn start_throttle(upstream: String, percent: u32) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the throttling hop");
    let addr = listener.local_addr().expect("its address").to_string();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("an HTTP client");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    throttle(req, client.clone(), upstream.clone(), percent)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.iter().any(|a| a == "--bench") {
        eprintln!("usage: wan_proxy UPSTREAM_HOST:PORT RTT_MS [MBIT_PER_S|0] [THROTTLE_PERCENT]");
        std::process::exit(2);
    }
    let num = |i: usize| {
        args.get(i)
            .and_then(|a| a.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut upstream = args[0].clone();
    let delay = Duration::from_secs_f64(num(1) / 2000.0);
    let mbit = num(2);
    let percent = num(3) as u32;
    if percent > 0 {
        upstream = start_throttle(upstream, percent).await;
    }
    let rate = |_| {
        (mbit > 0.0).then(|| {
            Arc::new(Rate {
                bytes_per_sec: mbit * 1e6 / 8.0,
                state: Mutex::new((0.0, Instant::now())),
            })
        })
    };
    let rates: [Option<Arc<Rate>>; 2] = [rate(0), rate(1)];
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("listening on {}", listener.local_addr().expect("address"));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(link(stream, upstream.clone(), delay, rates.clone()));
    }
}
