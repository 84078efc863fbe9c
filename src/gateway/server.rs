//! Accepting connections and running them: listeners (TCP with a large backlog, unix
//! sockets, TLS), HTTP/1 and HTTP/2 limits, the per-connection watchdog, the connection
//! cap, the access log, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};

use super::config::{GatewayConfig, GatewayError, Listen};
use super::handler::{AuthRefused, State};
use super::response::{Body, empty, log};
use crate::storage::Storage;

/// Who is on the other end of a connection: the text for the access log, and the address
/// that per-peer limits count (none for unix sockets).
#[derive(Clone)]
struct Peer {
    label: Arc<str>,
    ip: Option<IpAddr>,
}

/// What one connection is doing, for the watchdog that closes idle and stalled ones.
///
/// hyper bounds the time to read an HTTP/1 request head, but not the time before the
/// protocol is known (a client that connects and sends nothing, or only the HTTP/2
/// preface), nor an idle HTTP/2 connection, nor a client that stops reading a response:
/// each of those would hold a socket and a task for ever (security review M1).
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` of the last sign of progress.
    last: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            last: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// Resolves when the connection has been quiet longer than its current limit: the
    /// header timeout before the first request, the send timeout while a response is in
    /// flight, the idle timeout between requests.
    async fn expired(&self, cfg: &GatewayConfig) {
        loop {
            let limit = if self.in_flight.load(Ordering::Relaxed) > 0 {
                cfg.send_timeout
            } else if self.requests.load(Ordering::Relaxed) == 0 {
                cfg.header_timeout
            } else {
                cfg.idle_timeout
            };
            let quiet = self.quiet_for();
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// Counts a response as in flight until its body is dropped (sent, or the client gone).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: &Arc<Activity>) -> Self {
        a.requests.fetch_add(1, Ordering::Relaxed);
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.touch();
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

async fn serve_request<S: Storage>(
    state: Arc<State<S>>,
    req: Request<Incoming>,
    peer: Peer,
    activity: Arc<Activity>,
) -> Result<Response<Body>, Infallible> {
    let guard = InFlight::start(&activity);
    let started = Instant::now();
    let method = req.method().clone();
    // Kept for the access log only (the push API takes the request whole).
    let path: Option<String> = state
        .cfg
        .access_log
        .then(|| req.uri().path().chars().take(200).collect());
    let (mut resp, label) = if super::push::is_push(req.uri().path()) {
        state.push(req, peer.ip).await
    } else {
        state.handle(&req, peer.ip).await
    };
    if method == Method::HEAD {
        // Same headers as GET, no body. HTTP/1 drops a HEAD body by itself; HTTP/2 would
        // send it as DATA frames, which clients treat as a protocol error.
        if let Some(n) = hyper::body::Body::size_hint(resp.body()).exact()
            && n > 0
            && !resp.headers().contains_key(header::CONTENT_LENGTH)
        {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        *resp.body_mut() = empty();
    }
    let status = resp.status().as_u16();
    state.metrics.request(label, status);
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| hyper::body::Body::size_hint(resp.body()).exact())
        .unwrap_or(0);
    if method != Method::HEAD {
        state.metrics.bytes(len);
    }
    if state.cfg.access_log {
        // The path only: never a query string, and never the presigned Location.
        let why = resp
            .extensions()
            .get::<AuthRefused>()
            .map_or(String::new(), |r| format!(" ({})", r.0));
        log(&format!(
            "{} {} {} {status} {len} {:.1}ms{why}",
            peer.label,
            method,
            path.unwrap_or_default(),
            started.elapsed().as_secs_f64() * 1000.0
        ));
    }
    // Every frame the client takes is progress; the guard goes with the body.
    Ok(resp.map(|body| Tracked { inner: body, guard }.boxed_unsync()))
}

/// A response body that reports each frame taken as progress of its connection and counts
/// as in flight until dropped. Size hints pass through, so `Content-Length` is kept.
struct Tracked {
    inner: Body,
    guard: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            self.guard.0.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Raises the soft limit on open files to the hard limit: every connection is a file
/// descriptor, and the usual soft limit of 1024 would make a thousand idle sockets lock
/// everyone out (and the gateway's own bucket connections with them). Returns the limit
/// now in force.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    // rlim_t is u64 on Linux but not on every Unix.
    #[allow(clippy::unnecessary_cast)]
    Some(lim.rlim_cur as u64)
}

/// A TCP listener with a backlog of 4096 (std's 128 drops SYNs under a burst of
/// connections, and each dropped SYN costs the client a one-second retransmit).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

/// Binds every listener, then serves until `shutdown` resolves, then lets requests in
/// flight finish (up to 30 s).
pub async fn serve<S: Storage>(
    cfg: GatewayConfig,
    storage: S,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    serve_reloading(cfg, storage, shutdown, None).await
}

/// As [`serve`], also reloading the credential files on each item of `reload` (SIGHUP).
pub async fn serve_reloading<S: Storage>(
    cfg: GatewayConfig,
    storage: S,
    shutdown: impl Future<Output = ()>,
    reload: Option<Reload>,
) -> Result<(), GatewayError> {
    let state = Arc::new(State::new(cfg, storage));
    let reloader = tokio::spawn(reload_auth_files(state.clone(), reload));
    let recorder = tokio::spawn(write_access_records(state.clone()));

    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Conn, Peer)>(64);
    let mut acceptors = tokio::task::JoinSet::new();
    for l in &state.cfg.listen {
        match l {
            Listen::Tcp(addr) => {
                let listener = bind_tcp(*addr).map_err(|source| GatewayError::Listen {
                    addr: l.to_string(),
                    source,
                })?;
                // Port 0 asks for any free port: say which one we got.
                let bound = listener
                    .local_addr()
                    .map_or(l.to_string(), |a| a.to_string());
                log(&format!(
                    "listening on {}://{bound}",
                    if state.cfg.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    }
                ));
                let tx = tx.clone();
                acceptors.spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((s, peer)) => {
                                let _ = s.set_nodelay(true);
                                let peer = Peer {
                                    label: peer.to_string().into(),
                                    ip: Some(peer.ip()),
                                };
                                if tx.send((Conn::Tcp(s), peer)).await.is_err() {
                                    return;
                                }
                            }
                            // Out of file descriptors and the like: wait, do not spin.
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                });
            }
            Listen::Unix(path) => {
                // A socket left by a previous run would make bind fail; anything else
                // at that path is not ours to remove.
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let listener = UnixListener::bind(path).map_err(|source| GatewayError::Listen {
                    addr: l.to_string(),
                    source,
                })?;
                log(&format!("listening on {l}"));
                let tx = tx.clone();
                acceptors.spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((s, _)) => {
                                let peer = Peer {
                                    label: Arc::from("unix"),
                                    ip: None,
                                };
                                if tx.send((Conn::Unix(s), peer)).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                });
            }
        }
    }
    drop(tx);

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.header_timeout)
        // Bounds the request head: a bigger one is answered 431 without reaching us.
        .max_buf_size(16 * 1024)
        .max_headers(64);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(16 * 1024)
        // Nix opens a few streams per connection; hyper's default of 200 only multiplies
        // what one unauthenticated connection can ask for.
        .max_concurrent_streams(64)
        // Pings find peers that vanished without closing (a dropped NAT entry).
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let tls = state.cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(state.cfg.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (conn, peer) = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = &mut shutdown => break,
        };
        // Over the limit: close at once. Holding the socket would cost the descriptor
        // the limit is there to protect.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            state.metrics.connection_refused();
            drop(conn);
            continue;
        };
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Arc::new(Activity::new());
            let svc_activity = activity.clone();
            let svc_state = state.clone();
            let svc = hyper::service::service_fn(move |req| {
                serve_request(svc_state.clone(), req, peer.clone(), svc_activity.clone())
            });
            let served = async {
                match (conn, tls) {
                    (Conn::Tcp(s), Some(acceptor)) => {
                        let Ok(Ok(s)) =
                            tokio::time::timeout(state.cfg.header_timeout, acceptor.accept(s))
                                .await
                        else {
                            return;
                        };
                        let c = builder.serve_connection(TokioIo::new(s), svc).into_owned();
                        let _ = watcher.watch(c).await;
                    }
                    (Conn::Tcp(s), None) => {
                        let c = builder.serve_connection(TokioIo::new(s), svc).into_owned();
                        let _ = watcher.watch(c).await;
                    }
                    (Conn::Unix(s), _) => {
                        let c = builder.serve_connection(TokioIo::new(s), svc).into_owned();
                        let _ = watcher.watch(c).await;
                    }
                }
            };
            // Dropping the connection closes its socket.
            tokio::select! {
                _ = served => {}
                _ = activity.expired(&state.cfg) => {}
            }
        });
    }
    acceptors.abort_all();
    reloader.abort();
    recorder.abort();
    log("shutting down: waiting for requests in flight");
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        log("shutdown: gave up waiting for open connections after 30 s");
    }
    for l in &state.cfg.listen {
        if let Listen::Unix(p) = l {
            let _ = std::fs::remove_file(p);
        }
    }
    // What was read since the last record, so a restart loses none of it.
    if let Some(rec) = &state.access
        && let Err(e) = rec.flush(&state.storage).await
    {
        log(&format!(
            "--record-access: cannot write the last read record: {e}"
        ));
    }
    Ok(())
}

/// Requests to reload the credential files (the CLI turns SIGHUP into these).
pub type Reload = std::pin::Pin<Box<dyn futures::Stream<Item = ()> + Send>>;

/// Reloads the htpasswd and tokens files when one changes (checked every 2 s) and on each
/// item of `reload` (SIGHUP); says what it did, and keeps the old credentials when the new
/// files cannot be used.
async fn reload_auth_files<S: Storage>(state: Arc<State<S>>, reload: Option<Reload>) {
    use futures::StreamExt;
    let Some((htpasswd, tokens)) = state.cfg.auth_files.clone() else {
        return;
    };
    let stamp = || {
        [&htpasswd, &tokens].map(|p| {
            p.as_ref()
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| (m.modified().ok(), m.len()))
        })
    };
    let mut seen = stamp();
    let mut reload: Reload = reload.unwrap_or_else(|| Box::pin(futures::stream::pending()));
    loop {
        let why = tokio::select! {
            r = reload.next() => match r {
                Some(()) => "SIGHUP",
                None => {
                    reload = Box::pin(futures::stream::pending());
                    continue;
                }
            },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                if stamp() == seen {
                    continue;
                }
                "a file changed"
            }
        };
        seen = stamp();
        match state.reload_auth() {
            Ok(Some((users, tokens))) => log(&format!(
                "credentials reloaded ({why}): {users} users, {tokens} tokens"
            )),
            Ok(None) => {}
            Err(e) => log(&format!(
                "error: reloading the credentials ({why}): {e}; the previous ones stay in use"
            )),
        }
    }
}

/// Writes the `--record-access` records once per interval, and once more at shutdown
/// (see [`super::access`]).
async fn write_access_records<S: Storage>(state: Arc<State<S>>) {
    let Some(rec) = &state.access else {
        return;
    };
    let mut dropped = 0;
    loop {
        tokio::time::sleep(rec.interval).await;
        match rec.flush(&state.storage).await {
            Ok(_) => {}
            Err(e) => log(&format!("--record-access: cannot write a read record: {e}")),
        }
        if rec.dropped() > dropped {
            dropped = rec.dropped();
            log(&format!(
                "--record-access: {dropped} paths not recorded so far: more distinct paths than {} were read within one interval",
                super::access::MAX_PENDING
            ));
        }
    }
}
