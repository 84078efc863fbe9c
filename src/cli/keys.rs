//! `cachepush keygen` and `cachepush pubkey`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cachepush::format::SecretKey;
use clap::Args;

use super::Failure;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Key name, conventionally the cache's host name and a number, e.g. `cache.example.org-1`.
    name: String,
    /// Where to write the secret key (created with mode 0600; never overwritten).
    secret_file: PathBuf,
    /// Also write the public key to this file.
    #[arg(long, value_name = "FILE", env = "CACHEPUSH_PUBLIC_KEY_FILE")]
    public_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PubkeyArgs {
    /// A secret key file (as written by `cachepush keygen` or `nix-store --generate-binary-cache-key`).
    secret_file: PathBuf,
}

/// Reads and parses a secret key file; the error names the file and what is wrong.
pub fn read_secret_key(path: &Path) -> Result<SecretKey, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::input(format!(
            "cannot read secret key file {}: {e}",
            path.display()
        ))
    })?;
    let text = zeroize::Zeroizing::new(text);
    let key = SecretKey::parse(&text).map_err(|e| {
        let f = Failure::input(format!("secret key file {}: {e}", path.display()));
        if matches!(e, cachepush::format::KeyError::PublicNotSecret { .. }) {
            f
        } else {
            f.hint(
                "generate a key with `cachepush keygen NAME FILE` or `nix-store --generate-binary-cache-key NAME SK PK`",
            )
        }
    })?;
    // Only a real secret key is worth the mode warning (a public key may be world-readable).
    warn_if_readable_by_others(path);
    Ok(key)
}

/// A public key from a file holding either the public key (`NAME:BASE64`, as
/// `cachepush pubkey` prints it) or the secret key it belongs to. `what` names the flag.
pub fn read_verifying_key(
    path: &Path,
    what: &str,
) -> Result<cachepush::format::PublicKey, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("{what} {}: cannot read it: {e}", path.display())))?;
    let text = zeroize::Zeroizing::new(text);
    if let Ok(k) = cachepush::format::PublicKey::parse(text.trim()) {
        return Ok(k);
    }
    let key = read_secret_key(path).map_err(|_| {
        Failure::input(format!(
            "{what} {}: neither a public nor a secret key (NAME:BASE64)",
            path.display()
        ))
    })?;
    Ok(key.public())
}

/// A secret key that others can read is as good as published: say so (once, on stderr).
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            let text = format!(
                "secret key file {} is readable by others (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
            if std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true") {
                eprintln!("::warning::{}", super::output::gha_escape(&text));
            }
            eprintln!("{} warning: {text}", cachepush::timestamp());
        }
    }
}

fn create_new(path: &Path, mode: u32, text: &str) -> Result<(), Failure> {
    // A fresh home has no ~/.config/cachepush yet: make the directory, private, as ssh-keygen
    // does for ~/.ssh. An existing directory is left as it is.
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                Failure::input(format!(
                    "cannot create the directory {}: {e}",
                    dir.display()
                ))
                .hint(format!(
                    "create it yourself: mkdir -p -m 700 {}",
                    dir.display()
                ))
            })?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            let f = Failure::input(format!("cannot create {}: {e}", path.display()));
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                f.hint("cachepush never overwrites a key file; choose another path or remove the old file first")
            } else {
                f
            }
        })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Failure::input(format!("writing {}: {e}", path.display())))
}

pub fn keygen(a: KeygenArgs) -> Result<ExitCode, Failure> {
    let key = SecretKey::generate(&a.name).map_err(|e| Failure::input(e.to_string()))?;
    create_new(&a.secret_file, 0o600, &key.to_file_text())?;
    let public = key.public().to_string();
    if let Some(p) = &a.public_file {
        create_new(p, 0o644, &public)?;
    }
    println!("{public}");
    Ok(ExitCode::SUCCESS)
}

pub fn pubkey(a: PubkeyArgs) -> Result<ExitCode, Failure> {
    let key = read_secret_key(&a.secret_file)?;
    println!("{}", key.public());
    Ok(ExitCode::SUCCESS)
}
