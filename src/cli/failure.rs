//! Exit statuses, and the one place every error becomes one:
//! - 0: everything asked for was done;
//! - 1: some paths could not be published (each is listed with the reason);
//! - 2: bad input or configuration (a key, a path, a URL, a flag), nothing was written;
//! - 3: the target could not be reached or written before any path was sent;
//! - 130: interrupted (Ctrl-C); nothing half-published is left visible.

use cachepush::push::PushError;
use cachepush::storage::OpenError;

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

impl From<PushError> for Failure {
    fn from(e: PushError) -> Self {
        let text = e.to_string();
        match e {
            // The store cannot answer for the paths given: the paths (or the Nix
            // installation) are the input to fix.
            PushError::Store(_) => Failure::input(text),
            // Nothing was written; the target is unreachable, refuses, or is broken.
            PushError::Plan { .. }
            | PushError::Write { .. }
            | PushError::CacheInfoUnreadable { .. } => Failure::target(text),
            // The URL names a cache for another store: the URL is what is wrong.
            PushError::OtherStore { .. } => Failure::input(text),
        }
    }
}

impl From<OpenError> for Failure {
    fn from(e: OpenError) -> Self {
        let text = e.to_string();
        match e {
            // A URL or a setting that cannot be used: fix the command line or the file.
            OpenError::Url(_) | OpenError::Setting(_) => Failure::input(text),
            // A directory that cannot be made or read: the environment.
            OpenError::Directory { .. } => Failure::target(text),
            // A client configuration that cannot be built (bad endpoint) is input; any
            // other storage error at connect time is the target's.
            OpenError::Storage(ref s)
                if matches!(s, cachepush::storage::StorageError::Config(_)) =>
            {
                Failure::input(text)
            }
            OpenError::Storage(_) => Failure::target(text),
        }
    }
}
