//! One file per subcommand; this file holds the argument tree and exit-status policy.
//!
//! Exit statuses:
//! - 0: everything asked for was done;
//! - 1: some paths could not be published (each is listed with the reason);
//! - 2: bad input or configuration (a key, a path, a URL, a flag), nothing was written;
//! - 3: the target could not be reached or written before any path was sent;
//! - 130: interrupted (Ctrl-C); nothing half-published is left visible.

mod keys;
mod output;
mod push;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(a) => keys::keygen(a),
        Command::Pubkey(a) => keys::pubkey(a),
        Command::Copy(a) => push::run_copy(a),
        Command::Push(a) => push::run_push(a),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {}", f.message);
            if let Some(h) = f.hint {
                eprintln!("hint: {h}");
            }
            ExitCode::from(f.code)
        }
    }
}
