//! The one way tests build cachepush command lines: [`cachepush`] (hermetic: an empty
//! home, no `CACHEPUSH_*` from the developer's shell) and the common subcommands on top of
//! it, with a test server's S3 credentials when the cache is in a bucket.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::s3::S3;
use super::{nix, require, stdout};

/// An empty home directory for cachepush processes: a developer's own
/// `~/.config/cachepush/config.toml` (or a `cachepush.toml` above the checkout) must not
/// change what a test sees. Tests that want a config file set `HOME`, `XDG_CONFIG_HOME` or
/// the working directory themselves.
fn empty_home() -> &'static Path {
    static HOME: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        // Under the system's temp dir, not the checkout: a `cachepush.toml` is looked for
        // in every parent of the working directory.
        let d = std::env::temp_dir().join(format!("cachepush-tests-home-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the tests' empty home");
        d
    })
}

pub fn cachepush() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cachepush"));
    let home = empty_home();
    c.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .current_dir(home);
    // Tests choose their own keys and targets; nothing leaks in from the developer's shell
    // (or from a CI system's), except the test servers' coordinates.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CACHEPUSH_") && !k.starts_with("CACHEPUSH_TEST_"))
            || k == "GITHUB_ACTIONS"
        {
            c.env_remove(&*k);
        }
    }
    c
}

/// `cachepush SUB`, with `s3`'s credentials when the cache is in one of its buckets.
pub fn command(sub: &str, s3: Option<&S3>) -> Command {
    let mut c = cachepush();
    if let Some(s3) = s3 {
        s3.creds(&mut c);
    }
    c.arg(sub);
    c
}

/// `cachepush copy --to URL [--signing-key SK] EXTRA...` (paths still to add).
pub fn copy_cmd(url: &str, s3: Option<&S3>, sk: Option<&Path>, extra: &[&str]) -> Command {
    let mut c = command("copy", s3);
    c.arg("--to").arg(url);
    if let Some(sk) = sk {
        c.arg("--signing-key").arg(sk);
    }
    c.args(extra);
    c
}

/// `cachepush gateway --from URL --listen 127.0.0.1:0 EXTRA...`, for [`super::http::Gateway`].
pub fn gateway_from(url: &str, s3: Option<&S3>, extra: &[&str]) -> Command {
    let mut c = command("gateway", s3);
    c.arg("--from")
        .arg(url)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra);
    c
}

/// `nix copy --from URL` into a fresh store, signatures checked, with a netrc file or none.
pub fn nix_via(url: &str, dest: &Path, path: &Path, pk: &str, netrc: Option<&Path>) -> Output {
    let netrc = netrc.map_or("/nonexistent/netrc".into(), |p| p.display().to_string());
    nix()
        .args(["copy", "--from", url, "--to"])
        .arg(dest)
        .arg(path)
        .args(["--option", "trusted-public-keys", pk])
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "netrc-file", &netrc])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .output()
        .expect("run nix copy")
}

pub fn htpasswd(dir: &Path, user: &str, pass: &str) -> PathBuf {
    require("htpasswd");
    // The password on stdin (-i), as a careful user would, not on the command line.
    let mut child = Command::new("htpasswd")
        .args(["-niB", user])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), pass.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let file = dir.join("htpasswd");
    std::fs::write(&file, stdout(&out)).unwrap();
    file
}

pub fn netrc(dir: &Path, name: &str, user: &str, pass: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(
        &file,
        format!("machine localhost login {user} password {pass}\n"),
    )
    .unwrap();
    file
}
