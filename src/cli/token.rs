//! `cachepush token issue|revoke|show`: scoped tokens for the gateway (see
//! `cachepush::gateway::token` for what they are and who may do what).
//!
//! A token is a secret: `issue` prints it on stdout only (its id and expiry go to stderr),
//! and `revoke`/`show` read it from a file or stdin, never from the command line, where
//! every user of the machine could read it in the process list.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cachepush::gateway::token::{self, Scope};
use clap::{Args, Subcommand};

use super::Failure;
use super::keys::read_secret_key;

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a new token signed by the token key: give it to a client as a netrc password
    /// or a bearer token.
    Issue {
        /// The token key's secret key file (`cachepush keygen`); not the cache's signing key.
        #[arg(long, value_name = "FILE", env = "CACHEPUSH_TOKEN_KEY")]
        token_key: PathBuf,
        /// What the token allows: pull (read the cache) or push (the gateway's push API).
        #[arg(long, value_name = "SCOPE")]
        scope: String,
        /// The cache it is for: the key prefix the gateway serves (`--from s3://BUCKET/P`);
        /// empty for a bucket's root.
        #[arg(long, value_name = "P", default_value = "")]
        prefix: String,
        /// How long it is valid: 30s, 15m, 6h, 30d.
        #[arg(long, value_name = "DURATION", value_parser = super::gc::parse_duration)]
        expires: i64,
    },
    /// Add tokens to a gateway's revocation list (`--token-revocations`), by the token
    /// (read from a file or stdin) or by its id (printed by `issue`).
    Revoke {
        /// The revocation list; created if missing.
        #[arg(long, value_name = "FILE")]
        revocations: PathBuf,
        /// Ids of tokens to revoke.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// A file holding the token to revoke (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Why (written as a comment beside the id).
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Print what a token says (scope, cache, expiry, id), without checking its signature.
    Show {
        /// A file holding the token (`-` for stdin).
        #[arg(long, value_name = "FILE", default_value = "-")]
        token_file: PathBuf,
    },
}

fn read_token(file: &PathBuf) -> Result<String, Failure> {
    let mut text = String::new();
    let res = if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut text).map(|_| ()))
    };
    res.map_err(|e| {
        Failure::input(format!(
            "cannot read the token from {}: {e}",
            file.display()
        ))
    })?;
    Ok(text.trim().to_owned())
}

fn claims_of(file: &PathBuf) -> Result<token::Claims, Failure> {
    let t = read_token(file)?;
    token::read_unverified(&t).map(|(c, _, _)| c).map_err(|_| {
        Failure::input(format!(
            "{}: not a cachepush token (cpt1....)",
            file.display()
        ))
    })
}

pub fn run(a: TokenArgs) -> Result<ExitCode, Failure> {
    match a.command {
        TokenCommand::Issue {
            token_key,
            scope,
            prefix,
            expires,
        } => {
            let scope = Scope::parse(&scope)
                .ok_or_else(|| Failure::input(format!("--scope {scope:?}: use pull or push")))?;
            if expires <= 0 {
                return Err(Failure::input("--expires must be more than zero"));
            }
            let key = read_secret_key(&token_key)?;
            let (t, claims) =
                token::issue(&key, scope, &prefix, Duration::from_secs(expires as u64))
                    .map_err(|e| Failure::input(e.to_string()))?;
            println!("{t}");
            eprintln!(
                "token {} ({:?} on {:?}) valid until {} (seconds since the epoch); revoke with `cachepush token revoke --id {}`",
                claims.jti, claims.scope, claims.prefix, claims.exp, claims.jti
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke {
            revocations,
            mut ids,
            token_file,
            reason,
        } => {
            if let Some(f) = &token_file {
                ids.push(claims_of(f)?.jti);
            }
            if ids.is_empty() {
                return Err(Failure::input(
                    "nothing to revoke: give --id ID or --token-file FILE",
                ));
            }
            for id in &ids {
                if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(Failure::input(format!("--id {id:?} is not a token id")));
                }
            }
            let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&revocations)
                .map_err(|e| {
                    Failure::input(format!("cannot open {}: {e}", revocations.display()))
                })?;
            let mut text = String::new();
            for id in &ids {
                text.push_str(id);
                if !reason.is_empty() {
                    text.push_str(&format!("  # {reason}"));
                }
                text.push('\n');
            }
            f.write_all(text.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| {
                    Failure::input(format!("cannot write {}: {e}", revocations.display()))
                })?;
            eprintln!(
                "revoked {} (gateways reading {} refuse it within seconds)",
                ids.join(", "),
                revocations.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Show { token_file } => {
            let c = claims_of(&token_file)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&c).map_err(|e| Failure::input(e.to_string()))?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
