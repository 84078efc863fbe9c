//! `cachepush watch-exec`, `cachepush watch-store` and `cachepush post-build-hook`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cachepush::watch::{self, Queue, StoreScanner};
use clap::Args;

use super::config::{self, FileSettings};
use super::push::{Outcome, Pusher, Settings, runtime};
use super::{Failure, stop_signal, until_stopped};

#[derive(Args, Debug)]
pub struct WatchExecArgs {
    /// The binary cache to publish to [default: CACHEPUSH_TO or `to` in cachepush.toml].
    #[arg(long = "to", value_name = "URL", env = "CACHEPUSH_TO")]
    to: Option<String>,
    /// Seconds between looks at the store while the command runs.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    interval: f64,
    #[command(flatten)]
    settings: Settings,
    /// The command to run, after `--`, e.g. `-- nix build .#default`.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct WatchStoreArgs {
    /// The binary cache to publish to [default: CACHEPUSH_TO or `to` in cachepush.toml].
    #[arg(long = "to", value_name = "URL", env = "CACHEPUSH_TO")]
    to: Option<String>,
    /// The post-build-hook queue to drain [default: /var/lib/cachepush/queue for root,
    /// else $XDG_STATE_HOME/cachepush/queue].
    #[arg(long, value_name = "DIR", env = "CACHEPUSH_QUEUE_DIR")]
    queue: Option<PathBuf>,
    /// Only drain the queue; do not look for new store paths.
    #[arg(long)]
    queue_only: bool,
    /// Drain the queue once and exit (for a timer, or after a CI job's builds).
    #[arg(long)]
    once: bool,
    /// Seconds between rounds.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    interval: f64,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Args, Debug)]
pub struct HookArgs {
    /// Where to queue the paths [default: as for watch-store].
    #[arg(long, value_name = "DIR", env = "CACHEPUSH_QUEUE_DIR")]
    queue: Option<PathBuf>,
}

fn target(to: Option<String>, file: &FileSettings) -> Result<String, Failure> {
    to.or_else(|| file.to.clone()).ok_or_else(|| {
        Failure::input("no cache to publish to")
            .hint("pass --to URL, set CACHEPUSH_TO, or put `to = \"...\"` in cachepush.toml")
    })
}

fn interval(secs: f64) -> Result<Duration, Failure> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(3600))
        .ok_or_else(|| Failure::input("--interval must be between 0 and 3600 seconds"))
}

/// One round over the store (the library's [`watch::push_new`]).
async fn push_new(pusher: &mut Pusher, scanner: &mut StoreScanner) -> Result<Outcome, Failure> {
    Ok(watch::push_new(pusher, scanner).await?)
}

/// Publishes every queued batch (the library's [`watch::drain`] rule).
async fn drain(pusher: &mut Pusher, queue: &Queue) -> Result<Outcome, Failure> {
    Ok(watch::drain(queue, pusher).await?)
}

