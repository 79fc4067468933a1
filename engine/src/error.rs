//! Engine errors. A changed workflow definition (`DefinitionChanged`, `InputChanged`) is a
//! different thing from a failed step (`StepFailed`) and from storage trouble (`State`).

use tsr_state::StateError;

/// What a step returns when it does not finish.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The stop flag was seen at an item boundary; progress up to there is committed.
    #[error("interrupted at an item boundary (progress is saved)")]
    Interrupted,
    /// A service the step uses (an API server) did not answer within its retries; what was
    /// done is saved, and running again later continues (the run exits 75).
    #[error("{0}")]
    Unavailable(String),
    /// A limit the user set (a token budget) was reached; what was done is saved, and raising
    /// the limit and running again continues (the run exits with [`crate::EXIT_LIMIT`]).
    #[error("{0}")]
    Limit(String),
    /// Bad input data or config; re-running without a change will fail again.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
    #[error("{context}")]
    Wrapped {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StepError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StepError::Io {
            context: context.into(),
            source,
        }
    }
    pub fn wrap<E: std::error::Error + Send + Sync + 'static>(
        context: impl Into<String>,
        e: E,
    ) -> Self {
        StepError::Wrapped {
            context: context.into(),
            source: Box::new(e),
        }
    }
}

/// A failed crash-safe write (`fsio`) of a step's file.
impl From<tsr_state::fsio::PathError> for StepError {
    fn from(e: tsr_state::fsio::PathError) -> Self {
        StepError::io(format!("writing {}", e.path.display()), e.source)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),

    #[error("the workflow graph has a cycle: {0}")]
    Cycle(String),

    #[error("node `{node}` takes input `{input}` from node `{from}`, which does not exist")]
    UnknownNode {
        node: String,
        input: String,
        from: String,
    },

    #[error("node `{0}` is defined twice")]
    DuplicateNode(String),

    #[error("node `{node}`: {reason}")]
    BadNode { node: String, reason: String },

    #[error("run `{run}` was started with another definition; changed: {changes}.\n  To keep the old run, use another name; to branch from it with these changes: tsr fork {run} --name NEW {sets}")]
    DefinitionChanged {
        run: String,
        changes: String,
        sets: String,
    },

    #[error("run `{run}`: the inputs of node `{node}` changed since the run recorded it (recorded step {recorded}, now {now}): an input file was edited, or an upstream result differs. Restore the input, or fork the run")]
    InputChanged {
        run: String,
        node: String,
        recorded: String,
        now: String,
    },

    #[error("run `{run}`: step `{node}` is defined differently by this tsr than when the run recorded it ({what}). Its recorded result stays valid for the old definition; to recompute with this one: tsr fork {run} --name NEW (or use the tsr release that started the run)")]
    StepDefinitionChanged {
        run: String,
        node: String,
        what: String,
    },

    #[error("step `{node}` (kind {kind}, attempt {attempt}) failed")]
    StepFailed {
        node: String,
        kind: String,
        attempt: u32,
        #[source]
        source: StepError,
    },

    #[error("step `{node}` declares output `{output}` which it did not produce")]
    MissingOutput { node: String, output: String },

    #[error("invalid step transition for `{node}`: {from} -> {event}")]
    Transition {
        node: String,
        from: String,
        event: String,
    },

    #[error("no node `{0}` in this run; `tsr status RUN` lists the nodes")]
    NoSuchNode(String),

    #[error("node `{0}` has not finished, so there is nothing recorded to replay")]
    NotDone(String),

    #[error("{0}")]
    Other(String),
}
