//! Exit statuses, and the one place every error becomes one:
//! - 0: everything asked for was done;
//! - 1: some paths could not be published (each is listed with the reason);
//! - 2: bad input or configuration (a key, a path, a URL, a flag), nothing was written;
//! - 3: the target could not be reached or written before any path was sent;
//! - 130: interrupted (Ctrl-C); nothing half-published is left visible.

use std::process::ExitCode;

use cachepush::gc::GcError;
use cachepush::gc::pins::PinError;
use cachepush::push::PushError;
use cachepush::storage::OpenError;
use cachepush::storage::StorageError;
use cachepush::watch::{Batch, DrainError};

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
            | PushError::Lease { .. }
            | PushError::Pin { .. }
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
            OpenError::Storage(StorageError::Config(_)) => Failure::input(text),
            OpenError::Storage(_) => Failure::target(text),
        }
    }
}

/// The exit status of a push (or of a round of batches) that ran to its end.
pub fn exit_code(outcome: Batch) -> ExitCode {
    match outcome {
        Batch::Done { failed: 0, .. } => ExitCode::SUCCESS,
        // Some paths were not published; each was listed with its reason.
        Batch::Done { .. } => ExitCode::from(1),
        Batch::Interrupted => ExitCode::from(130),
    }
}

impl From<DrainError<Failure>> for Failure {
    fn from(e: DrainError<Failure>) -> Self {
        match e {
            // A batch's own failure already has its status.
            DrainError::Push(f) => f,
            // A queue directory or file that cannot be read, or a store that cannot say
            // which paths are valid: the setup is what to fix.
            DrainError::Queue { dir, source } => {
                Failure::input(format!("cannot read the queue {}: {source}", dir.display()))
            }
            DrainError::File { file, source } => {
                Failure::input(format!("{}: {source}", file.display()))
            }
            DrainError::Scan(e) => Failure::input(format!("cannot list the store: {e}")),
            DrainError::Store(s) => Failure::input(s.to_string()),
        }
    }
}

impl From<GcError> for Failure {
    fn from(e: GcError) -> Self {
        let text = e.to_string();
        match e {
            GcError::Storage(StorageError::Config(_)) => Failure::input(text),
            // The cache could not be read or written, or another gc holds it.
            GcError::Storage(_) | GcError::Record(_) | GcError::AnotherGc { .. } => {
                Failure::target(text)
            }
        }
    }
}

impl From<PinError> for Failure {
    fn from(e: PinError) -> Self {
        let text = e.to_string();
        match e {
            PinError::BadName(_)
            | PinError::BadPath(_)
            | PinError::NotInCache { .. }
            | PinError::NoSuchPin { .. } => Failure::input(text),
            PinError::Storage(StorageError::Config(_)) => Failure::input(text),
            PinError::Storage(_) | PinError::Record(_) => Failure::target(text),
        }
    }
}
