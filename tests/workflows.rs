//! Where users run cachepush: around builds (watch-exec), behind Nix's post-build hook,
//! from a direnv-configured shell, in GitHub Actions; and the files that package and
//! document it (flake, NixOS modules, minio-compose.yml, examples, completions, man page).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fault::{Fault, FaultProxy, Rule};
use common::s3::S3;
use common::*;

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The store-path hashes that have a narinfo in the bucket.
fn published(s3: &S3, bucket: &str, prefix: &str) -> BTreeSet<String> {
    s3.keys(bucket, prefix)
        .iter()
        .filter_map(|k| k.rsplit('/').next()?.strip_suffix(".narinfo"))
        .map(str::to_owned)
        .collect()
}

fn hashes(paths: &[PathBuf]) -> BTreeSet<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap()[..32].to_owned())
        .collect()
}

fn nix_build_cmd(salt: &str) -> Vec<String> {
    [
        "nix-build",
        fixture("closure.nix").to_str().unwrap(),
        "--no-out-link",
        "--argstr",
        "salt",
        salt,
        "--option",
        "substituters",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn watch_exec_publishes_what_a_nix_build_produces_and_keeps_its_status() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "watch-1");
    let (bucket, prefix) = s3.new_public_cache("watch");
    let watch = |cmd: &[String]| {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.arg("watch-exec")
            .arg("--to")
            .arg(s3.url(&bucket, &prefix))
            .arg("--signing-key")
            .arg(&sk)
            .arg("--")
            .args(cmd)
            .output()
            .unwrap()
    };

    let o = watch(&nix_build_cmd(&unique("watch-exec")));
    assert!(o.status.success(), "{}", stderr_of(&o));
    let top = PathBuf::from(
        out(&o)
            .lines()
            .last()
            .expect("nix-build prints the output path"),
    );
    let closure = closure_of(&top);
    assert_eq!(
        published(&s3, &bucket, &prefix),
        hashes(&closure),
        "{}",
        stderr_of(&o)
    );
    let dest = tmp.path().join("dest");
    let ok = nix_substitute(&s3.http_url(&bucket, &prefix), &dest, &top, &pk);
    assert!(ok.status.success(), "{}", stderr_of(&ok));

    // The command's own status comes back, for a plain failure and for a failed build.
    let o = watch(&["sh".into(), "-c".into(), "exit 3".into()]);
    assert_eq!(o.status.code(), Some(3));
    let failing = vec![
        "nix-build".to_owned(),
        "--no-out-link".into(),
        "-E".into(),
        format!(
            "derivation {{ name = \"fails\"; salt = \"{}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"exit 1\" ]; }}",
            unique("fail")
        ),
    ];
    let direct = Command::new(&failing[0])
        .args(&failing[1..])
        .output()
        .unwrap();
    let o = watch(&failing);
    assert!(!o.status.success());
    assert_eq!(o.status.code(), direct.status.code(), "{}", stderr_of(&o));
}

fn hook(queue: &Path, paths: &[PathBuf]) -> Output {
    let joined: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    cachepush()
        .arg("post-build-hook")
        .env("CACHEPUSH_QUEUE_DIR", queue)
        .env("OUT_PATHS", joined.join(" "))
        .output()
        .unwrap()
}

fn queued(queue: &Path) -> usize {
    std::fs::read_dir(queue)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "paths"))
                .count()
        })
        .unwrap_or(0)
}

