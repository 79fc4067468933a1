//! The replicator: a thread that ships the store's commits to the remote as segments, after
//! the blobs they refer to, renews the lease, and stops at once when it lost the lease.

use super::lease::{self, Holder, Lease};
use super::{
    current_chain, referenced_blobs, segment_key, snapshot_key, Remote, RemoteError, RemoteUrl,
};
use crate::error::{StateError, StateResult};
use crate::format::{encode_object, Kind, Ops};
use crate::sync::SyncMode;
use crate::{Digest, Store};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a replicator runs.
#[derive(Clone)]
pub struct ReplicaOptions {
    pub mode: SyncMode,
    /// Take the lease even if another machine holds it (the user says that machine is gone).
    pub take_over: bool,
    /// How long a lease lasts without renewal (renewed every third of it).
    pub lease_ttl: Duration,
    /// How far (in time) the remote may fall behind before the run waits for it.
    pub max_lag: Duration,
    /// A new snapshot after this many segments, so a restore reads a bounded number of them.
    pub snapshot_every: u64,
    /// Progress and trouble, one line each (retries, restore, catching up).
    pub say: Arc<dyn Fn(&str) + Send + Sync>,
    /// Called once when another machine took the remote (the CLI stops the run).
    pub on_fenced: Arc<dyn Fn(&str) + Send + Sync>,
}

impl ReplicaOptions {
    pub fn new(mode: SyncMode) -> Self {
        let secs = |var: &str, default: u64| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(default)
        };
        ReplicaOptions {
            mode,
            take_over: false,
            lease_ttl: Duration::from_secs(secs("TSR_REMOTE_LEASE_S", 60).max(1)),
            max_lag: Duration::from_secs(secs("TSR_REMOTE_MAX_LAG_S", 900)),
            snapshot_every: 64,
            say: Arc::new(|_| {}),
            on_fenced: Arc::new(|_| {}),
        }
    }
}

/// What [`Replicator::finish`] achieved.
#[derive(Clone, Debug)]
pub struct StopReport {
    /// The remote holds every commit up to this one.
    pub acked: u64,
    pub latest: u64,
    pub secs: f64,
    pub fenced: Option<String>,
    /// Replication stopped for good (damage); the local store is intact.
    pub fatal: Option<String>,
    pub last_error: Option<String>,
}

impl StopReport {
    pub fn caught_up(&self) -> bool {
        self.acked >= self.latest && self.fenced.is_none() && self.fatal.is_none()
    }
}

struct Shared {
    store: Arc<Store>,
    remote: Arc<Remote>,
    lease: Arc<Mutex<Lease>>,
    keeper: Keeper,
    epoch: u64,
    opts: ReplicaOptions,
    /// Blobs the remote is known to hold.
    known: Mutex<BTreeSet<String>>,
    segments_since_snapshot: Mutex<u64>,
    /// Finish: return once the remote holds every commit.
    exit: AtomicBool,
    /// Give up now (the flush deadline passed, or the replicator is dropped).
    abort: AtomicBool,
}

