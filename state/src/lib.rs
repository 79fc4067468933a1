//! Durable state for tsr: one sled database of versioned records and a directory of
//! content-addressed blobs.
//!
//! This is the only crate that imports sled. Everything above it (engine, steps, workflows, the
//! CLI) talks to [`Store`] and [`BlobStore`] and never sees a sled type.
//!
//! Durability contract: a method that returns `Ok` after writing has flushed sled (or fsynced the
//! blob and its directory) before returning. A crash (SIGKILL, power loss) at any instant leaves
//! either the state before the call or the state after it, never a mix.

mod blobs;
mod clock;
mod direct;
mod envelope;
mod error;
pub mod faults;
mod format;
mod fsck;
mod keys;
mod lock;
mod records;
pub mod remote;
mod store;
mod sync;

pub use blobs::{hash_file, BlobStore, BlobWriter};
pub use clock::now_ms;
pub use envelope::Versioned;
pub use error::{error_chain, StateError, StateResult};
pub use fsck::{gc, verify, GcReport, Problem, VerifyReport};
pub use records::{
    ArtifactRecord, CheckpointRecord, EdgeRecord, NodeRecord, RunRecord, RunStatus, StepRecord,
    StepStatus, WorkerRecord,
};
pub use store::{validate_name, validate_run_name, Commit, RemoteState, Store};
pub use sync::{SyncMode, SyncPoint, SyncView};
pub use tsr_base::{fingerprint, fsio, hex, BadDigest, Digest};
