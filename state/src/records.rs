//! The persisted record types. Each is a versioned envelope (see `envelope.rs`): change a shape,
//! bump its `VERSION`.

use crate::envelope::Versioned;
use crate::keys;
use crate::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A run: a named workflow definition and where it stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub name: String,
    pub workflow: String,
    /// The validated config as TOML text (what `tsr resume` and `tsr fork` rebuild from).
    pub config_toml: String,
    /// The config flattened to `dotted.key -> value`, compared on re-run to name changed fields.
    pub definition: BTreeMap<String, String>,
    /// Digests of external input files (e.g. the prompts file) when the run was defined.
    pub externals: BTreeMap<String, Digest>,
    pub forked_from: Option<String>,
    pub status: RunStatus,
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    Created,
    Running,
    Interrupted,
    Failed { error: String },
    Done,
}

impl Versioned for RunRecord {
    const WHAT: &'static str = "run";
    const VERSION: u16 = 1;
}

/// Binding of a DAG node of a run to the step key it resolved to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub step_key: Digest,
    /// True when the step was already done (by another run or an earlier node) when bound.
    pub reused: bool,
    pub iteration: Option<u32>,
}

impl Versioned for NodeRecord {
    const WHAT: &'static str = "node";
    const VERSION: u16 = 1;
}

/// The status of a step: one explicit state machine; transitions live in `tsr-engine`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StepStatus {
    Pending,
    Running {
        attempt: u32,
        since_ms: u64,
    },
    Done {
        outputs: BTreeMap<String, Digest>,
        finished_ms: u64,
    },
    Failed {
        attempt: u32,
        error: String,
    },
}

impl StepStatus {
    pub fn label(&self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running { .. } => "running",
            StepStatus::Done { .. } => "done",
            StepStatus::Failed { .. } => "failed",
        }
    }
}

/// A resumable checkpoint of a long step (e.g. DPO weights + optimizer state + data cursor).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Increases with every checkpoint of the step.
    pub seq: u64,
    pub blobs: BTreeMap<String, Digest>,
    /// Step-defined cursor bytes (e.g. an encoded data cursor).
    pub cursor: Vec<u8>,
}

/// A step, keyed by its step key (hash of kind, version, config and input digests). Shared by
/// every run in the store: a step done once is reused by any run that needs the same key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub kind: String,
    pub version: u32,
    /// Canonical JSON of the step config.
    pub config: String,
    pub inputs: BTreeMap<String, Digest>,
    pub status: StepStatus,
    /// Number of times execution started.
    pub attempts: u32,
    /// Items committed so far (the progress cursor of a long step).
    pub items_done: u64,
    pub items_total: Option<u64>,
    /// Milliseconds spent executing, summed over attempts (wall clock, informational only).
    pub busy_ms: u64,
    pub checkpoint: Option<CheckpointRecord>,
    /// The run and node that first executed it.
    pub first_run: String,
    pub first_node: String,
}

impl Versioned for StepRecord {
    const WHAT: &'static str = "step";
    const VERSION: u16 = 1;
}

/// What a blob is and which step made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub kind: String,
    pub size: u64,
    pub producer: Option<Digest>,
    pub output: String,
}

impl Versioned for ArtifactRecord {
    const WHAT: &'static str = "artifact";
    const VERSION: u16 = 1;
}

/// A lineage edge: `output` was made by `step` from `input` (under the step's input name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeRecord {
    pub step: Digest,
    pub input_name: String,
    pub output_name: String,
}

impl Versioned for EdgeRecord {
    const WHAT: &'static str = "edge";
    const VERSION: u16 = 1;
}

/// Who computed one batch of a step's items, kept beside the items (never inside them, so a
/// step's output is the same bytes wherever its batches ran). Outputs can depend on the thread
/// count, the CPU's vector features and the device, so those are kept with the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// `local` (the driver itself), `processes` or `slurm`.
    pub executor: String,
    pub host: String,
    pub pid: u32,
    /// The executor's name for the worker: `812_3` (Slurm array job and task), `shard 2`.
    pub job: Option<String>,
    /// Which try made the batch: the Slurm task's restart count, the worker's launch, or the
    /// step's attempt in the driver.
    pub attempt: u32,
    /// CPU threads the worker computed with.
    pub threads: u32,
    pub device: String,
    /// The CPU's model and the vector features its kernels can use.
    pub cpu: String,
    /// The program's identity (the digest of its executable, 16 hex digits).
    pub build: String,
    /// The last item index of the batch (the first is in the key).
    pub last: u64,
    pub finished_ms: u64,
}

impl Versioned for WorkerRecord {
    const WHAT: &'static str = "worker";
    const VERSION: u16 = 1;
}

impl WorkerRecord {
    /// One line for people: `array task 812_3 (restart 0) on node7, pid 4711: 4 threads, cpu,
    /// AMD EPYC 9R14 (avx512f avx2 fma)`.
    pub fn describe(&self) -> String {
        let who = match (self.executor.as_str(), &self.job) {
            ("slurm", Some(j)) => format!("array task {j} (restart {})", self.attempt),
            ("processes", Some(j)) => format!("worker process, {j} (launch {})", self.attempt),
            (_, _) => format!("the driver (attempt {})", self.attempt),
        };
        format!(
            "{who} on {}, pid {}: {} thread{}, {}, {}, build {}",
            self.host,
            self.pid,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.device,
            self.cpu,
            self.build.get(..12).unwrap_or(&self.build)
        )
    }
}

/// Whether a raw record of the database decodes as the type its key says.
pub(crate) fn decode_check(key: &[u8], value: &[u8]) -> Result<(), String> {
    let r = match key.first() {
        Some(&keys::RUN) => crate::envelope::decode::<RunRecord>(key, value).map(|_| ()),
        Some(&keys::NODE) => crate::envelope::decode::<NodeRecord>(key, value).map(|_| ()),
        Some(&keys::STEP) => crate::envelope::decode::<StepRecord>(key, value).map(|_| ()),
        Some(&keys::ARTIFACT) => crate::envelope::decode::<ArtifactRecord>(key, value).map(|_| ()),
        Some(&keys::EDGE) => crate::envelope::decode::<EdgeRecord>(key, value).map(|_| ()),
        Some(&keys::WORKER) => crate::envelope::decode::<WorkerRecord>(key, value).map(|_| ()),
        Some(&keys::ITEM) | Some(&keys::META) | Some(&keys::JOURNAL) => Ok(()),
        _ => return Err(format!("unknown key {}", keys::display(key))),
    };
    r.map_err(|e| crate::error_chain(&e))
}
