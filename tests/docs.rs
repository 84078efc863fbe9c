//! Docs as tests: every shell command in README.md and docs/quickstart.md is run as a new
//! user would run it, in a fresh home directory, with the provider's endpoint and
//! credentials replaced by the loopback SeaweedFS, `/etc/cachepush` by a scratch
//! directory, and `nix build` by a build of the test fixture. A page whose command fails
//! fails the suite; and a command broken on purpose is shown to fail it.
//!
//! Not run, each for a stated reason (`SKIPPED`): installing cachepush (it is the binary
//! under test; no network), and the two scripts that are themselves the test command.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::s3::S3;
use common::*;

/// Commands a page shows that are not run here, with why.
const SKIPPED: [(&str, &str); 4] = [
    (
        "nix profile install",
        "installs cachepush from the network; the binary under test is used",
    ),
    ("cargo install", "builds the binary under test again"),
    ("scripts/demo.sh", "run by scripts/test.sh itself"),
    ("scripts/test.sh", "is the test command"),
];

/// The commands of a page's `sh` and `console` blocks, continuation lines joined, prompts,
/// comments and output lines dropped.
fn commands(page: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut lang, mut inside, mut pending) = (String::new(), false, String::new());
    for line in page.lines() {
        if let Some(fence) = line.strip_prefix("```") {
            inside = !inside;
            lang = fence.trim().to_owned();
            continue;
        }
        if !inside || !matches!(lang.as_str(), "sh" | "bash" | "console") {
            continue;
        }
        let text = if lang == "console" {
            match line.strip_prefix("$ ") {
                Some(c) => c,
                None if !pending.is_empty() => line,
                None => continue, // output
            }
        } else {
            line
        };
        let text = text.split(" # ").next().unwrap_or(text).trim_end();
        if text.trim_start().starts_with('#') || text.trim().is_empty() {
            continue;
        }
        if let Some(head) = text.strip_suffix('\\') {
            pending.push_str(head.trim());
            pending.push(' ');
        } else {
            pending.push_str(text.trim_start());
            out.push(std::mem::take(&mut pending));
        }
    }
    out
}

