//! One file per subcommand; this file holds the argument tree and exit-status policy.
//!
//! Exit statuses:
//! - 0: everything asked for was done;
//! - 1: some paths could not be published (each is listed with the reason);
//! - 2: bad input or configuration (a key, a path, a URL, a flag), nothing was written;
//! - 3: the target could not be reached or written before any path was sent;
//! - 130: interrupted (Ctrl-C); nothing half-published is left visible.

mod config;
mod gateway;
mod keys;
mod output;
mod push;
mod s3args;
mod verify;
mod watch;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// An error at the CLI edge: one line for the user, and the exit status it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn input(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
            hint: None,
        }
    }

    pub fn target(message: impl Into<String>) -> Self {
        Failure {
            code: 3,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "cachepush",
    version,
    about = "Publish Nix closures as a signed binary cache on S3-compatible storage or a directory",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish the closure of store paths to a binary cache (like `nix copy --to`).
    Copy(push::CopyArgs),
    /// Same as `copy`, with the cache URL as the first argument.
    Push(push::PushArgs),
    /// Generate a new signing key pair; writes the secret key, prints the public key.
    Keygen(keys::KeygenArgs),
    /// Print the public key of a secret key file.
    Pubkey(keys::PubkeyArgs),
    /// Serve a (private) bucket to Nix clients over HTTP, as a substituter.
    Gateway(Box<gateway::GatewayArgs>),
    /// Run a command (e.g. `nix build`) and publish every store path it produces, as they
    /// appear; exit with the command's status.
    WatchExec(Box<watch::WatchExecArgs>),
    /// Publish new store paths and the post-build-hook queue until stopped.
    WatchStore(Box<watch::WatchStoreArgs>),
    /// For Nix's `post-build-hook`: queue $OUT_PATHS for `watch-store`; never fails a build.
    PostBuildHook(watch::HookArgs),
    /// Check a whole cache: every narinfo, its NAR, its references and signatures.
    Verify(Box<verify::VerifyArgs>),
    /// Print shell completions: bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `cachepush man | man -l -`.
    Man,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(a) => keys::keygen(a),
        Command::Pubkey(a) => keys::pubkey(a),
        Command::Copy(a) => push::run_copy(a),
        Command::Push(a) => push::run_push(a),
        Command::Gateway(a) => gateway::run(*a),
        Command::WatchExec(a) => watch::run_watch_exec(*a),
        Command::WatchStore(a) => watch::run_watch_store(*a),
        Command::PostBuildHook(a) => Ok(watch::run_hook(a)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "cachepush",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => man(),
        Command::Verify(a) => verify::run(*a),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            if std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true") {
                eprintln!("::error::{}", output::gha_escape(&f.message));
            }
            eprintln!("error: {}", f.message);
            if let Some(h) = f.hint {
                eprintln!("hint: {h}");
            }
            ExitCode::from(f.code)
        }
    }
}

/// Resolves on Ctrl-C (SIGINT), SIGTERM, SIGHUP (the terminal or ssh session closed) or
/// SIGQUIT, whichever comes first: each would otherwise kill the process on the spot and
/// leave its multipart uploads open (security review L3).
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let kinds = [
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::quit(),
        ];
        let mut streams: Vec<_> = kinds.into_iter().filter_map(|k| signal(k).ok()).collect();
        if streams.is_empty() {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
        let others = futures::future::select_all(streams.iter_mut().map(|s| Box::pin(s.recv())));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = others => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A stop request (SIGINT or SIGTERM) that every part of a long-running command can watch,
/// with one signal listener for the whole process so that no signal is missed between
/// rounds.
pub fn stop_signal() -> tokio::sync::watch::Receiver<bool> {
    static STOP: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>> =
        std::sync::OnceLock::new();
    STOP.get_or_init(|| {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            interrupted().await;
            let _ = tx.send(true);
            // Aborting open uploads can take a while with retries; a second signal means
            // "now": exit at once (what is left open, `verify --abort-open-uploads` or a
            // lifecycle rule cleans up).
            interrupted().await;
            eprintln!("interrupted again: exiting without waiting for the cleanup");
            // (Never returns, so `tx` lives on: a dropped sender would read as "stopped".)
            std::process::exit(130);
        });
        rx
    })
    .clone()
}

/// Resolves once a stop was requested.
pub async fn until_stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|stopped| *stopped).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn man() -> Result<ExitCode, Failure> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|e| Failure::input(format!("rendering the manual page: {e}")))?;
    std::io::Write::write_all(&mut std::io::stdout(), &out)
        .map_err(|e| Failure::input(format!("writing the manual page: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
