//! Typed errors of the state layer. Every variant names the file, record or key involved.

use std::path::PathBuf;

pub type StateResult<T> = Result<T, StateError>;

impl StateError {
    /// A sled error at `path`: a full disk is said as such (sled reports it as an I/O error,
    /// and the generic advice about damaged stores does not apply).
    pub(crate) fn db(path: PathBuf, source: sled::Error) -> Self {
        match &source {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
                StateError::DiskFull { path, source }
            }
            _ => StateError::Db { path, source },
        }
    }
}

/// One line for an error and every cause under it ("a: b: c"), for messages that are stored or
/// shown as a single string. Errors here keep their cause out of their own message (the CLI
/// prints the chain), so this is how a stored message keeps the cause; a level whose text the
/// line already contains (a wrapper from another crate that prints its source) is skipped.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = c.source();
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("store {path} is in use by pid {pid}; wait for that process to finish or stop it (two processes must never write one store)")]
    InUse { path: PathBuf, pid: String },

    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the disk holding {path} is full: free space and run the same command again (what was committed is kept)")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },

    #[error("sled database at {path} failed; if it is damaged, restore the store folder from a copy, or start a new store (every step is recomputed)")]
    Db {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },

    #[error("blob {digest} at {path} is corrupt: its content hashes to {actual}; run `tsr verify --repair` to recompute the steps that made it")]
    BlobCorrupt {
        digest: String,
        actual: String,
        path: PathBuf,
    },

    #[error("blob {digest} is missing (expected at {path}); run `tsr verify --repair` to recompute the steps that made it")]
    BlobMissing { digest: String, path: PathBuf },

    #[error("record {what} at key {key} has schema version {found}, but this tsr reads version {supported}; use the tsr release that wrote this store")]
    UnknownSchema {
        what: &'static str,
        key: String,
        found: u16,
        supported: u16,
    },

    #[error("record {what} at key {key} cannot be decoded ({reason}); the store is damaged: run `tsr verify`")]
    Corrupt {
        what: &'static str,
        key: String,
        reason: String,
    },

    #[error("item {index} of step {step} is already committed; an item is produced exactly once")]
    DuplicateItem { step: String, index: u64 },

    #[error("invalid name `{name}`: {reason}")]
    BadName { name: String, reason: &'static str },

    #[error("the database at {path} holds commit {db} but the store acknowledged commit {acked}: it lost committed records (damaged or restored from an old copy). Run `tsr verify --repair` to accept it and recompute what was lost")]
    RolledBack { path: PathBuf, db: u64, acked: u64 },

    #[error("there is no store at {0}; give the store with --store DIR (or $TSR_STORE), or start a run with `tsr run CONFIG`")]
    NoStore(PathBuf),

    #[error("run `{0}` does not exist in this store; `tsr runs` lists the runs")]
    NoSuchRun(String),

    #[error("{0} already holds a store; restore into a new, empty folder")]
    NotEmpty(PathBuf),

    #[error(transparent)]
    Remote(Box<crate::remote::RemoteError>),
}

impl From<crate::remote::RemoteError> for StateError {
    fn from(e: crate::remote::RemoteError) -> Self {
        StateError::Remote(Box::new(e))
    }
}

impl From<tsr_base::PathError> for StateError {
    fn from(e: tsr_base::PathError) -> Self {
        StateError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

impl StateError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StateError::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer wrapper: {0}")]
    struct Repeats(#[source] StateError);

    #[test]
    fn a_full_disk_is_named_as_such() {
        let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device");
        let e = StateError::db("/s/db".into(), sled::Error::Io(full));
        assert!(e.to_string().contains("is full: free space"), "{e}");
        let other = std::io::Error::other("bad sector");
        let e = StateError::db("/s/db".into(), sled::Error::Io(other));
        assert!(e.to_string().contains("if it is damaged"), "{e}");
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device");
        let e = StateError::Io {
            path: "/s/tmp/blob.tmp".into(),
            source: io,
        };
        // The message itself no longer repeats the cause; the chain adds it once.
        assert_eq!(e.to_string(), "I/O error on /s/tmp/blob.tmp");
        assert_eq!(
            error_chain(&e),
            "I/O error on /s/tmp/blob.tmp: No space left on device"
        );
        // A foreign wrapper that prints its source is not repeated either.
        let w = Repeats(e);
        assert_eq!(
            error_chain(&w),
            "outer wrapper: I/O error on /s/tmp/blob.tmp: No space left on device"
        );
    }
}
