//! A raw HTTP/1.1 client (so that tests can send exactly the bytes they mean, hostile ones
//! included), the gateway as a child process, and a TCP forwarder that can cut the
//! gateway off from its bucket (the one hand-written fault injector; the bucket behind it
//! is a real S3 server).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `raw` (a whole request) and reads one response; `head` for a HEAD request.
pub fn raw(addr: SocketAddr, raw: &[u8], head: bool) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = Vec::new();
    if !head {
        if let Some(n) = headers
            .get("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            body.resize(n, 0);
            r.read_exact(&mut body).unwrap();
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {size:?}"));
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            // Neither length nor chunks: the body runs to the end of the connection (every
            // request here says `Connection: close` or is the last on its socket).
            r.read_to_end(&mut body).unwrap();
        }
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// `METHOD path` with optional extra header lines, connection closed after.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    raw(addr, req.as_bytes(), method == "HEAD")
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[])
}

/// A running `cachepush gateway`, stopped (SIGTERM, then kill) when dropped.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts `cmd` (a prepared `cachepush gateway ...` with `--listen 127.0.0.1:0`) and
    /// waits for the address it listens on.
    pub fn start(mut cmd: Command) -> Gateway {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cachepush gateway");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("the gateway exited before listening:\n{}", seen.join("\n"));
            };
            if let Some(a) = line.split("listening on http").nth(1) {
                let a = a.trim_start_matches("s://").trim_start_matches("://");
                break a.trim().parse().expect("listen address");
            }
            seen.push(line);
        };
        let log = Arc::new(Mutex::new(seen));
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Gateway { child, addr, log }
    }

    pub fn url(&self) -> String {
        // "localhost", not 127.0.0.1: a netrc entry for the gateway must not match the S3
        // server (also on 127.0.0.1), or curl would add Basic auth to presigned requests.
        format!("http://localhost:{}", self.addr.port())
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// A counter from /metrics (sum over label sets that contain `labels`).
    pub fn metric(&self, name: &str, labels: &str) -> u64 {
        let m = get(self.addr, "/metrics");
        assert_eq!(m.status, 200);
        m.text()
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Requests the gateway has sent to the bucket so far.
    pub fn bucket_requests(&self) -> u64 {
        self.metric("cachepush_gateway_bucket_requests_total", "")
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        // Longer than the gateway's own 30 s grace for connections in flight.
        for _ in 0..350 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("the gateway did not stop within 35 s of SIGTERM");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Forwards TCP connections to `target` while up; while down, drops every connection at
/// once (what a stopped server looks like to a client, without stopping a shared one).
pub struct Forwarder {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
}

impl Forwarder {
    pub fn start(target: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let flag = flag.clone();
                pipe(client, server, flag);
            }
        });
        Forwarder { addr, up }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn pipe(a: TcpStream, b: TcpStream, up: Arc<AtomicBool>) {
    let copy = move |mut from: TcpStream, mut to: TcpStream, up: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        // Going down cuts open connections too.
                        if !up.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        });
    };
    copy(a.try_clone().unwrap(), b.try_clone().unwrap(), up.clone());
    copy(b, a, up);
}
