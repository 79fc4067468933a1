//! The `Step` trait: what a unit of work declares (kind, version, config, resources) and the
//! values it consumes and produces.

use crate::context::StepContext;
use crate::error::StepError;
use crate::output::OutputData;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tsr_state::{BlobStore, Digest};

/// A resource class a step occupies while running; the driver runs at most the configured number
/// of steps per resource at once (by default one `Compute` user: the GPU or the CPU cores).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Compute,
    Io,
}

/// A step of a workflow. It sees only its declared inputs and a [`StepContext`], never the
/// store. Its key is `hash(kind, version, config, input digests)`, so the same work is never done
/// twice in one store.
pub trait Step: Send + Sync + 'static {
    /// Stable kind name, e.g. `generate`.
    fn kind(&self) -> &'static str;
    /// Bump when the step's behaviour changes, so old results are not reused.
    fn version(&self) -> u32;
    /// Everything that affects the output besides the inputs. Must be deterministic (serde_json's
    /// default map is sorted, so derive `Serialize` on a struct and convert).
    fn config(&self) -> serde_json::Value;
    /// Names of the outputs this step produces.
    fn outputs(&self) -> Vec<&'static str>;
    fn resources(&self) -> Vec<Resource> {
        vec![Resource::Compute]
    }
    /// Do the work. Long steps commit items through `ctx.items()` and return
    /// `StepError::Interrupted` when `ctx.should_stop()` at an item boundary.
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError>;
    /// Whether other processes can compute this step's batches ([`Self::shard`]); the driver
    /// then hands them to its batch runner, and `run` only assembles the outputs.
    fn shardable(&self) -> bool {
        false
    }
    /// Whether an executor other than `local` runs this whole step in one of its workers
    /// (see [`crate::job`]): a step that loads a model but has no items, such as training.
    /// It must checkpoint only through `ctx.items()` and commit no items.
    fn runs_as_job(&self) -> bool {
        false
    }
    /// Whether replaying this step must reuse its recorded items instead of computing them
    /// again (a step whose items are answers of a paid service): replay then checks only that
    /// the outputs assemble from the recorded items to the recorded bytes.
    fn replays_recorded_items(&self) -> bool {
        false
    }
    /// Compute the batches `ctx` assigns (a worker's shard) through `ctx.for_each_batch`,
    /// exactly as `run` computes them, without assembling outputs.
    fn shard(&self, _inputs: &StepInputs, _ctx: &StepContext) -> Result<(), StepError> {
        Err(StepError::Invalid(format!(
            "step kind `{}` cannot run as shards",
            self.kind()
        )))
    }
}

/// Verified access to a step's inputs (blobs by input name).
pub struct StepInputs {
    pub(crate) blobs: BlobStore,
    pub(crate) digests: BTreeMap<String, Digest>,
    /// External inputs (files or folders outside the store), by input name. Their digest in
    /// `digests` is the content fingerprint taken when the run was planned.
    pub(crate) externals: BTreeMap<String, PathBuf>,
}

impl StepInputs {
    pub fn new(
        blobs: BlobStore,
        digests: BTreeMap<String, Digest>,
        externals: BTreeMap<String, PathBuf>,
    ) -> Self {
        StepInputs {
            blobs,
            digests,
            externals,
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.digests.keys().map(|s| s.as_str())
    }

    pub fn digest(&self, name: &str) -> Result<Digest, StepError> {
        self.digests
            .get(name)
            .copied()
            .ok_or_else(|| StepError::Invalid(format!("the step has no input named `{name}`")))
    }

    pub fn has(&self, name: &str) -> bool {
        self.digests.contains_key(name)
    }

    /// The bytes of an input, verified against its digest.
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>, StepError> {
        let digest = self.digest(name)?;
        if let Some(path) = self.checked_external(name, &digest)? {
            return std::fs::read(&path)
                .map_err(|e| StepError::io(format!("reading {}", path.display()), e));
        }
        Ok(self.blobs.read(&digest)?)
    }

    /// The path of an external input after checking its content against the fingerprint taken
    /// when the run was planned; `None` for an input that is a blob.
    fn checked_external(&self, name: &str, digest: &Digest) -> Result<Option<PathBuf>, StepError> {
        let Some(path) = self.externals.get(name) else {
            return Ok(None);
        };
        let now = tsr_state::fingerprint(path)
            .map_err(|e| StepError::Invalid(tsr_state::error_chain(&e)))?;
        if now != *digest {
            return Err(StepError::Invalid(format!(
                "input {} changed while the run was in progress; restore it or fork the run",
                path.display()
            )));
        }
        Ok(Some(path.clone()))
    }

    /// A verified path to an input (for large files the step opens itself). Read-only.
    /// External inputs give their original path (checked against the fingerprint).
    pub fn path(&self, name: &str) -> Result<PathBuf, StepError> {
        let digest = self.digest(name)?;
        if let Some(path) = self.checked_external(name, &digest)? {
            return Ok(path);
        }
        Ok(self.blobs.verified_path(&digest)?)
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, StepError> {
        let bytes = self.bytes(name)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            StepError::Invalid(format!("input `{name}` is not the expected JSON: {e}"))
        })
    }
}

/// What a step produced: named bytes or files. Files are moved into the blob store.
#[derive(Default)]
pub struct StepOutputs {
    pub(crate) items: BTreeMap<String, (String, OutputData)>,
}

impl StepOutputs {
    pub fn new() -> Self {
        Self::default()
    }
    /// Add an output with an artifact kind label (e.g. `jsonl`, `model`).
    pub fn bytes(mut self, name: &str, kind: &str, data: Vec<u8>) -> Self {
        self.items.insert(
            name.to_string(),
            (kind.to_string(), OutputData::Bytes(data)),
        );
        self
    }
    pub fn file(mut self, name: &str, kind: &str, path: &Path) -> Self {
        self.items.insert(
            name.to_string(),
            (kind.to_string(), OutputData::File(path.to_path_buf())),
        );
        self
    }
    pub fn blob(mut self, name: &str, kind: &str, d: Digest) -> Self {
        self.items
            .insert(name.to_string(), (kind.to_string(), OutputData::Blob(d)));
        self
    }
    pub fn json<T: serde::Serialize>(self, name: &str, value: &T) -> Self {
        let bytes = serde_json::to_vec(value).expect("serializing an output to JSON");
        self.bytes(name, "json", bytes)
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.items.keys().map(|s| s.as_str())
    }
    /// An output's data (for running a step outside the driver, e.g. in tests).
    pub fn data(&self, name: &str) -> Option<&OutputData> {
        self.items.get(name).map(|(_, d)| d)
    }
}