struct Sandbox {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    etc: PathBuf,
    work: PathBuf,
    s3: S3,
    bucket: String,
}

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let (home, etc, work) = (
            tmp.path().join("home"),
            tmp.path().join("etc"),
            tmp.path().join("work"),
        );
        for d in [&home, &etc, &work] {
            std::fs::create_dir_all(d).unwrap();
        }
        let s3 = S3::seaweedfs();
        let bucket = s3.new_bucket("docs");
        Sandbox {
            _tmp: tmp,
            home,
            etc,
            work,
            s3,
            bucket,
        }
    }

    /// The command as it runs here, or why it is not run.
    fn translate(&self, cmd: &str) -> Result<String, &'static str> {
        if let Some((_, why)) = SKIPPED.iter().find(|(p, _)| cmd.starts_with(p)) {
            return Err(why);
        }
        let endpoint = format!("endpoint={}&region=us-east-1", self.s3.endpoint);
        let mut c = cmd
            .replace(
                "endpoint=https://s3.us-west-004.backblazeb2.com&region=us-west-004",
                &endpoint,
            )
            .replace("s3://nix-cache?", &format!("s3://{}?", self.bucket))
            .replace("/etc/cachepush", &self.etc.display().to_string())
            .replace("sudo ", "")
            // No network here: the upstream is the one thing a loopback run cannot ask.
            .replace(" --upstream https://cache.nixos.org", "");
        if c.starts_with("nix build ") {
            c = format!(
                "ln -sfn \"$(nix-build {} --no-out-link --option substituters '')\" result",
                fixture("closure.nix").display()
            );
        }
        if c.starts_with("export AWS_ACCESS_KEY_ID=...") {
            c = format!(
                "export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={}",
                std::env::var("CACHEPUSH_TEST_ACCESS_KEY").unwrap(),
                self.s3.secret_key
            );
        }
        Ok(c)
    }

    /// Runs one page's commands in order, in one shell environment (exports carry over);
    /// a gateway (which runs until stopped) is started, checked to serve, and stopped.
    fn run_page(&self, name: &str, page: &str) -> Result<usize, String> {
        let mut script = String::from("set -euo pipefail\n");
        let mut ran = 0;
        for cmd in commands(page) {
            let c = match self.translate(&cmd) {
                Ok(c) => c,
                Err(why) => {
                    eprintln!("{name}: not run ({why}): {cmd}");
                    continue;
                }
            };
            ran += 1;
            if c.starts_with("cachepush gateway ") {
                // Its own listen address, on loopback; the page's TLS files made first.
                let c = c
                    .replace("--listen '[::]:8080'", "--listen 127.0.0.1:0")
                    .replace("--listen '[::]:443'", "--listen 127.0.0.1:0");
                script.push_str(&format!(
                    "{{ {c} 2> gateway.log & echo $! > gateway.pid; }}\n\
                     for i in $(seq 100); do grep -q 'listening on' gateway.log && break; sleep 0.1; done\n\
                     grep -q 'listening on' gateway.log || {{ cat gateway.log >&2; exit 1; }}\n\
                     kill $(cat gateway.pid); wait $(cat gateway.pid) || true\n"
                ));
            } else {
                script.push_str(&c);
                script.push('\n');
            }
        }
        let cert = self.etc.join("cert.pem");
        let o = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
                 -keyout {key} -out {cert} 2>/dev/null\n{script}",
                key = self.etc.join("key.pem").display(),
                cert = cert.display(),
            ))
            .current_dir(&self.work)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("PATH", path_with_cachepush())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        if o.status.success() {
            Ok(ran)
        } else {
            Err(format!(
                "{name}: a documented command failed ({}):\n{script}\n--- stderr:\n{}",
                o.status,
                stderr_of(&o)
            ))
        }
    }
}

/// PATH with the cachepush under test first (as an installed one would be).
fn path_with_cachepush() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_cachepush"))
        .parent()
        .unwrap()
        .to_owned();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn page(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

#[test]
fn the_readme_and_the_quickstart_work_when_followed_literally() {
    require("htpasswd");
    require("openssl");
    let started = Instant::now();
    for name in ["README.md", "docs/quickstart.md"] {
        let sandbox = Sandbox::new();
        let ran = sandbox
            .run_page(name, &page(name))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(ran >= 3, "{name}: only {ran} commands ran");
        // What the page promised happened: a signed cache in the bucket.
        let keys = sandbox.s3.keys(&sandbox.bucket, "");
        assert!(
            keys.iter().any(|k| k.ends_with(".narinfo"))
                && keys.iter().any(|k| k == "nix-cache-info"),
            "{name}: nothing was published: {keys:?}"
        );
        assert!(
            sandbox.home.join(".config/cachepush/cache.sk").is_file(),
            "{name}: the key is not where the page put it"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(600));
}

/// The runner is not a rubber stamp: the same page with one command broken on purpose
/// fails, naming the command.
#[test]
fn a_broken_documented_command_fails_the_docs_test() {
    let quickstart = page("docs/quickstart.md").replace("--signing-key ~/", "--signing-kee ~/");
    let sandbox = Sandbox::new();
    let e = sandbox
        .run_page("quickstart (broken)", &quickstart)
        .expect_err("a broken page passed");
    assert!(e.contains("--signing-kee"), "{e}");
}

#[test]
fn commands_are_read_as_a_reader_would_type_them() {
    let page = "text\n```console\n$ a \\\n    b\n  output line\n$ c # comment\n```\n```\nnot shell\n```\n```sh\n# note\nd\n```\n";
    assert_eq!(commands(page), vec!["a b", "c", "d"]);
}
