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
    Remote(Box<RemoteError>),
}

impl From<RemoteError> for StateError {
    fn from(e: RemoteError) -> Self {
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

/// Errors of the remote copy. Each names the remote (its URL without credentials) or object.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },

    #[error("remote {url}: {op} `{key}` failed")]
    Backend {
        url: String,
        op: &'static str,
        key: String,
        #[source]
        source: Redacted,
    },

    #[error("cannot set up the client for remote {url}")]
    Connect {
        url: String,
        #[source]
        source: Redacted,
    },

    #[error("remote {url} did not take the last commits: {detail}")]
    Unsynced { url: String, detail: String },

    #[error("remote {url} is held by {holder} until {until} ({left_s} s from now): another machine is writing to it. Wait for it to finish, or, if that machine is gone, take the remote over with --take-over")]
    LeaseHeld {
        url: String,
        holder: String,
        until: String,
        left_s: u64,
    },

    #[error("remote {url} was taken over by {holder}: this process stopped writing to it (its local store is intact). Continue from the remote on that machine")]
    Fenced { url: String, holder: String },

    #[error("remote object `{key}` in {url} is damaged: {reason}")]
    Corrupt {
        url: String,
        key: String,
        reason: String,
    },

    #[error("remote {url} holds no store yet (no snapshot under gens/); start a run with --remote {url} to fill it")]
    Empty { url: String },

    #[error("remote {url} holds commit {remote} but this store only commit {local}: the remote is ahead of this store. Restore it into a new folder (tsr restore {url} --store DIR) and continue there")]
    Ahead {
        url: String,
        remote: u64,
        local: u64,
    },

    #[error("remote {url} holds the history of another store (generation {epoch}, up to commit {seq}); this store cannot continue it. Restore the remote into a new folder (tsr restore {url} --store DIR) and continue there")]
    OtherHistory { url: String, epoch: u64, seq: u64 },

    #[error("this store's database was rolled back and accepted (tsr verify --repair) after it was replicated to {url}: its commits no longer line up with the remote's. Restore the remote into a new folder (tsr restore {url} --store DIR) and continue there")]
    RolledBack { url: String },

    #[error("blob {digest} of this store ({path}) is damaged, so it was not uploaded to {url}; run `tsr verify --repair` to recompute it")]
    LocalBlobCorrupt {
        url: String,
        digest: String,
        path: PathBuf,
    },

    #[error("remote {url} is missing blob {digest}, which its records refer to")]
    MissingBlob { url: String, digest: String },

    #[error("this store is replicated to {attached}, not to {given}; give --remote {attached} (or no --remote), or restore {given} into a new folder")]
    OtherRemote { attached: String, given: String },

    #[error("`{name}` is not a name inside the remote's work/ folder: give the step's folder as the driver wrote it (`<step key>/<build>`), without empty parts, `.` or `..`")]
    WorkName { name: String },
}

impl RemoteError {
    /// Whether the object store failed to answer (the network, a 5xx, a timeout) rather than
    /// refused: worth waiting for.
    pub fn is_transient(&self) -> bool {
        matches!(self, RemoteError::Backend { .. })
    }
}

pub type RemoteResult<T> = Result<T, RemoteError>;

/// A backend error as text, with every URL query removed: a request URL may carry a signature
/// (an Azure SAS token, a presigned S3 URL), which must never reach a message or a log.
#[derive(Debug)]
pub struct Redacted(String);

impl Redacted {
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Redacted {
        let text: Vec<char> = crate::error_chain(e).chars().collect();
        let ends = |c: char| c.is_whitespace() || "\"'),<>".contains(c);
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let c = text[i];
            out.push(c);
            // A query follows a path (`.../lease.json?sv=...&sig=...`), not `<?xml` or the end
            // of a question.
            let after_path =
                i > 0 && (text[i - 1].is_ascii_alphanumeric() || "/_-.".contains(text[i - 1]));
            let starts = text.get(i + 1).is_some_and(|&n| !ends(n));
            i += 1;
            if c == '?' && after_path && starts {
                out.push_str("<redacted>");
                while i < text.len() && !ends(text[i]) {
                    i += 1;
                }
            }
        }
        Redacted(out)
    }
}

impl std::fmt::Display for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Redacted {}

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