/// Sums the "pushed N paths" of every push summary line.
fn pushed_total(log: &str) -> usize {
    log.lines()
        .filter_map(|l| {
            l.split("pushed ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

#[test]
fn the_post_build_hook_queue_survives_a_killed_uploader_and_is_published_once() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "hook-1");
    let bucket = s3.new_bucket("hook");
    let queue = tmp.path().join("queue");
    let top = build("", &unique("hook"));
    let closure = closure_of(&top);

    // Two builds' worth of paths, as the daemon would report them.
    let (first, second) = closure.split_at(closure.len() / 2);
    for batch in [first, second] {
        let o = hook(&queue, batch);
        assert!(o.status.success(), "{}", stderr_of(&o));
    }
    assert_eq!(queued(&queue), 2);
    // A hook that cannot queue still exits 0 (a failing hook would fail the build), and says so.
    let o = hook(Path::new("/proc/cachepush-cannot-write-here"), first);
    assert!(o.status.success());
    assert!(
        stderr_of(&o).contains("will not be uploaded"),
        "{}",
        stderr_of(&o)
    );

    // The uploader is killed mid-batch: the narinfo of batch 1's last path is held at the
    // proxy (and never forwarded), and the kill comes once other paths are published.
    let proxy = FaultProxy::start(&s3.endpoint);
    let held: &'static str = Box::leak(
        format!(
            "/{}.narinfo",
            &first.last().unwrap().file_name().unwrap().to_str().unwrap()[..32]
        )
        .into_boxed_str(),
    );
    proxy.add(Rule {
        method: "PUT",
        target: held,
        times: usize::MAX,
        fault: Fault::StallThenDrop(Duration::from_secs(120)),
    });
    let watch = |endpoint: &str, extra: &[&str]| {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.arg("watch-store")
            .arg("--to")
            .arg(s3.url(&bucket, ""))
            .arg("--endpoint")
            .arg(endpoint)
            .arg("--queue")
            .arg(&queue)
            .arg("--signing-key")
            .arg(&sk)
            .args(["--interval", "0.2"])
            .args(extra);
        c
    };
    let mut killed = Logged::spawn(watch(&proxy.endpoint(), &["--queue-only"]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.injected() == 0 || published(&s3, &bucket, "").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the uploader never got to the held narinfo: {}",
            killed.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    let before = published(&s3, &bucket, "");
    assert!(!before.is_empty() && !before.is_superset(&hashes(first)));
    assert_eq!(
        queued(&queue),
        2,
        "a batch left the queue without being all published"
    );

    // Restarted, nothing held: everything queued is published, and nothing published
    // before the kill is written again.
    proxy.clear();
    proxy.clear_log();
    let o = watch(&proxy.endpoint(), &["--once"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(queued(&queue), 0);
    assert_eq!(published(&s3, &bucket, ""), hashes(&closure));
    assert_eq!(
        pushed_total(&stderr_of(&o)),
        closure.len() - before.len(),
        "{}",
        stderr_of(&o)
    );
    let mut puts: std::collections::BTreeMap<String, usize> = Default::default();
    for l in proxy.log() {
        let path = l.target.split('?').next().unwrap().to_owned();
        if l.method == "PUT" && l.ok() && path.ends_with(".narinfo") {
            *puts.entry(path).or_default() += 1;
        }
    }
    assert_eq!(puts.len(), closure.len() - before.len(), "{puts:?}");
    assert!(puts.values().all(|n| *n == 1), "{puts:?}");
    assert!(
        puts.keys()
            .all(|k| !before.contains(&k.rsplit('/').next().unwrap()[..32])),
        "re-published what was there: {puts:?}"
    );

    // A running watcher picks up new batches as they come, and stops cleanly on SIGTERM.
    let more = build("", &unique("hook-more"));
    let mut running = watch(&s3.endpoint, &["--queue-only"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(hook(&queue, std::slice::from_ref(&more)).status.success());
    let want = hashes(&closure_of(&more));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !want.is_subset(&published(&s3, &bucket, "")) {
        assert!(
            Instant::now() < deadline,
            "the running watcher did not publish the new batch"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    run_ok(
        Command::new("kill")
            .arg("-TERM")
            .arg(running.id().to_string()),
    );
    let status = running.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(queued(&queue), 0);
}

#[test]
fn an_envrc_or_a_project_file_configures_push_without_flags() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "envrc-1");
    let top = shared_top();
    let closure = closure_of(top);

    // What a .envrc exports: the target and the credentials, nothing on the command line.
    let bucket = s3.new_bucket("envrc");
    let mut c = cachepush();
    s3.creds(&mut c);
    let key_text = std::fs::read_to_string(&sk).unwrap();
    let o = c
        .env("CACHEPUSH_TO", s3.url(&bucket, ""))
        .env("CACHEPUSH_SIGNING_KEY", key_text.trim())
        .env("CACHEPUSH_CONFIG", "/nonexistent/cachepush.toml.unused")
        .arg("push")
        .arg(top)
        .output()
        .unwrap();
    // CACHEPUSH_CONFIG names a missing file: that is an error, not silently ignored.
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("/nonexistent/cachepush.toml.unused"));
    let mut c = cachepush();
    s3.creds(&mut c);
    let o = c
        .env("CACHEPUSH_TO", s3.url(&bucket, ""))
        .env("CACHEPUSH_SIGNING_KEY", key_text.trim())
        .current_dir(tmp.path())
        .arg("push")
        .arg(top)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(published(&s3, &bucket, ""), hashes(&closure));
    let one = String::from_utf8(s3.get(
        &bucket,
        &format!("{}.narinfo", &hashes(&closure).into_iter().next().unwrap()),
    ))
    .unwrap();
    assert!(one.contains("Sig: envrc-1:"), "{one}");

    // A project's cachepush.toml, found from a subdirectory; the key path is relative to it.
    let project = tmp.path().join("project");
    std::fs::create_dir_all(project.join("keys")).unwrap();
    std::fs::create_dir_all(project.join("sub/dir")).unwrap();
    std::fs::copy(&sk, project.join("keys/cache.sk")).unwrap();
    let bucket2 = s3.new_bucket("toml");
    std::fs::write(
        project.join("cachepush.toml"),
        format!(
            "to = {:?}\nsigning-key-file = \"keys/cache.sk\"\ncompression = \"xz\"\n",
            s3.url(&bucket2, "")
        ),
    )
    .unwrap();
    let mut c = cachepush();
    s3.creds(&mut c);
    let o = c
        .current_dir(project.join("sub/dir"))
        .env("HOME", tmp.path())
        .arg("push")
        .arg(top)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let infos = published(&s3, &bucket2, "");
    assert_eq!(infos, hashes(&closure));
    let one = String::from_utf8(s3.get(
        &bucket2,
        &format!("{}.narinfo", infos.iter().next().unwrap()),
    ))
    .unwrap();
    assert!(
        one.contains("Compression: xz") && one.contains("Sig: envrc-1:"),
        "{one}"
    );

    // A typo in the file is an error naming the key and the line.
    std::fs::write(
        project.join("cachepush.toml"),
        "to = \"file:///tmp/x\"\ncompresion = \"xz\"\n",
    )
    .unwrap();
    let o = cachepush()
        .current_dir(&project)
        .env("HOME", tmp.path())
        .arg("push")
        .arg(top)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("compresion") && stderr_of(&o).contains("line 2"),
        "{}",
        stderr_of(&o)
    );

    // Nothing configured anywhere: one clear line saying what to do.
    let o = cachepush()
        .current_dir(tmp.path())
        .env("HOME", tmp.path())
        .arg("push")
        .arg(top)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o).contains("no cache to publish to") && stderr_of(&o).contains("CACHEPUSH_TO")
    );
}

#[test]
fn github_actions_get_groups_and_annotations_on_stderr_never_the_key_and_a_clean_skip_for_forks() {
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "gha-1");
    let top = shared_top();
    let cache = format!("file://{}", tmp.path().join("cache").display());
    let secret = std::fs::read_to_string(&sk).unwrap();
    let secret = secret.trim().split_once(':').unwrap().1.to_owned();
    // Security review H1: with `--json > file`, stdout must be exactly one JSON value and
    // the key must appear on neither stream, whether it came from a file or from the
    // environment (where the runner has masked it already).
    for from_env in [false, true] {
        let mut c = cachepush();
        c.env("GITHUB_ACTIONS", "true")
            .args(["copy", "--json", "--to", &cache]);
        if from_env {
            c.env(
                "CACHEPUSH_SIGNING_KEY",
                std::fs::read_to_string(&sk).unwrap(),
            );
        } else {
            c.arg("--signing-key").arg(&sk);
        }
        let o = c.arg(top).output().unwrap();
        assert!(o.status.success(), "{}", stderr_of(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {}", out(&o)));
        assert!(v.get("pushed").is_some(), "{v}");
        assert!(!out(&o).contains(&secret), "the key is on stdout");
        assert!(!stderr_of(&o).contains(&secret), "the key is on stderr");
        assert!(
            !out(&o).contains("::"),
            "workflow command on stdout: {}",
            out(&o)
        );
        assert!(
            stderr_of(&o).contains("::group::pushing ") && stderr_of(&o).contains("::endgroup::"),
            "{}",
            stderr_of(&o)
        );
    }
    // Outside Actions, none of that.
    let plain = run_ok(
        cachepush()
            .env_remove("GITHUB_ACTIONS")
            .args(["copy", "--to", &cache, "--signing-key"])
            .arg(&sk)
            .arg(top),
    );
    assert!(!out(&plain).contains("::"), "{}", out(&plain));
    assert!(!stderr_of(&plain).contains("::"), "{}", stderr_of(&plain));

    let bad = tmp.path().join("bad.sk");
    std::fs::write(&bad, "truncated:AAAA").unwrap();
    let o = cachepush()
        .env("GITHUB_ACTIONS", "true")
        .args(["copy", "--to", &cache, "--signing-key"])
        .arg(&bad)
        .arg(top)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr_of(&o)
            .lines()
            .any(|l| l.starts_with("::error::secret key file")),
        "{}",
        stderr_of(&o)
    );
    assert!(o.stdout.is_empty(), "{}", out(&o));

    // A pull request from a fork: the secrets are empty. With the switch, a warning and
    // exit 0 that writes nothing; without it, a failure.
    let s3 = S3::seaweedfs();
    let bucket = s3.new_bucket("fork");
    let fork = |skip: bool| {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.env("AWS_ACCESS_KEY_ID", "")
            .env("AWS_SECRET_ACCESS_KEY", "")
            .env("GITHUB_ACTIONS", "true")
            .args(["copy", "--to", &s3.url(&bucket, "")])
            .arg(top);
        if skip {
            c.env("CACHEPUSH_SKIP_IF_NO_CREDENTIALS", "true")
                .env("CACHEPUSH_SIGNING_KEY", "");
        }
        c.output().unwrap()
    };
    let o = fork(true);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("skipping the push"),
        "{}",
        stderr_of(&o)
    );
    assert!(stderr_of(&o).contains("::warning::"), "{}", stderr_of(&o));
    assert!(s3.keys(&bucket, "").is_empty());
    let o = fork(false);
    // Without the switch: the target cannot be written (3), and the reason is named.
    assert_eq!(
        o.status.code(),
        Some(3),
        "a push without credentials must fail unless told to skip: {}",
        stderr_of(&o)
    );
    assert!(stderr_of(&o).contains("credential"), "{}", stderr_of(&o));
    assert!(s3.keys(&bucket, "").is_empty());
    // An empty signing-key secret without the switch: an error naming it (exit 2), not an
    // unsigned push that every client would refuse.
    let mut c = cachepush();
    s3.creds(&mut c);
    let o = c
        .env("CACHEPUSH_SIGNING_KEY", "")
        .args(["copy", "--to", &s3.url(&bucket, "")])
        .arg(top)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("CACHEPUSH_SIGNING_KEY is set but empty"),
        "{}",
        stderr_of(&o)
    );
    assert!(s3.keys(&bucket, "").is_empty());
    // The signing key alone can be what is missing.
    let mut c = cachepush();
    s3.creds(&mut c);
    let o = c
        .env("CACHEPUSH_SIGNING_KEY", "")
        .env("CACHEPUSH_SKIP_IF_NO_CREDENTIALS", "1")
        .args(["copy", "--to", &s3.url(&bucket, "")])
        .arg(top)
        .output()
        .unwrap();
    assert!(
        o.status.success() && stderr_of(&o).contains("CACHEPUSH_SIGNING_KEY is empty"),
        "{}",
        stderr_of(&o)
    );
    assert!(s3.keys(&bucket, "").is_empty());
}

#[test]
/// The NixOS modules are evaluated against a small stub of nixpkgs' `lib`
/// (tests/fixtures/nixos-lib-stub.nix: this machine cannot fetch nixpkgs), so what is
/// checked is the units they produce and their assertions, not nixpkgs' option types.
fn the_flake_and_nixos_modules_parse_and_evaluate_against_a_lib_stub() {
    require("nix-instantiate");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in [
        "flake.nix",
        "nix/gateway-module.nix",
        "nix/post-build-hook-module.nix",
        "nix/gc-module.nix",
    ] {
        run_ok(
            Command::new("nix-instantiate")
                .arg("--parse")
                .arg(root.join(f)),
        );
    }
    let o = run_ok(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .arg(fixture("nixos-modules-eval.nix")),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    for opt in [
        "enable",
        "package",
        "from",
        "listen",
        "narDelivery",
        "credentialsFile",
        "htpasswdFile",
        "tokensFile",
        "signingKeyFile",
    ] {
        assert!(
            names("gatewayOptions").contains(&opt.to_owned()),
            "missing option {opt}"
        );
    }
    for opt in [
        "enable",
        "to",
        "queueDir",
        "credentialsFile",
        "signingKeyFile",
    ] {
        assert!(
            names("hookOptions").contains(&opt.to_owned()),
            "missing option {opt}"
        );
    }
    assert_eq!(v["gatewayEnabled"], true);
    let sc = &v["gatewayService"]["serviceConfig"];
    assert_eq!(sc["DynamicUser"], true);
    assert_eq!(sc["ProtectSystem"], "strict");
    let creds: Vec<&str> = sc["LoadCredential"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        creds,
        [
            "aws-credentials:/run/secrets/aws",
            "htpasswd:/run/secrets/htpasswd"
        ]
    );
    let exec = sc["ExecStart"].as_str().unwrap();
    for part in [
        "'gateway'",
        "'--nar-delivery' 'proxy'",
        "'--listen' '[::]:8080'",
        "'--htpasswd' '%d/htpasswd'",
    ] {
        assert!(exec.contains(part), "{exec}");
    }
    assert!(
        !exec.contains("/run/secrets"),
        "a secret path on the command line: {exec}"
    );
    assert_eq!(
        v["gatewayService"]["environment"]["AWS_SHARED_CREDENTIALS_FILE"],
        "%d/aws-credentials"
    );
    // The gc timer: its options, the command it runs, the credential outside the store.
    for opt in [
        "enable",
        "cache",
        "keepDays",
        "keepReadDays",
        "grace",
        "startAt",
        "credentialsFile",
    ] {
        assert!(
            names("gcOptions").contains(&opt.to_owned()),
            "missing gc option {opt}"
        );
    }
    let gc = &v["gcService"];
    assert_eq!(gc["startAt"], "daily");
    assert_eq!(gc["serviceConfig"]["Type"], "oneshot");
    let exec = gc["serviceConfig"]["ExecStart"].as_str().unwrap();
    for part in [
        "'gc' 's3://nix-cache?endpoint=https://example.org'",
        "'--keep-days' '30'",
        "'--grace' '6h'",
        "'--keep-read-days' '7'",
        "'--max-delete' '1000'",
    ] {
        assert!(exec.contains(part), "{exec}");
    }
    assert!(!exec.contains("/run/secrets"), "{exec}");
    assert_eq!(
        gc["serviceConfig"]["LoadCredential"][0],
        "aws-credentials:/run/secrets/gc-aws"
    );
    let upload = v["uploadService"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    assert!(upload.contains("'watch-store' '--queue-only'"), "{upload}");
    assert!(
        v["hookSetting"]
            .as_str()
            .unwrap()
            .ends_with("cachepush-post-build-hook")
    );
    // M6: a secret inside the store is refused by name; the same settings with a path
    // outside it pass. A signing key needs a countersigning policy.
    let refused = |k: &str| -> Vec<String> {
        v["refused"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        refused("gatewayGood").is_empty(),
        "{:?}",
        refused("gatewayGood")
    );
    assert!(
        refused("gatewaySigning").is_empty(),
        "{:?}",
        refused("gatewaySigning")
    );
    assert!(refused("hookGood").is_empty(), "{:?}", refused("hookGood"));
    let r = refused("gatewayKeyInStore");
    assert!(
        r.len() == 1 && r[0].contains("signingKeyFile is in the Nix store"),
        "{r:?}"
    );
    let r = refused("hookKeyInStore");
    assert!(
        r.len() == 1 && r[0].contains("signingKeyFile is in the Nix store"),
        "{r:?}"
    );
    assert!(refused("gcGood").is_empty(), "{:?}", refused("gcGood"));
    let r = refused("gcCredsInStore");
    assert!(
        r.len() == 1 && r[0].contains("credentialsFile is in the Nix store"),
        "{r:?}"
    );
    let r = refused("gatewayNoPolicy");
    assert!(r.len() == 1 && r[0].contains("requireSignatureBy"), "{r:?}");
    // A pushing gateway signs what it checked: no countersigning policy needed, but
    // claim rules are (the CLI refuses the same).
    assert!(
        refused("gatewayPush").is_empty(),
        "{:?}",
        refused("gatewayPush")
    );
    let r = refused("gatewayPushNoClaims");
    assert!(r.len() == 1 && r[0].contains("push.claims"), "{r:?}");
    let exec = v["gatewayPushExec"].as_str().unwrap();
    for part in [
        "'--push-oidc-issuer' 'https://token.actions.githubusercontent.com'",
        "'--push-oidc-audience' 'https://cache.example.org'",
        "'--push-claim' 'repository=my-org/*'",
        "'--push-quarantine-prefix' 'quarantine'",
        "'--push-quarantine-claim' 'repository=my-org/*'",
    ] {
        assert!(exec.contains(part), "{exec}");
    }
    let exec = v["gatewaySigningExec"].as_str().unwrap();
    assert!(
        exec.contains("'--signing-key' '%d/signing-key' '--require-signature-by' 'ci-1:AAAA'"),
        "{exec}"
    );
    assert_eq!(sc["LimitNOFILE"], 65536);
    assert_eq!(v["uploadService"]["serviceConfig"]["LimitNOFILE"], 65536);
}

#[test]
fn minio_compose_matches_what_the_docs_say() {
    use yaml_rust2::{Yaml, YamlLoader};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("minio-compose.yml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("minio-compose.yml is YAML");
    let services = &docs[0]["services"];
    let minio = &services["minio"];
    assert!(
        minio["image"]
            .as_str()
            .unwrap()
            .contains("minio/minio:RELEASE."),
        "pin the image"
    );
    let ports: Vec<&str> = minio["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        ports,
        ["127.0.0.1:9000:9000", "127.0.0.1:9001:9001"],
        "loopback only"
    );
    let job = &services["create-bucket"];
    assert!(
        !job["depends_on"]["minio"].is_badvalue(),
        "the job waits for MinIO"
    );
    let script: String = job["entrypoint"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    for part in [
        "mc mb --ignore-existing local/nix-cache",
        "mc admin user add local cachepush cachepush-secret-change-me",
        "readwrite",
    ] {
        assert!(script.contains(part), "{part} not in the job: {script}");
    }
    let page = std::fs::read_to_string(root.join("docs/providers/minio.md")).unwrap();
    for claim in [
        "127.0.0.1:9000",
        "127.0.0.1:9001",
        "`nix-cache`",
        "`cachepush` / `cachepush-secret-change-me`",
        "`create-bucket`",
        "minioadmin-change-me",
    ] {
        assert!(
            page.contains(claim),
            "docs/providers/minio.md lacks {claim}"
        );
    }
}

/// Every `cachepush ...` command in examples/ and docs/: a real subcommand, real flags.
#[test]
fn every_cachepush_command_in_the_examples_and_docs_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["examples", "docs"] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().filter_map(Result::ok) {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
    }
    files.push(root.join("README.md"));
    files.push(root.join("action.yml"));
    let mut helps = std::collections::HashMap::new();
    let mut all_help = String::new();
    let subcommands = [
        "copy",
        "push",
        "gateway",
        "keygen",
        "pubkey",
        "watch-exec",
        "watch-store",
        "post-build-hook",
        "completions",
        "man",
        "verify",
    ];
    for sub in subcommands {
        let h = stdout(&run_ok(cachepush().arg(sub).arg("--help")));
        all_help.push_str(&h);
        helps.insert(sub, h);
    }
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // Join continued lines, then look at each command from `cachepush` on.
        let joined = text.replace("\\\n", " ");
        for line in joined.lines() {
            for (i, _) in line.match_indices("cachepush ") {
                let before = &line[..i];
                if before.ends_with('/') && !before.ends_with("bin/") {
                    continue; // a path such as /etc/cachepush/...
                }
                let words: Vec<&str> = line[i..].split_whitespace().collect();
                let Some(sub) = words.get(1) else { continue };
                if !subcommands.contains(sub) {
                    continue; // prose ("cachepush is ...")
                }
                let help = &helps[sub];
                for w in &words[2..] {
                    if let Some(flag) = w.strip_prefix("--") {
                        let flag = flag
                            .split('=')
                            .next()
                            .unwrap()
                            .trim_end_matches([',', '`', ')', '"']);
                        if flag.is_empty() {
                            break; // `--` before a command
                        }
                        assert!(
                            help.contains(&format!("--{flag}")),
                            "{}: `cachepush {sub}` has no --{flag}",
                            f.display()
                        );
                    }
                    if w.starts_with('|') || w.starts_with(">") || *w == "&&" {
                        break;
                    }
                }
                checked += 1;
            }
        }
        for var in text
            .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .filter(|w| w.starts_with("CACHEPUSH_") && w.len() > 10)
        {
            let known = all_help.contains(var)
                || ["CACHEPUSH_SIGNING_KEY", "CACHEPUSH_CONFIG"].contains(&var);
            assert!(
                known,
                "{}: {var} is not a variable cachepush reads",
                f.display()
            );
        }
    }
    assert!(
        checked > 20,
        "only {checked} commands found: the extraction is broken"
    );
}

#[test]
fn completions_and_a_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let o = run_ok(cachepush().args(["completions", shell]));
        let text = stdout(&o);
        assert!(
            text.contains("watch-exec") && text.contains("signing-key"),
            "{shell}"
        );
    }
    let man = stdout(&run_ok(cachepush().arg("man")));
    assert!(
        man.starts_with(".ie") || man.contains(".TH cachepush"),
        "{}",
        &man[..200.min(man.len())]
    );
    assert!(man.contains("gateway"));
    assert!(
        man.contains("EXIT STATUS") && man.contains("130"),
        "no exit statuses"
    );
    // Every page the main page refers to exists, with the subcommand's flags and variables.
    let tmp = tempfile::tempdir().unwrap();
    run_ok(cachepush().args(["man", "--dir"]).arg(tmp.path()));
    let copy = std::fs::read_to_string(tmp.path().join("cachepush-copy.1")).unwrap();
    for want in [
        "write\\-nar\\-listing",
        "CACHEPUSH_SIGNING_KEY_FILE",
        "skip\\-if\\-no\\-credentials",
    ] {
        assert!(copy.contains(want), "cachepush-copy.1 lacks {want}");
    }
    for page in [
        "cachepush.1",
        "cachepush-gateway.1",
        "cachepush-verify.1",
        "cachepush-keygen.1",
    ] {
        assert!(tmp.path().join(page).is_file(), "{page} missing");
    }
    let o = cachepush().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn watch_store_publishes_new_store_paths_until_stopped() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "watch-store-1");
    let bucket = s3.new_bucket("watchstore");
    // Built before the watcher starts: an old path it must leave alone.
    let old = hashes(&closure_of(shared_top()));
    let mut c = cachepush();
    s3.creds(&mut c);
    c.arg("watch-store")
        .arg("--to")
        .arg(s3.url(&bucket, ""))
        .arg("--signing-key")
        .arg(&sk)
        .arg("--queue")
        .arg(tmp.path().join("queue"))
        .args(["--interval", "0.3"]);
    let mut watcher = Logged::spawn(c);
    // Its snapshot of the store is taken before it says it is watching: only later paths
    // are its business.
    watcher.wait_for("watching the store", Duration::from_secs(60));
    let top = build("", &unique("watch-store"));
    let want = hashes(&closure_of(&top));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !want.is_subset(&published(&s3, &bucket, "")) {
        assert!(
            Instant::now() < deadline,
            "watch-store did not publish the new paths"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What was in the store before it started is left alone.
    assert!(published(&s3, &bucket, "").is_disjoint(&old));
    assert!(watcher.stop().success(), "{}", watcher.text());
}

/// Security review L9: a `cachepush.toml` found in a checkout fills in what the command
/// line leaves open, but never overrides the URL's own `endpoint=`.
#[test]
fn a_project_file_never_overrides_the_urls_own_endpoint() {
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(tmp.path(), "l9-1");
    let top = shared_top();
    let bucket = s3.new_bucket("l9");
    let push = |dir: &Path, to: &str| {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.current_dir(dir)
            .env("HOME", tmp.path())
            .args(["copy", "-q", "--to", to, "--signing-key"])
            .arg(&sk)
            .arg(top)
            .output()
            .unwrap()
    };
    // An untrusted checkout points the endpoint at a port where nothing listens.
    let hostile = tmp.path().join("hostile");
    std::fs::create_dir_all(&hostile).unwrap();
    std::fs::write(
        hostile.join("cachepush.toml"),
        "endpoint = \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
    let o = push(&hostile, &s3.url(&bucket, ""));
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(published(&s3, &bucket, ""), hashes(&closure_of(top)));
    // Where the URL has no endpoint, the file's is used (here, the real server's).
    let helpful = tmp.path().join("helpful");
    std::fs::create_dir_all(&helpful).unwrap();
    std::fs::write(
        helpful.join("cachepush.toml"),
        format!("endpoint = {:?}\nregion = \"us-east-1\"\n", s3.endpoint),
    )
    .unwrap();
    let bucket2 = s3.new_bucket("l9b");
    let o = push(&helpful, &format!("s3://{bucket2}"));
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(published(&s3, &bucket2, ""), hashes(&closure_of(top)));
}

/// Settings precedence, each layer peeled off in turn: flag > environment > project
/// `cachepush.toml` > user `config.toml`, seen in what a push writes (which directory, which
/// compression, which key signed).
#[test]
fn settings_precedence_flag_env_project_user() {
    let tmp = tempfile::tempdir().unwrap();
    let top = shared_top();
    let one = closure_of(top)
        .into_iter()
        .find(|p| p != top)
        .unwrap_or_else(|| top.to_path_buf());
    let layers = ["user", "project", "env", "flag"];
    let mut keys = Vec::new();
    for l in layers {
        let (sk, _) = keygen(tmp.path(), &format!("{l}-1"));
        keys.push(sk);
    }
    let dir = |l: &str| tmp.path().join(format!("cache-{l}"));
    let algo = |l: &str| match l {
        "user" => "xz",
        "project" => "none",
        "env" => "zstd",
        _ => "xz",
    };
    let home = tmp.path().join("home");
    let project = tmp.path().join("project");
    std::fs::create_dir_all(home.join(".config/cachepush")).unwrap();
    std::fs::create_dir_all(&project).unwrap();
    let file = |l: &str, k: &Path| {
        format!(
            "to = \"file://{}\"\nsigning-key-file = {:?}\ncompression = \"{}\"\n",
            dir(l).display(),
            k,
            algo(l)
        )
    };
    std::fs::write(
        home.join(".config/cachepush/config.toml"),
        file("user", &keys[0]),
    )
    .unwrap();
    // What a push with the top `n` layers present writes, read back from its narinfo.
    let push = |n: usize| -> (String, String, String) {
        let present = &layers[..n];
        if present.contains(&"project") {
            std::fs::write(project.join("cachepush.toml"), file("project", &keys[1])).unwrap();
        } else {
            let _ = std::fs::remove_file(project.join("cachepush.toml"));
        }
        let mut c = cachepush();
        c.current_dir(&project)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"));
        if present.contains(&"env") {
            c.env("CACHEPUSH_TO", format!("file://{}", dir("env").display()))
                .env("CACHEPUSH_SIGNING_KEY_FILE", &keys[2])
                .env("CACHEPUSH_COMPRESSION", algo("env"));
        }
        c.arg("push").arg("-q");
        if present.contains(&"flag") {
            // `push URL PATH...`: the URL is the command line's "flag".
            c.arg(format!("file://{}", dir("flag").display()))
                .arg("--signing-key")
                .arg(&keys[3])
                .args(["--compression", algo("flag")]);
        }
        run_ok(c.arg(&one));
        let written: Vec<&str> = layers
            .iter()
            .copied()
            .filter(|l| !narinfos(&dir(l)).is_empty())
            .collect();
        assert_eq!(written.len(), 1, "{n} layers wrote to {written:?}");
        let text = std::fs::read_to_string(&narinfos(&dir(written[0]))[0]).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("{text}"))
                .to_owned()
        };
        let sig = field("Sig: ");
        let out = (
            written[0].to_owned(),
            field("Compression: "),
            sig.split(':').next().unwrap().to_owned(),
        );
        std::fs::remove_dir_all(dir(written[0])).unwrap();
        out
    };
    for n in (1..=layers.len()).rev() {
        let winner = layers[n - 1];
        let (written, compression, key) = push(n);
        assert_eq!(written, winner, "with {:?}", &layers[..n]);
        assert_eq!(compression, algo(winner), "with {:?}", &layers[..n]);
        assert_eq!(key, format!("{winner}-1"), "with {:?}", &layers[..n]);
    }
}

/// Neither the signing key (its text or its seed) nor the bucket's secret key appears in
/// anything cachepush prints: pushes (plain, -v, --json, failing), watch-exec, verify, and
/// the gateway's log in both delivery modes, error paths included.
#[test]
fn no_secret_reaches_any_output() {
    use base64::Engine;
    use common::http::{Gateway, get, request};
    let b64 = base64::engine::general_purpose::STANDARD;
    let s3 = S3::seaweedfs();
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(tmp.path(), "secret-1");
    let key_text = std::fs::read_to_string(&sk).unwrap();
    let secret_b64 = key_text.trim().split_once(':').unwrap().1.to_owned();
    let seed_b64 = b64.encode(&b64.decode(&secret_b64).unwrap()[..32]);
    let aws_secret = s3.secret_key.clone();
    let top = shared_top();
    let bucket = s3.new_bucket("secrets");
    let mut seen = String::new();
    let mut run = |mut c: Command| {
        let o = c.output().unwrap();
        seen.push_str(&String::from_utf8_lossy(&o.stdout));
        seen.push_str(&String::from_utf8_lossy(&o.stderr));
        o
    };
    let push = |extra: &[&str], env: &[(&str, &str)], url: &str| {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.env("CACHEPUSH_SIGNING_KEY", &key_text)
            .args(["copy", "--to", url])
            .args(extra)
            .arg(top);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    };
    let url = s3.url(&bucket, "");
    assert!(run(push(&["-v"], &[], &url)).status.success());
    assert!(
        run(push(&["--json"], &[("GITHUB_ACTIONS", "true")], &url))
            .status
            .success()
    );
    assert!(run(push(&["-v", "--repair"], &[], &url)).status.success());
    // Failing: a secret that does not match, and a server that is not there.
    let other = s3.new_bucket("secrets2");
    assert!(
        !run(push(
            &["-v"],
            &[("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")],
            &s3.url(&other, "")
        ))
        .status
        .success()
    );
    assert!(
        !run(push(
            &["-v", "--read-timeout", "1"],
            &[],
            &format!("s3://{other}?endpoint=http://127.0.0.1:9&region=us-east-1")
        ))
        .status
        .success()
    );
    // A bad key given in the environment: the error names the problem, not the text.
    let mut c = push(&[], &[], &url);
    c.env("CACHEPUSH_SIGNING_KEY", format!("{}x", key_text.trim()));
    assert_eq!(run(c).status.code(), Some(2));
    // watch-exec and verify.
    let mut c = cachepush();
    s3.creds(&mut c);
    c.env("CACHEPUSH_SIGNING_KEY", &key_text).args([
        "watch-exec",
        "-v",
        "--to",
        &url,
        "--",
        "true",
    ]);
    assert!(run(c).status.success());
    let mut c = cachepush();
    s3.creds(&mut c);
    c.args(["verify", "--full", "--trusted-key", &pk, &url]);
    assert!(run(c).status.success());
    // The gateway, both modes, good and failing requests.
    for mode in ["redirect", "proxy"] {
        let mut c = cachepush();
        s3.creds(&mut c);
        c.args(["gateway", "--from", &url, "--listen", "127.0.0.1:0"])
            .args(["--nar-delivery", mode]);
        let mut gw = Gateway::start(c);
        let h = &top.file_name().unwrap().to_str().unwrap()[..32];
        let r = get(gw.addr, &format!("/{h}.narinfo"));
        assert_eq!(r.status, 200);
        let nar = r
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        let _ = get(gw.addr, &format!("/{nar}"));
        let _ = request(gw.addr, "HEAD", &format!("/{nar}"), &[]);
        let _ = get(gw.addr, &format!("/{}.narinfo", "0".repeat(32)));
        let _ = get(gw.addr, "/healthz");
        gw.terminate();
        let log = gw.log_text();
        assert!(!log.contains("X-Amz-Signature"), "{mode}: {log}");
        seen.push_str(&log);
    }
    for (what, secret) in [
        ("the signing key", secret_b64.as_str()),
        ("the signing key's seed", seed_b64.as_str()),
        ("the bucket's secret key", aws_secret.as_str()),
    ] {
        assert!(!seen.contains(secret), "{what} was printed:\n{seen}");
    }
    assert!(seen.len() > 1000, "the runs printed almost nothing: {seen}");
}

/// README's flag table: every flag it lists exists on `copy`, bound to the environment
/// variable it names (clap prints the binding in `--help`).
#[test]
fn the_readmes_flag_table_matches_the_cli() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let help = stdout(&run_ok(cachepush().args(["copy", "--help"])));
    let mut rows = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `-")) {
        let line = line.replace("\\|", "/");
        let cols: Vec<&str> = line.split('|').map(str::trim).skip(1).collect();
        let flags: Vec<&str> = cols[0]
            .split('`')
            .skip(1)
            .step_by(2)
            .flat_map(|w| w.split_whitespace().filter(|t| t.starts_with('-')))
            .map(|t| t.trim_end_matches(','))
            .collect();
        assert!(!flags.is_empty(), "{line}");
        for f in &flags {
            assert!(
                help.contains(f),
                "README lists {f}, `copy --help` has no such flag"
            );
        }
        let env = cols.get(1).map_or("", |c| c.trim_matches('`'));
        if env == "CACHEPUSH_S3_*" {
            for f in flags.iter().filter(|f| f.starts_with("--")) {
                let var = format!("CACHEPUSH_S3_{}", f[2..].to_uppercase().replace('-', "_"));
                assert!(
                    help.contains(&format!("[env: {var}=")),
                    "{f}: {var} not bound"
                );
            }
        } else if !env.is_empty() {
            assert!(
                help.contains(&format!("[env: {env}=")),
                "{line}: {env} not bound"
            );
        }
        rows += 1;
    }
    assert!(rows >= 15, "only {rows} rows of the flag table found");
}

