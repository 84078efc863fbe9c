//! The command line: argument parsing, settings, what is printed, and exit statuses. One
//! file per subcommand; [`failure`] maps every error to an exit status in one place,
//! [`signal`] owns the signal handling, [`report`] what a push shows. Nothing here runs a
//! push or decides which backend a URL means: the library does.

mod config;
mod failure;
mod gateway;
mod keys;
mod output;
mod push;
mod report;
mod s3args;
mod signal;
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

fn man() -> Result<ExitCode, Failure> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|e| Failure::input(format!("rendering the manual page: {e}")))?;
    std::io::Write::write_all(&mut std::io::stdout(), &out)
        .map_err(|e| Failure::input(format!("writing the manual page: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
