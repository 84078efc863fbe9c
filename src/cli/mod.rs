//! The command line: argument parsing, settings, what is printed, and exit statuses. One
//! file per subcommand; [`failure`] maps every error to an exit status in one place,
//! [`signal`] owns the signal handling, [`report`] what a push shows. Nothing here runs a
//! push or decides which backend a URL means: the library does.

mod config;
mod failure;
mod gateway;
mod gc;
mod keys;
mod output;
mod push;
mod report;
mod s3args;
mod signal;
mod token;
mod verify;
mod watch;

pub use failure::Failure;
pub use signal::{stop_signal, until_stopped};

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cachepush",
    version,
    about = "Publish Nix closures as a signed binary cache on S3-compatible storage or a directory",
    propagate_version = true,
    after_long_help = MANUAL_EXTRA
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
    /// Delete what no pin, recent push or recent read keeps, closures whole (docs/gc.md).
    Gc(Box<gc::GcArgs>),
    /// Name store paths gc must keep, with their closures.
    Pin(gc::PinArgs),
    /// What the cache holds, by age, pin and compression, and what gc would free.
    Stats(Box<gc::StatsArgs>),
    /// Scoped tokens for the gateway: issue, revoke, show (docs/security.md).
    Token(token::TokenArgs),
    /// Print shell completions: bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `cachepush man | man -l -`; with --dir, write
    /// it and one page per subcommand (cachepush-copy.1, ...) into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

/// What the main page says beyond the options: URLs, settings sources, exit statuses.
const MANUAL_EXTRA: &str = "\
CACHE URLS
  s3://BUCKET[/PREFIX]?endpoint=URL&region=R&profile=P&addressing-style=path|virtual|auto
    &compression=zstd|xz|none&secret-key=FILE&write-nar-listing=true&priority=N
    &want-mass-query=true|false   (endpoint: the server's base URL, http(s)://HOST[:PORT])
  file:///DIR?compression=...&secret-key=...&write-nar-listing=...&priority=...

SETTINGS
  A flag wins over its CACHEPUSH_* environment variable, which wins over the URL's
  parameter, which wins over cachepush.toml (found from the current directory upwards, then
  ~/.config/cachepush/config.toml). Credentials come from the AWS chain (AWS_* variables,
  profiles, SSO, web identity); a profile named with --profile or profile= is used alone.
  Each subcommand's page (cachepush-copy(1), ...) lists its flags and their variables;
  `cachepush man --dir DIR` writes them all.

EXIT STATUS
  0    everything asked for was done
  1    some paths could not be published (each is listed with the reason)
  2    bad input or configuration (a key, a path, a URL, a flag); nothing was written
  3    the target could not be reached or written before any path was sent
  130  interrupted (Ctrl-C, SIGTERM); uploads aborted, nothing half-published";

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
        Command::Man { dir } => man(dir),
        Command::Verify(a) => verify::run(*a),
        Command::Gc(a) => gc::run_gc(*a),
        Command::Pin(a) => gc::run_pin(a),
        Command::Stats(a) => gc::run_stats(*a),
        Command::Token(a) => token::run(a),
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

fn man(dir: Option<std::path::PathBuf>) -> Result<ExitCode, Failure> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir))
            .map_err(|e| {
                Failure::input(format!(
                    "writing the manual pages to {}: {e}",
                    dir.display()
                ))
            })?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|e| Failure::input(format!("rendering the manual page: {e}")))?;
    std::io::Write::write_all(&mut std::io::stdout(), &out)
        .map_err(|e| Failure::input(format!("writing the manual page: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
