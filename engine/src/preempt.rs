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
    /// Sleeps for `d`, or less once the flag is set (checked every 50 ms).
    pub fn sleep(&self, d: std::time::Duration) {
        let end = std::time::Instant::now() + d;
        while !self.is_set() {
            let now = std::time::Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(std::time::Duration::from_millis(50)));
        }
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

/// The flag a worker's signal handler sets (see [`install_worker`]).
static WORKER_FLAG: std::sync::OnceLock<StopFlag> = std::sync::OnceLock::new();

extern "C" fn worker_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    if let Some(f) = WORKER_FLAG.get() {
        f.set();
    }
}

/// A shard worker's SIGINT/SIGTERM/SIGHUP handling: every signal only sets `flag`, inside the
/// handler itself (so a stopped worker that is continued sees the flag at the boundary where it
/// stopped), and never exits; the driver decides when to kill. Once per process.
pub fn install_worker(flag: StopFlag) -> Result<(), String> {
    WORKER_FLAG
        .set(flag)
        .map_err(|_| "the worker's signal handler is already installed".to_string())?;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only performs an atomic store.
        let old = unsafe { libc::signal(sig, worker_signal as *const () as libc::sighandler_t) };
        if old == libc::SIG_ERR {
            return Err(format!("cannot install the handler of signal {sig}"));
        }
    }
    Ok(())
}
