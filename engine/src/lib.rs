//! The tsr engine: a petgraph DAG of steps, one explicit step state machine, a pure planner and
//! a driver that executes its decisions durably, with preemption and replay.
//!
//! The engine knows nothing about language models (it does not import candle) and nothing about
//! sled (it talks to `tsr_state::Store`). Concrete steps live in `tsr-steps`; workflows that wire
//! them into DAGs live in `tsr-workflows`.
//!
//! Flow of a run: a workflow builds a [`Dag`]; [`Driver::run`] loops `plan` (a pure function of
//! the DAG and what the store has recorded) -> execute the actions -> commit, until every node is
//! done, a step fails, or a stop signal arrives.

mod context;
mod dag;
mod driver;
mod error;
pub mod exchange;
pub mod identity;
pub mod job;
mod key;
pub mod machine;
pub mod node_cache;
mod output;
mod plan;
pub mod preempt;
pub mod processes;
mod replay;
mod run;
pub mod shard;
pub mod slurm;
mod status;
mod step;
pub mod testkit;
pub mod worker;

pub use context::{Checkpoint, ItemJournal, MemoryJournal, Progress, StepContext};
pub use dag::{Dag, DagBuilder, InputSource, Node};
pub use driver::{Driver, DriverOptions, Outcome};
pub use error::{EngineError, StepError};
pub use key::step_key;
pub use output::OutputData;
pub use plan::{plan, Action, JournalView, NodeView, Plan};
pub use preempt::StopFlag;
pub use replay::{replay, ReplayReport};
pub use run::{open_run, RunSpec};
pub use status::{
    read_snapshot, remote_lag, status_rows, write_snapshot, RemoteLag, RunStatusView, StatusRow,
};
pub use step::{Resource, Step, StepInputs, StepOutputs};

/// Exit code of a process interrupted by SIGINT/SIGTERM after checkpointing: run the same
/// command again to continue (BSD `EX_TEMPFAIL`).
pub const EXIT_INTERRUPTED: i32 = 75;
/// A run stopped at a limit the user set (a token budget): not 75, so that a requeueable job
/// is not requeued forever at its budget.
pub const EXIT_LIMIT: i32 = 3;
