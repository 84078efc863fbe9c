//! Shared helpers for the integration tests: the real `nix`, the cachepush binary, and
//! loud failures when a prerequisite is missing (the test command installs them).

#![allow(dead_code)]

pub mod cmd;
pub mod fault;
pub mod http;
pub mod s3;

pub use cmd::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const NIX_FLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command"];

/// Panics with what to run when a tool the tests need is not installed.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed; run `scripts/test.sh` (it installs the test prerequisites) \
         or `apt-get install nix-bin`"
    );
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs a command and returns its output, panicking with its stderr if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builds an attribute of `tests/fixtures/closure.nix` with the real Nix.
pub fn build(attr: &str, salt: &str) -> PathBuf {
    require("nix-build");
    let out = run_ok(
        Command::new("nix-build")
            .arg(fixture("closure.nix"))
            .args(["--no-out-link", "--argstr", "salt", salt])
            .args(if attr.is_empty() {
                vec![]
            } else {
                vec!["-A", attr]
            })
            .args(["--option", "substituters", ""]),
    );
    PathBuf::from(stdout(&out))
}

/// Builds `tests/fixtures/wide.nix`: 150 small leaves under one top, 151 paths in all.
pub fn build_wide(salt: &str) -> PathBuf {
    require("nix-build");
    let out = run_ok(
        Command::new("nix-build")
            .arg(fixture("wide.nix"))
            .args(["--no-out-link", "--argstr", "salt", salt])
            .args(["--option", "substituters", ""]),
    );
    PathBuf::from(stdout(&out))
}

/// Builds `tests/fixtures/big.nix` (small <- big <- top) with a large file of `mib` MiB.
pub fn build_big(salt: &str, mib: u32) -> PathBuf {
    require("nix-build");
    let out = run_ok(
        Command::new("nix-build")
            .arg(fixture("big.nix"))
            .args(["--no-out-link", "--argstr", "salt", salt])
            .args(["--argstr", "mib", &mib.to_string()])
            .args(["--option", "substituters", ""]),
    );
    PathBuf::from(stdout(&out))
}

/// The closure fixture built once per test binary with the empty salt.
pub fn shared_top() -> &'static Path {
    static TOP: OnceLock<PathBuf> = OnceLock::new();
    TOP.get_or_init(|| build("", ""))
}

pub fn closure_of(path: &Path) -> Vec<PathBuf> {
    let out = run_ok(Command::new("nix-store").args(["-qR"]).arg(path));
    stdout(&out).lines().map(PathBuf::from).collect()
}

/// The real `nix`, with the new CLI enabled and a narinfo disk cache of its own.
///
/// Nix remembers every narinfo it fetched (for days) keyed by the cache's URL. Gateways in
/// these tests listen on ephemeral ports, so a port reused by a later test would get the
/// earlier test's narinfos (signed with another key) from that memory instead of from the
/// gateway: a fresh `XDG_CACHE_HOME` per invocation keeps each run honest.
pub fn nix() -> Command {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    require("nix");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "nix-cache-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut c = Command::new("nix");
    c.args(NIX_FLAGS).env("XDG_CACHE_HOME", cache);
    c
}

/// `nix copy --from CACHE --to <fresh dir> PATH` with signatures checked against `pubkey`.
pub fn nix_substitute(cache_url: &str, dest: &Path, path: &Path, pubkey: &str) -> Output {
    nix()
        .args(["copy", "--from", cache_url, "--to"])
        .arg(dest)
        .arg(path)
        .args(["--option", "trusted-public-keys", pubkey])
        .args(["--option", "require-sigs", "true"])
        .output()
        .expect("run nix copy")
}

/// The narinfo files of a local cache directory.
pub fn narinfos(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A new signing key `NAME` in `dir` (`NAME.sk`), made by `cachepush keygen`; returns the
/// secret key file and the public key.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let sk = dir.join(format!("{name}.sk"));
    let out = run_ok(cachepush().arg("keygen").arg(name).arg(&sk));
    (sk, stdout(&out))
}

/// A salt or name no other test run uses.
pub fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{tag}-{nanos}")
}

/// A command's standard error, as text.
pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Sends SIGTERM to a process, as systemd or a CI cancel would.
pub fn sigterm(pid: u32) {
    run_ok(Command::new("kill").arg("-TERM").arg(pid.to_string()));
}

/// A long-running cachepush (a watcher) whose stderr is collected as it comes, so that a
/// test can wait for what it says instead of sleeping and hoping.
pub struct Logged {
    pub child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Logged {
    pub fn spawn(mut cmd: Command) -> Logged {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start cachepush");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Logged { child, log }
    }

    pub fn text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle`; panics with the log after `within`.
    pub fn wait_for(&self, needle: &str, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        while !self.text().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} within {within:?}:\n{}",
                self.text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        sigterm(self.child.id());
        self.child.wait().expect("wait for cachepush")
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The hash part of a store path (the name of its narinfo).
pub fn hash_of(path: &Path) -> String {
    path.file_name().unwrap().to_str().unwrap()[..32].to_owned()
}

/// `cachepush token issue`: a scoped token for `scope` on `prefix`, valid for `expires`.
pub fn issue_token(tk: &Path, scope: &str, prefix: &str, expires: &str) -> String {
    let out = run_ok(
        cachepush()
            .args(["token", "issue", "--token-key"])
            .arg(tk)
            .args(["--scope", scope, "--prefix", prefix, "--expires", expires]),
    );
    let t = stdout(&out);
    assert!(t.starts_with("cpt1.") && !t.contains('\n'), "{t}");
    t
}