/// A running replicator. [`Replicator::finish`] ships what is left and lets the lease go.
pub struct Replicator {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    done: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

/// What starting found and did.
#[derive(Clone, Debug, Default)]
pub struct StartReport {
    /// The remote was restored into this (empty) store first.
    pub restored: Option<super::RestoreReport>,
    /// A new generation was started (the remote was empty or taken from another store).
    pub new_generation: bool,
    pub epoch: u64,
    /// Commits the remote already held.
    pub remote_seq: u64,
}

impl Replicator {
    /// Take the remote's lease for this store and start shipping. An empty store is first
    /// filled from the remote (a new machine continues where the lost one stopped).
    pub fn start(
        store: Arc<Store>,
        url: &RemoteUrl,
        opts: ReplicaOptions,
    ) -> StateResult<(Replicator, StartReport)> {
        let before = store.remote()?;
        if let Some(b) = &before {
            if b.url != url.as_str() {
                return Err(RemoteError::OtherRemote {
                    attached: b.url.clone(),
                    given: url.to_string(),
                }
                .into());
            }
        }
        let remote = Arc::new(Remote::open_for_writing(url)?);
        let me = Holder::this_process(store.store_id()?);
        let empty = store.seq() == 0 && store.dump_records()?.is_empty();
        // Refuse before touching the lease: a store that cannot continue the remote's history
        // must not fence the machine that writes it, nor hold the lease it was refused.
        if before.as_ref().is_some_and(|b| b.rolled_back) {
            return Err(RemoteError::RolledBack {
                url: url.to_string(),
            }
            .into());
        }
        if !empty {
            if let Some(c) = current_chain(&remote.list("gens")?) {
                if lease::would_start_generation(&remote, &me)? {
                    check_continues(url, &c, before.as_ref(), store.seq())?;
                } else if before.as_ref().is_some_and(|b| b.epoch == c.epoch)
                    && c.last() > store.seq()
                {
                    return Err(RemoteError::Ahead {
                        url: url.to_string(),
                        remote: c.last(),
                        local: store.seq(),
                    }
                    .into());
                }
            }
        }
        let (lease, new_gen) = lease::acquire(&remote, &me, opts.lease_ttl, opts.take_over)?;
        let epoch = lease.doc.epoch;
        let lease = Arc::new(Mutex::new(lease));
        // Any error from here on lets the lease go again.
        let mut guard = ReleaseOnError {
            remote: remote.clone(),
            lease: lease.clone(),
            armed: true,
        };
        let keeper = Keeper::start(&remote, &lease, &store, &opts)?;
        let names = remote.list("gens")?;
        let chain = current_chain(&names);
        let mut report = StartReport {
            new_generation: new_gen,
            epoch,
            ..Default::default()
        };
        if empty {
            if let Some(chain) = &chain {
                (opts.say)(&format!(
                    "restoring this store from {url} (generation {}, commit {})",
                    chain.epoch,
                    chain.last()
                ));
                report.restored = Some(super::restore::restore_into(&remote, &store, chain)?);
            }
        }
        let known: BTreeSet<String> = remote
            .list("blobs")?
            .into_iter()
            .filter_map(|(n, _)| n.strip_prefix("blobs/").map(str::to_string))
            .collect();
        let shared = Arc::new(Shared {
            store: store.clone(),
            remote,
            lease,
            keeper,
            epoch,
            opts: opts.clone(),
            known: Mutex::new(known),
            segments_since_snapshot: Mutex::new(0),
            exit: AtomicBool::new(false),
            abort: AtomicBool::new(false),
        });
        // Where this store's history ends on the remote, if the remote holds it.
        let local = store.seq();
        let acked = match &chain {
            Some(c) if new_gen => {
                // Taking the remote over: this store must hold the history the remote holds
                // (restored from it just now, or written or restored earlier), and no less.
                if report.restored.is_none() {
                    check_continues(url, c, before.as_ref(), local)?;
                }
                None
            }
            Some(c) if c.epoch == epoch => {
                let end = c.last();
                if before.as_ref().is_some_and(|b| b.rolled_back) {
                    // Accepted a rolled-back database: its commit numbers no longer match.
                    return Err(RemoteError::RolledBack {
                        url: url.to_string(),
                    }
                    .into());
                }
                if end > local {
                    return Err(RemoteError::Ahead {
                        url: url.to_string(),
                        remote: end,
                        local,
                    }
                    .into());
                }
                if end == local || store.journal_range(end, local)?.is_some() {
                    *shared.segments_since_snapshot.lock().unwrap() = c.segments.len() as u64;
                    store.with_commits_paused(|_| store.start_journal(url.as_str()))?;
                    store.remote_acked(epoch, end)?;
                    Some(end)
                } else {
                    None
                }
            }
            _ => None,
        };
        let acked = match acked {
            Some(a) => a,
            None => shared.snapshot()?,
        };
        report.remote_seq = acked;
        store.sync().enable(opts.mode, acked, opts.max_lag);
        // Whatever was committed while the remote was away is shipped now.
        store.sync().request_all(false);
        guard.armed = false;
        let done = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let thread = {
            let shared = shared.clone();
            let done = done.clone();
            std::thread::Builder::new()
                .name("tsr-replicator".into())
                .spawn(move || {
                    shared.run();
                    *done.0.lock().unwrap() = true;
                    done.1.notify_all();
                })
                .map_err(|e| StateError::io(store.root(), e))?
        };
        Ok((
            Replicator {
                shared,
                thread: Some(thread),
                done,
            },
            report,
        ))
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// Ship everything committed so far (waiting at most `within`), stop, and let the lease go
    /// when the remote holds it all.
    pub fn finish(mut self, within: Duration) -> StopReport {
        let t0 = Instant::now();
        let sync = self.shared.store.sync().clone();
        self.shared.exit.store(true, Ordering::SeqCst);
        let latest = sync.request_all(true);
        sync.wait_acked(latest, t0 + within);
        self.shared.abort.store(true, Ordering::SeqCst);
        sync.request_all(true);
        // The thread may be inside an upload; wait for it only as long as allowed.
        let (lock, cv) = &*self.done;
        let g = lock.lock().unwrap();
        let left = within.saturating_sub(t0.elapsed()) + Duration::from_secs(2);
        let (g, _) = cv.wait_timeout_while(g, left, |d| !*d).unwrap();
        let joined = *g;
        drop(g);
        if joined {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        // The keeper may be inside a renewal: it is told to stop, not waited for.
        self.shared.keeper.stop.store(true, Ordering::SeqCst);
        let v = sync.view();
        if v.acked >= latest && v.fenced.is_none() && joined {
            if let Ok(l) = self.shared.lease.try_lock() {
                lease::release(&self.shared.remote, &l);
            }
        }
        StopReport {
            acked: v.acked,
            latest,
            secs: t0.elapsed().as_secs_f64(),
            fenced: v.fenced,
            fatal: v.fatal,
            last_error: v.last_error,
        }
    }

    /// Compact and clean the remote: a new snapshot of the current state (the remote must
    /// hold every commit: call after a sync), then delete older generations, superseded
    /// segments and snapshots, and blobs the current state does not refer to.
    pub fn gc(&self, dry_run: bool) -> StateResult<super::RemoteGcReport> {
        let sync = self.shared.store.sync().clone();
        let latest = sync.request_all(false);
        if !sync.wait_acked(latest, Instant::now() + Duration::from_secs(3600)) {
            let v = sync.view();
            return Err(match v.fenced {
                Some(holder) => RemoteError::Fenced {
                    url: self.shared.remote.url.to_string(),
                    holder,
                },
                None => RemoteError::Unsynced {
                    url: self.shared.remote.url.to_string(),
                    detail: format!(
                        "still behind after an hour ({})",
                        v.last_error.unwrap_or_else(|| "no error reported".into())
                    ),
                },
            }
            .into());
        }
        let snap = if dry_run {
            None
        } else {
            Some(self.shared.snapshot()?)
        };
        super::restore::gc_after_snapshot(
            &self.shared.remote,
            &self.shared.store,
            self.shared.epoch,
            snap,
            dry_run,
        )
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.shared.exit.store(true, Ordering::SeqCst);
        self.shared.abort.store(true, Ordering::SeqCst);
        self.shared.keeper.stop.store(true, Ordering::SeqCst);
        self.shared.store.sync().request_all(true);
    }
}

/// Lets the lease go when starting fails after it was taken.
struct ReleaseOnError {
    remote: Arc<Remote>,
    lease: Arc<Mutex<Lease>>,
    armed: bool,
}

impl Drop for ReleaseOnError {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(l) = self.lease.try_lock() {
                lease::release(&self.remote, &l);
            }
        }
    }
}

/// Whether a store may take over a remote whose history is `c`: it must have written or
/// restored that generation, and the remote must not have moved past what the store knew of it.
fn check_continues(
    url: &RemoteUrl,
    c: &super::Chain,
    before: Option<&crate::RemoteState>,
    local: u64,
) -> StateResult<()> {
    if before.is_some_and(|b| b.rolled_back) {
        return Err(RemoteError::RolledBack {
            url: url.to_string(),
        }
        .into());
    }
    let Some(b) = before.filter(|b| b.epoch == c.epoch) else {
        return Err(RemoteError::OtherHistory {
            url: url.to_string(),
            epoch: c.epoch,
            seq: c.last(),
        }
        .into());
    };
    if c.last() > b.seq || c.last() > local {
        return Err(RemoteError::Ahead {
            url: url.to_string(),
            remote: c.last(),
            local: b.seq.min(local),
        }
        .into());
    }
    Ok(())
}

/// Renews the lease every third of its time to live, whatever the replicator is doing (a
/// restore, a snapshot, a large upload), and stops the run when another machine took it.
struct Keeper {
    stop: Arc<AtomicBool>,
}

impl Keeper {
    fn start(
        remote: &Arc<Remote>,
        lease: &Arc<Mutex<Lease>>,
        store: &Arc<Store>,
        opts: &ReplicaOptions,
    ) -> StateResult<Keeper> {
        let stop = Arc::new(AtomicBool::new(false));
        let (remote, lease, sync, opts, flag) = (
            remote.clone(),
            lease.clone(),
            store.sync().clone(),
            opts.clone(),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name("tsr-lease".into())
            .spawn(move || {
                let every = opts.lease_ttl / 3;
                let mut next = Instant::now() + every;
                while !flag.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    if Instant::now() < next {
                        continue;
                    }
                    let r = lease::renew(&remote, &mut lease.lock().unwrap(), opts.lease_ttl);
                    match r {
                        Ok(()) => next = Instant::now() + every,
                        Err(RemoteError::Fenced { holder, .. }) => {
                            if sync.view().fenced.is_none() {
                                sync.set_fenced(holder.clone());
                                (opts.on_fenced)(&holder);
                            }
                            return;
                        }
                        Err(e) => {
                            let msg = crate::error_chain(&e);
                            (opts.say)(&format!("renewing the lease: {msg}; retrying in 2 s"));
                            sync.set_error(msg);
                            next = Instant::now() + Duration::from_secs(2);
                        }
                    }
                }
            })
            .map_err(|e| StateError::io(store.root(), e))?;
        Ok(Keeper { stop })
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A blob hard-linked into the store's tmp folder: it survives the store removing the blob
/// (an old checkpoint) while it uploads.
struct Pinned {
    digest: Digest,
    hex: String,
    path: PathBuf,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Shared {
    fn say(&self, s: &str) {
        (self.opts.say)(s)
    }

    /// Pin the blobs `records` refer to that the remote lacks. Called with commits paused.
    fn pin(
        &self,
        blobs: BTreeSet<Digest>,
        required: &BTreeSet<Digest>,
    ) -> StateResult<Vec<Pinned>> {
        let known = self.known.lock().unwrap();
        let mut out = Vec::new();
        for d in blobs {
            let hex = d.to_hex();
            if known.contains(&hex) {
                continue;
            }
            let src = self.store.blobs().path(&d);
            let path = self.store.blobs().tmp_path("replica");
            match std::fs::hard_link(&src, &path) {
                Ok(()) => out.push(Pinned {
                    digest: d,
                    hex,
                    path,
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required.contains(&d) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StateError::BlobMissing {
                        digest: hex,
                        path: src,
                    })
                }
                Err(e) => return Err(StateError::io(&src, e)),
            }
        }
        Ok(out)
    }

    fn upload(&self, pinned: Vec<Pinned>) -> StateResult<()> {
        for p in pinned {
            if self.exit_fenced() {
                return Err(self.fenced_err());
            }
            self.remote.put_blob(&p.digest, &p.path)?;
            self.known.lock().unwrap().insert(p.hex.clone());
        }
        Ok(())
    }

    fn exit_fenced(&self) -> bool {
        self.store.sync().view().fenced.is_some()
    }

    fn fenced_err(&self) -> StateError {
        RemoteError::Fenced {
            url: self.remote.url.to_string(),
            holder: self
                .store
                .sync()
                .view()
                .fenced
                .unwrap_or_else(|| "another machine".into()),
        }
        .into()
    }

    /// Renew the lease now (before each segment: a writer that lost it writes nothing more).
    fn renew(&self) -> StateResult<()> {
        let mut l = self.lease.lock().unwrap();
        match lease::renew(&self.remote, &mut l, self.opts.lease_ttl) {
            Ok(()) => Ok(()),
            Err(RemoteError::Fenced { url, holder }) => {
                if self.store.sync().view().fenced.is_none() {
                    self.store.sync().set_fenced(holder.clone());
                    (self.opts.on_fenced)(&holder);
                }
                Err(RemoteError::Fenced { url, holder }.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Upload a snapshot of the whole store as of now (and start journaling). Returns its
    /// commit number.
    fn snapshot(&self) -> StateResult<u64> {
        let (seq, records, pinned) = self.store.with_commits_paused(|seq| {
            self.store.start_journal(self.remote.url.as_str())?;
            let records = self.store.dump_records()?;
            let refs = referenced_blobs(records.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            let required =
                required_blobs(records.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            let pinned = self.pin(refs, &required)?;
            Ok::<_, StateError>((seq, records, pinned))
        })?;
        self.upload(pinned)?;
        let ops: Ops = records.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let bytes = encode_object(Kind::Snapshot, self.epoch, 0, seq, &ops);
        self.renew()?;
        let key = snapshot_key(self.epoch, seq);
        if !self.remote.put_new(&key, bytes.clone())? {
            self.same_or_corrupt(&key, &bytes)?;
        }
        self.store.remote_acked(self.epoch, seq)?;
        *self.segments_since_snapshot.lock().unwrap() = 0;
        Ok(seq)
    }

    /// An object we meant to create exists already (we wrote it before a crash): it must be
    /// what we would write now.
    fn same_or_corrupt(&self, key: &str, bytes: &[u8]) -> StateResult<()> {
        match self.remote.get(key)? {
            Some((b, _)) if b == bytes => Ok(()),
            _ => Err(RemoteError::Corrupt {
                url: self.remote.url.to_string(),
                key: key.to_string(),
                reason: "it exists with other content than this store's history: another writer wrote this generation".into(),
            }
            .into()),
        }
    }

    /// Ship every commit after `acked` as one segment. Returns the commit it ends at.
    fn ship(&self, acked: u64) -> StateResult<u64> {
        let got = self.store.with_commits_paused(|seq| {
            if seq <= acked {
                return Ok(None);
            }
            let Some(ops) = self.store.journal_range(acked, seq)? else {
                return Ok(Some((seq, None, Vec::new())));
            };
            let puts = || {
                ops.iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| (k.as_slice(), v.as_slice())))
            };
            let pinned = self.pin(referenced_blobs(puts()), &required_blobs(puts()))?;
            Ok::<_, StateError>(Some((seq, Some(ops), pinned)))
        })?;
        let Some((last, ops, pinned)) = got else {
            return Ok(acked);
        };
        let Some(ops) = ops else {
            // The journal does not reach back to the remote's end: start over from a snapshot.
            return self.snapshot();
        };
        self.upload(pinned)?;
        let bytes = encode_object(Kind::Segment, self.epoch, acked + 1, last, &ops);
        self.renew()?;
        let key = segment_key(self.epoch, acked + 1, last);
        if !self.remote.put_new(&key, bytes.clone())? {
            self.same_or_corrupt(&key, &bytes)?;
        }
        self.store.remote_acked(self.epoch, last)?;
        let mut n = self.segments_since_snapshot.lock().unwrap();
        *n += 1;
        if *n >= self.opts.snapshot_every {
            drop(n);
            return self.snapshot();
        }
        Ok(last)
    }

    fn run(&self) {
        let sync = self.store.sync().clone();
        let renew_every = self.opts.lease_ttl / 3;
        let mut next_renew = Instant::now() + renew_every;
        let mut backoff = Duration::from_secs(1);
        let mut failing_since: Option<Instant> = None;
        loop {
            let v = sync.view();
            if self.abort.load(Ordering::SeqCst)
                || (self.exit.load(Ordering::SeqCst) && v.acked >= v.latest)
            {
                return;
            }
            let wait = next_renew.saturating_duration_since(Instant::now());
            let want = sync.wait_work(wait);
            if sync.view().fenced.is_some() {
                return;
            }
            let result = if want.is_some() {
                self.ship(sync.view().acked).map(Some)
            } else {
                Ok(None)
            };
            match result {
                Ok(acked) => {
                    if let Some(a) = acked {
                        sync.set_acked(a);
                    }
                    next_renew = Instant::now() + renew_every;
                    if let Some(t) = failing_since.take() {
                        self.say(&format!(
                            "the remote answers again after {:.0} s; it holds commit {}",
                            t.elapsed().as_secs_f64(),
                            sync.view().acked
                        ));
                    }
                    backoff = Duration::from_secs(1);
                }
                Err(StateError::Remote(e)) if matches!(*e, RemoteError::Fenced { .. }) => {
                    if let RemoteError::Fenced { holder, .. } = *e {
                        if sync.view().fenced.is_none() {
                            sync.set_fenced(holder.clone());
                            (self.opts.on_fenced)(&holder);
                        }
                    }
                    return;
                }
                Err(e) if permanent(&e) => {
                    let msg = crate::error_chain(&e);
                    self.say(&format!(
                        "replication stopped: {msg}. The run goes on in the local store only"
                    ));
                    sync.set_fatal(msg);
                    return;
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    sync.set_error(msg.clone());
                    failing_since.get_or_insert_with(Instant::now);
                    self.say(&format!(
                        "{msg}; the run goes on locally and retries in {} s",
                        backoff.as_secs()
                    ));
                    // Sleep in short steps so that giving up is not held up by the backoff.
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.abort.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// Errors that retrying cannot fix: damage, another writer's objects in this generation.
fn permanent(e: &StateError) -> bool {
    match e {
        StateError::BlobMissing { .. } | StateError::BlobCorrupt { .. } => true,
        StateError::Remote(r) => matches!(
            **r,
            RemoteError::Corrupt { .. } | RemoteError::LocalBlobCorrupt { .. }
        ),
        _ => false,
    }
}

/// Blobs a restore cannot do without: step outputs and checkpoint files (an artifact record's
/// blob may be removed locally with its record still in a later commit).
fn required_blobs<'a>(records: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> BTreeSet<Digest> {
    referenced_blobs(records.filter(|(k, _)| k.first() == Some(&crate::keys::STEP)))
}
