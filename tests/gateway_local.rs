//! The gateway serving a local cache directory (`--from file:///DIR`, like nix-serve for a
//! cache directory): judged by the real Nix substituting through it, and in-process over
//! the library (no S3 at all), with auth, Range and the storage check the same as for a
//! bucket.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use cachepush::format::layout;
use cachepush::gateway::auth::Auth;
use cachepush::gateway::{CacheControl, Delivery, GatewayConfig, Listen, serve};
use cachepush::storage::LocalDir;
use common::http::{Gateway, get, request};
use common::*;

/// Pushes the shared closure, signed, into a fresh cache directory.
fn filled_cache(tmp: &Path) -> (std::path::PathBuf, String) {
    let (sk, pk) = keygen(tmp, "local-gw-1");
    let dir = tmp.join("cache");
    let url = format!("file://{}", dir.display());
    run_ok(copy_cmd(&url, None, Some(&sk), &["-q"]).arg(shared_top()));
    (dir, pk)
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// The NAR key of the shared top path, read from its narinfo in `dir`.
fn nar_of_top(dir: &Path) -> String {
    let hash = &shared_top().file_name().unwrap().to_str().unwrap()[..32];
    let text = std::fs::read_to_string(dir.join(layout::narinfo_key(hash))).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned()
}

#[test]
fn nix_substitutes_from_a_cache_directory_through_the_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, pk) = filled_cache(tmp.path());
    let (_, other_pk) = keygen(tmp.path(), "other-1");
    let pw = htpasswd(tmp.path(), "alice", "correct-horse-battery");
    let good = netrc(tmp.path(), "good", "alice", "correct-horse-battery");
    let url = format!("file://{}", dir.display());
    let nar = nar_of_top(&dir);
    let nar_bytes = std::fs::read(dir.join(&nar)).unwrap();
    // redirect: a directory cannot presign, so the gateway streams the NAR itself.
    for mode in ["redirect", "proxy"] {
        let gw = Gateway::start(gateway_from(
            &url,
            None,
            &["--nar-delivery", mode, "--htpasswd", pw.to_str().unwrap()],
        ));
        let d = |n: &str| tmp.path().join(format!("{mode}-{n}"));
        // Without credentials: 401 and Nix fails; with the netrc: Nix substitutes, every
        // signature checked.
        assert_eq!(get(gw.addr, "/nix-cache-info").status, 401, "{mode}");
        let o = nix_via(&gw.url(), &d("anon"), shared_top(), &pk, None);
        assert!(
            !o.status.success(),
            "{mode}: substituted without credentials"
        );
        let o = nix_via(&gw.url(), &d("good"), shared_top(), &pk, Some(&good));
        assert!(o.status.success(), "{mode}: {}", stderr_of(&o));
        // Trusting another key, Nix refuses the same cache.
        let o = nix_via(&gw.url(), &d("other"), shared_top(), &other_pk, Some(&good));
        assert!(
            !o.status.success(),
            "{mode}: accepted with an untrusted key"
        );

        let auth = basic("alice", "correct-horse-battery");
        let h = [("Authorization", auth.as_str())];
        let whole = request(gw.addr, "GET", &format!("/{nar}"), &h);
        assert_eq!(whole.status, 200, "{mode}");
        assert_eq!(whole.body, nar_bytes, "{mode}");
        assert!(whole.header("location").is_none(), "{mode}: redirected");
        let part = request(
            gw.addr,
            "GET",
            &format!("/{nar}"),
            &[("Authorization", auth.as_str()), ("Range", "bytes=3-9")],
        );
        assert_eq!(part.status, 206, "{mode}");
        assert_eq!(part.body, nar_bytes[3..10], "{mode}");
        let len = nar_bytes.len();
        assert_eq!(
            part.header("content-range"),
            Some(format!("bytes 3-9/{len}").as_str())
        );
        let past = request(
            gw.addr,
            "GET",
            &format!("/{nar}"),
            &[
                ("Authorization", auth.as_str()),
                ("Range", &format!("bytes={len}-")),
            ],
        );
        assert_eq!(past.status, 416, "{mode}");
        let head = request(gw.addr, "HEAD", &format!("/{nar}"), &h);
        assert_eq!(head.status, 200, "{mode}");
        assert_eq!(
            head.header("content-length"),
            Some(len.to_string().as_str())
        );
        assert_eq!(get(gw.addr, "/healthz").status, 200);
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn config(addr: SocketAddr, auth: Option<Auth>) -> GatewayConfig {
    GatewayConfig {
        listen: vec![Listen::Tcp(addr)],
        delivery: Delivery::Redirect,
        presign_ttl: Duration::from_secs(60),
        narinfo_ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(0),
        cache_entries: 1000,
        signer: None,
        auth,
        auth_files: None,
        scoped_tokens: None,
        push: None,
        tls: None,
        access_log: false,
        store_dir: "/nix/store".into(),
        priority: 40,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        send_timeout: Duration::from_secs(60),
        max_connections: 64,
        auth_failures_per_minute: 30,
        cache_control: CacheControl::Auto,
        record_access: None,
    }
}

/// The gateway as a library, over a `LocalDir`: the same answers as the binary gives for a
/// bucket, and a storage check that notices the directory going away.
#[test]
fn the_gateway_runs_in_process_over_a_local_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = filled_cache(tmp.path());
    let pw = htpasswd(tmp.path(), "alice", "pw");
    let auth = Auth::load(Some(&pw), None).unwrap();
    let addr = free_port();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let storage = LocalDir::open(&dir).unwrap();
    let server = {
        let stop = stop.clone();
        rt.spawn(async move { serve(config(addr, Some(auth)), storage, stop.notified()).await })
    };
    // Up once it accepts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let auth = basic("alice", "pw");
    let h = [("Authorization", auth.as_str())];
    let hash = &shared_top().file_name().unwrap().to_str().unwrap()[..32];

    assert_eq!(get(addr, &format!("/{hash}.narinfo")).status, 401);
    let wrong = basic("alice", "nope");
    assert_eq!(
        request(addr, "GET", "/nix-cache-info", &[("Authorization", &wrong)]).status,
        401
    );
    let info = request(addr, "GET", "/nix-cache-info", &h);
    assert_eq!(info.status, 200);
    assert_eq!(
        info.body,
        std::fs::read(dir.join(layout::CACHE_INFO)).unwrap()
    );
    let ni = request(addr, "GET", &format!("/{hash}.narinfo"), &h);
    assert_eq!(ni.status, 200);
    assert_eq!(ni.header("content-type"), Some("text/x-nix-narinfo"));
    assert_eq!(
        ni.header("cache-control"),
        Some("private, max-age=60"),
        "authenticated answers are private"
    );
    assert_eq!(
        ni.body,
        std::fs::read(dir.join(layout::narinfo_key(hash))).unwrap()
    );
    let absent = "0".repeat(32);
    assert_eq!(
        request(addr, "GET", &format!("/{absent}.narinfo"), &h).status,
        404
    );
    let nar = nar_of_top(&dir);
    let bytes = std::fs::read(dir.join(&nar)).unwrap();
    let r = request(addr, "GET", &format!("/{nar}"), &h);
    assert_eq!((r.status, r.body.len()), (200, bytes.len()));
    assert_eq!(r.body, bytes);
    let r = request(
        addr,
        "GET",
        &format!("/{nar}"),
        &[("Authorization", auth.as_str()), ("Range", "bytes=-5")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, bytes[bytes.len() - 5..]);
    assert_eq!(request(addr, "DELETE", &format!("/{nar}"), &h).status, 405);
    // A symlink planted in the directory that leads out of it is never followed: 5xx,
    // and not a byte of what it points at. One inside the cache is served.
    let secret = tmp.path().join("gateway-secret");
    std::fs::write(&secret, "the gateway's own secret").unwrap();
    let planted = format!("nar/{}.nar", "1".repeat(52));
    std::os::unix::fs::symlink(&secret, dir.join(&planted)).unwrap();
    for method in ["GET", "HEAD"] {
        let r = request(addr, method, &format!("/{planted}"), &h);
        assert_eq!(r.status, 502, "{method}");
        assert!(!r.text().contains("secret"), "{method}: {}", r.text());
    }
    let inside = format!("nar/{}.nar", "2".repeat(52));
    std::os::unix::fs::symlink(dir.join(&nar), dir.join(&inside)).unwrap();
    let r = request(addr, "GET", &format!("/{inside}"), &h);
    assert_eq!((r.status, r.body == bytes), (200, true));
    assert_eq!(get(addr, "/healthz").status, 200);

    // The directory goes away: a missing NAR is then not "absent" but an outage (5xx), and
    // /healthz says so once its 2 s memory has passed.
    let gone = tmp.path().join("moved-away");
    std::fs::rename(&dir, &gone).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(get(addr, "/healthz").status, 503);
    assert_eq!(request(addr, "HEAD", &format!("/{nar}"), &h).status, 503);
    std::fs::rename(&gone, &dir).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(get(addr, "/healthz").status, 200);

    stop.notify_one();
    rt.block_on(server).unwrap().unwrap();
}

/// The credential files are reloaded when they change and on SIGHUP (which never stops
/// the gateway); a file that cannot be used keeps the credentials in use; each 401 in the
/// log says why.
#[test]
fn credentials_reload_on_change_and_sighup_and_401s_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = filled_cache(tmp.path());
    let pw = htpasswd(tmp.path(), "alice", "alice-pw");
    let alice_line = std::fs::read_to_string(&pw).unwrap();
    std::fs::create_dir_all(tmp.path().join("b")).unwrap();
    let bob_line =
        std::fs::read_to_string(htpasswd(&tmp.path().join("b"), "bob", "bob-pw")).unwrap();
    let gw = Gateway::start(gateway_from(
        &format!("file://{}", dir.display()),
        None,
        &["--htpasswd", pw.to_str().unwrap()],
    ));
    let status = |user: &str, pass: &str| {
        request(
            gw.addr,
            "GET",
            "/nix-cache-info",
            &[("Authorization", &basic(user, pass))],
        )
        .status
    };
    let wait_for = |want: u16, user: &str, pass: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while status(user, pass) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{user} never got {want}: {}",
                gw.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(status("alice", "alice-pw"), 200);
    assert_eq!(status("bob", "bob-pw"), 401);
    assert_eq!(status("alice", "nope"), 401);
    assert_eq!(get(gw.addr, "/nix-cache-info").status, 401);
    // The log is read as it comes: wait for the last of the four lines.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gw.log_text().contains("(no credentials)") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = gw.log_text();
    for why in [
        "(unknown user \"bob\")",
        "(wrong password for user \"alice\")",
        "(no credentials)",
    ] {
        assert!(log.contains(why), "{why} not in {log}");
    }
    assert!(
        !log.contains("bob-pw") && !log.contains("alice-pw"),
        "{log}"
    );

    // Bob added to the live file: accepted without a restart.
    std::fs::write(&pw, format!("{alice_line}\n{bob_line}\n")).unwrap();
    wait_for(200, "bob", "bob-pw");
    // Alice removed, then SIGHUP: she is refused, and the gateway is still serving.
    std::fs::write(&pw, format!("{bob_line}\n")).unwrap();
    send_signal(gw.child.id(), "-HUP");
    wait_for(401, "alice", "alice-pw");
    assert_eq!(status("bob", "bob-pw"), 200);
    assert!(
        gw.log_text().contains("credentials reloaded"),
        "{}",
        gw.log_text()
    );
    // A broken file keeps what works.
    std::fs::write(&pw, "this is not an htpasswd line\n").unwrap();
    send_signal(gw.child.id(), "-HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !gw.log_text().contains("the previous ones stay in use") {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status("bob", "bob-pw"), 200);
}

fn send_signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A `--config` file may give `listen` as one string or a list, and the gateway's flags
/// all have variables (`CACHEPUSH_GATEWAY_QUIET` silences the access log).
#[test]
fn a_config_file_takes_one_listen_address_as_a_string() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = filled_cache(tmp.path());
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "from = \"file://{}\"\nlisten = \"127.0.0.1:0\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut c = cachepush();
    c.args(["gateway", "--config"]).arg(&config);
    c.env("CACHEPUSH_GATEWAY_QUIET", "true");
    let gw = Gateway::start(c);
    assert_eq!(get(gw.addr, "/nix-cache-info").status, 200);
    assert!(
        !gw.log_text().contains("GET /nix-cache-info"),
        "{}",
        gw.log_text()
    );
    std::fs::write(
        &config,
        format!(
            "from = \"file://{}\"\nlisten = [\"127.0.0.1:0\"]\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut c = cachepush();
    c.args(["gateway", "--config"]).arg(&config);
    let gw = Gateway::start(c);
    assert_eq!(get(gw.addr, "/nix-cache-info").status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gw.log_text().contains("GET /nix-cache-info") {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}
