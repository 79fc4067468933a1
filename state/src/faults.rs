//! Fault injection for tests: a hook consulted before each durable operation of the store
//! (blob write, fsync, rename, directory fsync, sled commit). Production stores have none.
//! Tests use it to prove that a failed write, a short write, an fsync error or a full disk fails
//! the step with a clear error, leaves the last committed state intact, and that the next run
//! continues.

use std::io;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultOp {
    /// A `write` into a blob's temporary file. An injected error is a short write: half of the
    /// buffer reaches the file first.
    BlobWrite,
    /// The fsync of a blob's temporary file.
    BlobSync,
    /// The rename of a blob into place.
    BlobRename,
    /// The fsync of a blob's directory after the rename.
    DirSync,
    /// An atomic batch of sled records (and its flush).
    DbCommit,
}

pub trait FaultInjector: Send + Sync + std::fmt::Debug {
    /// Return an error to make `op` on `path` fail.
    fn before(&self, op: FaultOp, path: &Path) -> io::Result<()>;
}

/// Fails the `nth` (0-based) occurrence of `op` once, with `error` (an errno, e.g. ENOSPC).
#[derive(Debug)]
pub struct FailNth {
    pub op: FaultOp,
    pub nth: u64,
    pub errno: i32,
    seen: std::sync::atomic::AtomicU64,
}

impl FailNth {
    pub fn new(op: FaultOp, nth: u64, errno: i32) -> Self {
        FailNth {
            op,
            nth,
            errno,
            seen: std::sync::atomic::AtomicU64::new(0),
        }
    }
    /// How many times `op` was reached.
    pub fn seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl FaultInjector for FailNth {
    fn before(&self, op: FaultOp, _path: &Path) -> io::Result<()> {
        if op != self.op {
            return Ok(());
        }
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n == self.nth {
            return Err(io::Error::from_raw_os_error(self.errno));
        }
        Ok(())
    }
}