pub fn run_watch_store(a: WatchStoreArgs) -> Result<ExitCode, Failure> {
    let file = config::load()?;
    let url = target(a.to.clone(), &file)?;
    let queue = Queue::new(config::queue_dir(a.queue.clone(), &file));
    let every = interval(a.interval)?;
    let rt = runtime()?;
    rt.block_on(async {
        let Some(mut pusher) = Pusher::connect(&url, &a.settings, &file).await? else {
            return Ok(ExitCode::SUCCESS);
        };
        if a.once {
            return Ok(super::failure::exit_code(drain(&mut pusher, &queue).await?));
        }
        let mut scanner = if a.queue_only {
            None
        } else {
            Some(
                StoreScanner::new(pusher.store.store_dir().clone())
                    .map_err(|e| Failure::input(format!("cannot list the store: {e}")))?,
            )
        };
        pusher.out.info(&format!(
            "watching {}the queue {} for {url}; stop with Ctrl-C or SIGTERM",
            if scanner.is_some() {
                "the store and "
            } else {
                ""
            },
            queue.dir().display()
        ));
        let mut stop = stop_signal();
        loop {
            // A failed round is reported and retried; only a stop request ends the loop.
            let mut round = drain(&mut pusher, &queue).await;
            if let (Ok(Outcome::Done { .. }), Some(s)) = (&round, scanner.as_mut()) {
                round = push_new(&mut pusher, s).await;
            }
            match round {
                Ok(Outcome::Interrupted) => break,
                Ok(_) => {}
                Err(f) => pusher.out.error(&f.message),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = until_stopped(&mut stop) => break,
            }
        }
        // Stopping a watcher is not a failure: what was not published stays queued.
        pusher.out.info("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_watch_exec(a: WatchExecArgs) -> Result<ExitCode, Failure> {
    let file = config::load()?;
    let url = target(a.to.clone(), &file)?;
    let every = interval(a.interval)?;
    let rt = runtime()?;
    rt.block_on(async {
        let Some(mut pusher) = Pusher::connect(&url, &a.settings, &file).await? else {
            // No credentials: still run the command, and report its status.
            let status = tokio::process::Command::new(&a.command[0])
                .args(&a.command[1..])
                .status()
                .await
                .map_err(|e| Failure::input(format!("cannot run {}: {e}", a.command[0])))?;
            return Ok(exit_of(status));
        };
        let mut scanner = StoreScanner::new(pusher.store.store_dir().clone())
            .map_err(|e| Failure::input(format!("cannot list the store: {e}")))?;
        let mut child = tokio::process::Command::new(&a.command[0])
            .args(&a.command[1..])
            // The user's command needs no signing key (L4).
            .env_remove("CACHEPUSH_SIGNING_KEY")
            // Whatever way this function is left, the command does not outlive it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::input(format!("cannot run {}: {e}", a.command[0])))?;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = stop_signal();
        let mut stopping = false;
        let status = loop {
            tokio::select! {
                s = child.wait() => break s.map_err(|e| Failure::input(format!("waiting for {}: {e}", a.command[0])))?,
                // SIGTERM sent to cachepush alone (systemd, a CI cancel) reaches the
                // command too; a Ctrl-C from a terminal reached it already.
                _ = until_stopped(&mut stop), if !stopping => {
                    stopping = true;
                    forward_sigterm(&child);
                }
                _ = tick.tick(), if !stopping => {
                    // A failed round is reported and its paths retried later; the
                    // command keeps running and watching goes on (M5).
                    match push_new(&mut pusher, &mut scanner).await {
                        Ok(Outcome::Interrupted) => {
                            stopping = true;
                            forward_sigterm(&child);
                        }
                        Ok(Outcome::Done { .. }) => {}
                        Err(f) => pusher.out.error(&f.message),
                    }
                }
            }
        };
        if stopping {
            return Ok(ExitCode::from(130));
        }
        // The last outputs appear as the command ends. Failed paths get three more tries,
        // 2, 4 and 8 s apart, before the run is reported as failed.
        for pause in [0, 2, 4, 8] {
            if pause > 0 {
                if scanner.failed() == 0 {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
                    _ = until_stopped(&mut stop) => return Ok(ExitCode::from(130)),
                }
            }
            scanner.retry_now();
            match push_new(&mut pusher, &mut scanner).await {
                Ok(Outcome::Interrupted) => return Ok(ExitCode::from(130)),
                Ok(Outcome::Done { .. }) => {}
                Err(f) => pusher.out.error(&f.message),
            }
        }
        if !status.success() {
            return Ok(exit_of(status));
        }
        let failed = scanner.failed();
        if failed > 0 {
            pusher.out.error(&format!(
                "the command succeeded but {} {} not published",
                super::output::count(failed as u64, "path"),
                if failed == 1 { "was" } else { "were" }
            ));
            return Ok(ExitCode::from(1));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Asks the command to stop, as cachepush itself was asked.
fn forward_sigterm(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a pid we spawned and still hold (not yet reaped).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// The command's own exit status, as a shell would report it (128+N for signal N).
fn exit_of(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
        (None, Some(sig)) => ExitCode::from((128 + sig).clamp(0, 255) as u8),
        _ => ExitCode::from(1),
    }
}

/// Nix runs the post-build hook synchronously and fails the build if it fails, so this
/// only appends to the queue and always exits 0: a cache problem never breaks a build.
pub fn run_hook(a: HookArgs) -> ExitCode {
    let out_paths = std::env::var("OUT_PATHS").unwrap_or_default();
    let mut owned: Vec<String> = out_paths.split_whitespace().map(str::to_owned).collect();
    if owned.is_empty() {
        // Nix 2.8.0 runs the hook with OUT_PATHS empty (NixOS/nix#6446) but DRV_PATH set:
        // the derivation's outputs are what was built.
        match std::env::var("DRV_PATH") {
            Ok(drv) if !drv.trim().is_empty() => match derivation_outputs(drv.trim()) {
                Ok(outs) if !outs.is_empty() => owned = outs,
                Ok(_) => {
                    eprintln!(
                        "cachepush post-build-hook: warning: OUT_PATHS is empty and {drv} names no outputs; nothing queued"
                    );
                    return ExitCode::SUCCESS;
                }
                Err(e) => {
                    eprintln!(
                        "cachepush post-build-hook: warning: OUT_PATHS is empty and the outputs of {drv} could not be read ({e}); nothing queued"
                    );
                    return ExitCode::SUCCESS;
                }
            },
            _ => {
                eprintln!(
                    "cachepush post-build-hook: warning: neither OUT_PATHS nor DRV_PATH is set (run it as Nix's post-build-hook, or set OUT_PATHS); nothing queued"
                );
                return ExitCode::SUCCESS;
            }
        }
    }
    let paths: Vec<&str> = owned.iter().map(String::as_str).collect();
    let dir = match config::load() {
        Ok(file) => config::queue_dir(a.queue, &file),
        Err(f) => {
            eprintln!(
                "cachepush post-build-hook: warning: {} (using the default queue)",
                f.message
            );
            config::queue_dir(a.queue, &FileSettings::default())
        }
    };
    match Queue::new(&dir).enqueue(&paths) {
        Ok(_) => eprintln!(
            "cachepush: queued {} in {} for upload",
            super::output::count(paths.len() as u64, "path"),
            dir.display()
        ),
        Err(e) => eprintln!(
            "cachepush post-build-hook: warning: cannot queue in {}: {e}; these paths will not be uploaded: {}",
            dir.display(),
            paths.join(" ")
        ),
    }
    ExitCode::SUCCESS
}

/// The output paths of a derivation, as `nix-store --query --outputs` lists them.
fn derivation_outputs(drv: &str) -> Result<Vec<String>, String> {
    let out = std::process::Command::new("nix-store")
        .args(["--query", "--outputs", drv])
        .env_remove("CACHEPUSH_SIGNING_KEY")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nix-store: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}
