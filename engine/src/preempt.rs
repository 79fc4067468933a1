//! Preemption: SIGINT/SIGTERM set a stop flag that steps check at item boundaries; the driver
//! then checkpoints and the process exits with [`crate::EXIT_INTERRUPTED`]. A second signal exits
//! at once: every write is crash-safe, so that loses at most the unit in progress.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Clone, Default, Debug)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// Install the SIGINT/SIGTERM handler (once per process). `hint` is printed on the first signal,
/// e.g. the command that resumes.
pub fn install(flag: StopFlag, hint: String) -> Result<(), String> {
    ctrlc::set_handler(move || {
        let n = SIGNALS.fetch_add(1, Ordering::SeqCst);
        if n == 0 {
            flag.set();
            eprintln!(
                "\ntsr: stop requested; finishing the current unit and saving progress (signal again to exit now). {hint}"
            );
        } else {
            eprintln!("\ntsr: second signal: exiting now; committed progress is safe. {hint}");
            std::process::exit(crate::EXIT_INTERRUPTED);
        }
    })
    .map_err(|e| format!("cannot install the signal handler: {e}"))
}
