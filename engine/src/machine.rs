//! The step state machine. Every transition of a step's status is in the one `match` below;
//! anything else is an error naming the state and the event.
//!
//! ```text
//!            Start                 Finish
//! Pending ─────────► Running ───────────────► Done (final; reused by equal keys)
//!    ▲                │  │ ▲
//!    │   Interrupt    │  │ │ Start (a process died while Running: resume, attempt + 1)
//!    └────────────────┘  │ └─┘
//!                   Fail ▼
//!                     Failed ──Start (re-run: retry, attempt + 1)──► Running
//!
//! Any state ──Reset (verify --repair: an output blob was lost)──► Pending
//! ```

use std::collections::BTreeMap;
use tsr_state::{now_ms, Digest, StepStatus};

#[derive(Clone, Debug)]
pub enum Event {
    Start,
    Finish(BTreeMap<String, Digest>),
    Fail(String),
    Interrupt,
    /// `verify --repair`: an output blob was lost or damaged; forget the result so the step runs
    /// again. Committed items are kept (they are verified records in sled).
    Reset,
}

impl Event {
    pub fn label(&self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::Finish(_) => "finish",
            Event::Fail(_) => "fail",
            Event::Interrupt => "interrupt",
            Event::Reset => "reset",
        }
    }
}

/// Apply `event` to `status`. `attempts` is the number of starts so far (kept in the record).
/// Returns the new status or `(from, event)` labels for an invalid transition.
pub fn transition(
    status: &StepStatus,
    event: Event,
    attempts: u32,
) -> Result<StepStatus, (&'static str, &'static str)> {
    use StepStatus::*;
    let label = event.label();
    match (status, event) {
        (Pending | Failed { .. } | Running { .. }, Event::Start) => Ok(Running {
            attempt: attempts + 1,
            since_ms: now_ms(),
        }),
        (Running { .. }, Event::Finish(outputs)) => Ok(Done {
            outputs,
            finished_ms: now_ms(),
        }),
        (Running { attempt, .. }, Event::Fail(error)) => Ok(Failed {
            attempt: *attempt,
            error,
        }),
        (Running { .. }, Event::Interrupt) => Ok(Pending),
        (_, Event::Reset) => Ok(Pending),
        (s, _) => Err((s.label(), label)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition() {
        let running = transition(&StepStatus::Pending, Event::Start, 0).unwrap();
        assert!(matches!(running, StepStatus::Running { attempt: 1, .. }));
        let again = transition(&running, Event::Start, 1).unwrap();
        assert!(matches!(again, StepStatus::Running { attempt: 2, .. }));
        assert_eq!(
            transition(&running, Event::Interrupt, 1).unwrap(),
            StepStatus::Pending
        );
        let failed = transition(&running, Event::Fail("boom".into()), 1).unwrap();
        assert!(matches!(failed, StepStatus::Failed { attempt: 1, .. }));
        assert!(matches!(
            transition(&failed, Event::Start, 1).unwrap(),
            StepStatus::Running { attempt: 2, .. }
        ));
        let done = transition(&running, Event::Finish(BTreeMap::new()), 1).unwrap();
        assert!(matches!(done, StepStatus::Done { .. }));
        assert_eq!(
            transition(&done, Event::Reset, 1).unwrap(),
            StepStatus::Pending
        );
        for ev in [
            Event::Start,
            Event::Interrupt,
            Event::Fail("x".into()),
            Event::Finish(BTreeMap::new()),
        ] {
            let label = ev.label();
            assert_eq!(transition(&done, ev, 1).unwrap_err(), ("done", label));
        }
        assert!(transition(&StepStatus::Pending, Event::Interrupt, 0).is_err());
        assert!(transition(&StepStatus::Pending, Event::Finish(BTreeMap::new()), 0).is_err());
        assert!(transition(&failed, Event::Fail("y".into()), 1).is_err());
    }
}
