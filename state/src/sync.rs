//! Where replication stands, shared by the store (which commits), the engine (which marks sync
//! points: a step done, a checkpoint) and the replicator thread (which ships commits to the
//! remote and acknowledges them). Nothing here talks to the network.

use std::str::FromStr;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// When the remote copy is brought up to date.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// Each time a step is done (everything committed by then travels with it).
    #[default]
    Step,
    /// Also at each checkpoint of a long step (a DPO run resumes from it on another machine).
    Checkpoint,
    /// After every commit (items included; commits made during an upload travel together).
    Commit,
}

impl FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "step" => Ok(SyncMode::Step),
            "checkpoint" => Ok(SyncMode::Checkpoint),
            "commit" => Ok(SyncMode::Commit),
            _ => Err(format!(
                "`{s}` is not a sync mode; use `step`, `checkpoint` or `commit`"
            )),
        }
    }
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::Step => "step",
            SyncMode::Checkpoint => "checkpoint",
            SyncMode::Commit => "commit",
        })
    }
}

/// A moment at which the engine asks for the remote to catch up (per [`SyncMode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPoint {
    StepDone,
    Checkpoint,
}

#[derive(Debug, Default)]
struct Inner {
    enabled: bool,
    mode: SyncMode,
    /// Last commit number of the local store.
    latest: u64,
    /// The replicator should ship at least up to this commit.
    want: u64,
    /// The remote holds every commit up to this one.
    acked: u64,
    /// Since when (ms) the remote has been behind what was asked of it.
    behind_since_ms: Option<u64>,
    max_lag_ms: u64,
    /// Set when another machine took the remote: nothing more is shipped.
    fenced: Option<String>,
    /// Set when replication stopped for good (damage that retrying cannot fix).
    fatal: Option<String>,
    last_error: Option<String>,
    stopping: bool,
}

/// Replication progress, shared between threads.
#[derive(Debug, Default)]
pub struct SyncState {
    inner: Mutex<Inner>,
    cv: Condvar,
}

/// A copy of where replication stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncView {
    pub enabled: bool,
    pub latest: u64,
    pub acked: u64,
    pub fenced: Option<String>,
    pub fatal: Option<String>,
    pub last_error: Option<String>,
}

impl SyncState {
    /// The store applied commit `seq`.
    pub(crate) fn committed(&self, seq: u64) {
        let mut g = self.inner.lock().unwrap();
        g.latest = seq;
        if g.enabled && g.mode == SyncMode::Commit {
            Self::ask(&mut g, seq);
            self.cv.notify_all();
        }
    }

    fn ask(g: &mut Inner, seq: u64) {
        if seq > g.want {
            g.want = seq;
        }
        if g.want > g.acked && g.behind_since_ms.is_none() {
            g.behind_since_ms = Some(crate::clock::now_ms());
        }
    }

    /// The engine reached a sync point. Returns at once, unless the remote has not caught up
    /// with what was asked of it for longer than the lag bound: then it waits (the run goes on
    /// locally only within that bound), and says why through `waiting`.
    pub fn mark(&self, point: SyncPoint, waiting: &dyn Fn(&str)) {
        let mut g = self.inner.lock().unwrap();
        if !g.enabled || g.fenced.is_some() || g.fatal.is_some() || g.stopping {
            return;
        }
        let wanted = match point {
            SyncPoint::StepDone => true,
            SyncPoint::Checkpoint => g.mode != SyncMode::Step,
        };
        if wanted {
            let latest = g.latest;
            Self::ask(&mut g, latest);
            self.cv.notify_all();
        }
        let mut said = false;
        while let Some(since) = g.behind_since_ms {
            if g.fenced.is_some() || g.fatal.is_some() || g.stopping {
                return;
            }
            let behind = crate::clock::now_ms().saturating_sub(since);
            if behind <= g.max_lag_ms {
                return;
            }
            if !said {
                said = true;
                waiting(&format!(
                    "the remote is {} commits behind and has been for {} s, more than the bound of {} s; waiting for it before going on{}",
                    g.want.saturating_sub(g.acked),
                    behind / 1000,
                    g.max_lag_ms / 1000,
                    g.last_error
                        .as_ref()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ));
            }
            g = self.cv.wait_timeout(g, Duration::from_secs(1)).unwrap().0;
        }
    }

    pub fn view(&self) -> SyncView {
        let g = self.inner.lock().unwrap();
        SyncView {
            enabled: g.enabled,
            latest: g.latest,
            acked: g.acked,
            fenced: g.fenced.clone(),
            fatal: g.fatal.clone(),
            last_error: g.last_error.clone(),
        }
    }

    // ---- the replicator's side ----------------------------------------------------------------

    pub(crate) fn enable(&self, mode: SyncMode, acked: u64, max_lag: Duration) {
        let mut g = self.inner.lock().unwrap();
        g.enabled = true;
        g.mode = mode;
        g.acked = acked;
        g.want = acked;
        g.max_lag_ms = max_lag.as_millis() as u64;
        g.behind_since_ms = None;
    }

    /// Wait until there is something to ship or `timeout` passes. Returns the commit to ship up
    /// to, if any.
    pub(crate) fn wait_work(&self, timeout: Duration) -> Option<u64> {
        let g = self.inner.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |g| g.want <= g.acked && !g.stopping)
            .unwrap();
        (g.want > g.acked).then_some(g.want)
    }

    pub(crate) fn set_acked(&self, seq: u64) {
        let mut g = self.inner.lock().unwrap();
        if seq > g.acked {
            g.acked = seq;
            // The lag is timed from the last time the remote moved forward, not from the first
            // time it fell behind: a remote that keeps moving never holds the run back.
            g.behind_since_ms = (g.want > g.acked).then(crate::clock::now_ms);
        }
        g.last_error = None;
        if g.acked >= g.want {
            g.behind_since_ms = None;
        }
        self.cv.notify_all();
    }

    pub(crate) fn set_error(&self, e: String) {
        self.inner.lock().unwrap().last_error = Some(e);
    }

    pub(crate) fn set_fatal(&self, why: String) {
        let mut g = self.inner.lock().unwrap();
        g.fatal = Some(why);
        self.cv.notify_all();
    }

    /// The run is stopping (SIGTERM, SIGINT): a sync point no longer waits for a lagging
    /// remote, and the replicator ships what there is.
    pub fn interrupt(&self) {
        let mut g = self.inner.lock().unwrap();
        g.stopping = true;
        let latest = g.latest;
        Self::ask(&mut g, latest);
        self.cv.notify_all();
    }

    pub(crate) fn set_fenced(&self, why: String) {
        let mut g = self.inner.lock().unwrap();
        g.fenced = Some(why);
        self.cv.notify_all();
    }

    /// Ask for everything committed so far and let the replicator know it should finish.
    pub(crate) fn request_all(&self, stopping: bool) -> u64 {
        let mut g = self.inner.lock().unwrap();
        let latest = g.latest;
        Self::ask(&mut g, latest);
        g.stopping |= stopping;
        self.cv.notify_all();
        latest
    }

    /// Wait until the remote holds commit `seq`, the remote is lost to another writer, or the
    /// deadline passes. True when it holds it.
    pub(crate) fn wait_acked(&self, seq: u64, deadline: std::time::Instant) -> bool {
        let mut g = self.inner.lock().unwrap();
        loop {
            if g.acked >= seq {
                return true;
            }
            if g.fenced.is_some() || g.fatal.is_some() {
                return false;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}