/// The documented hook, run by a real `nix-build --option post-build-hook`: Nix 2.8 gives
/// it an empty OUT_PATHS (NixOS/nix#6446), so it queues the derivation's outputs; then
/// `watch-store --once` publishes them and the real Nix substitutes them. A hook run
/// with neither OUT_PATHS nor DRV_PATH says so and queues nothing.
#[test]
fn a_real_nix_build_with_the_post_build_hook_publishes_its_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = tmp.path().join("queue");
    let script = tmp.path().join("cachepush-hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} post-build-hook --queue {}\n",
            env!("CARGO_BIN_EXE_cachepush"),
            queue.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let salt = unique("hook");
    let o = Command::new("nix-build")
        .arg(fixture("closure.nix"))
        .args(["-A", "dep", "--no-out-link", "--argstr", "salt", &salt])
        .args(["--option", "substituters", ""])
        .args(["--option", "post-build-hook"])
        .arg(&script)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let built = PathBuf::from(stdout(&o));
    assert!(
        stderr_of(&o).contains("queued 1 path in"),
        "the hook queued nothing: {}",
        stderr_of(&o)
    );
    assert_eq!(queued(&queue), 1);
    let text = std::fs::read_dir(&queue)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "paths"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap();
    assert_eq!(text.trim(), built.display().to_string());

    let (sk, pk) = keygen(tmp.path(), "hook-1");
    let cache = tmp.path().join("cache");
    let url = format!("file://{}", cache.display());
    run_ok(
        cachepush()
            .args(["watch-store", "--once", "--queue"])
            .arg(&queue)
            .args(["--to", &url, "--signing-key"])
            .arg(&sk),
    );
    assert_eq!(queued(&queue), 0, "the batch stayed queued");
    let o = nix_substitute(&url, &tmp.path().join("dest"), &built, &pk);
    assert!(o.status.success(), "{}", stderr_of(&o));

    // Outside Nix, with nothing to go on: one line saying why, exit 0, nothing queued.
    let empty = tmp.path().join("empty-queue");
    let o = cachepush()
        .arg("post-build-hook")
        .arg("--queue")
        .arg(&empty)
        .env_remove("OUT_PATHS")
        .env_remove("DRV_PATH")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stderr_of(&o).contains("neither OUT_PATHS nor DRV_PATH"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(queued(&empty), 0);
}

/// The GitHub Action: composite, its inputs reach the scripts as variables (never
/// spliced into them, where a crafted input would be code), and it builds cachepush
/// from its own source rather than downloading anything.
#[test]
fn the_github_action_is_composite_and_takes_inputs_as_variables() {
    use yaml_rust2::YamlLoader;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("action.yml")).unwrap();
    let doc = &YamlLoader::load_from_str(&text).expect("action.yml is YAML")[0];
    assert_eq!(doc["runs"]["using"].as_str(), Some("composite"));
    assert!(doc["inputs"]["gateway"]["required"].as_bool() == Some(true));
    let steps = doc["runs"]["steps"].as_vec().unwrap();
    assert!(!steps.is_empty());
    let mut scripts = String::new();
    for step in steps {
        let run = step["run"].as_str().unwrap_or_default();
        assert!(
            !run.contains("${{"),
            "an input spliced into a script: {run}"
        );
        assert_eq!(step["shell"].as_str(), Some("bash"));
        scripts.push_str(run);
    }
    assert!(scripts.contains("cargo install --locked"), "{scripts}");
    assert!(scripts.contains("cachepush copy --to \"$PUSH_GATEWAY\""));
    for word in ["curl", "wget", "releases/download"] {
        assert!(!scripts.contains(word), "the action downloads with {word}");
    }
    for example in [
        "examples/github-actions/keyless.yml",
        "examples/gitlab-ci/keyless.gitlab-ci.yml",
    ] {
        let t = std::fs::read_to_string(root.join(example)).unwrap();
        YamlLoader::load_from_str(&t).unwrap_or_else(|e| panic!("{example}: {e}"));
        assert!(t.contains("https://cache.example.org"), "{example}");
    }
}
