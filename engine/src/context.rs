//! What a running step sees besides its inputs: its key and seeds, a scratch folder, the device,
//! the stop flag, a progress reporter and its item journal (committed units of work and
//! checkpoints). The journal is a trait so that `replay` can run a step against memory.

use crate::error::StepError;
use crate::output::OutputData;
use crate::preempt::StopFlag;
use crate::shard::{BatchRunner, ShardJob};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tsr_state::{
    now_ms, BlobStore, BlobWriter, CheckpointRecord, Digest, StepRecord, Store, WorkerRecord,
};

/// A step's restored checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub seq: u64,
    pub cursor: Vec<u8>,
    /// Verified paths of the checkpoint's files, by name.
    pub files: BTreeMap<String, PathBuf>,
    pub digests: BTreeMap<String, Digest>,
}

/// Durable per-item progress and checkpoints of one step.
pub trait ItemJournal: Send + Sync {
    fn get(&self, index: u64) -> Result<Option<Vec<u8>>, StepError>;
    fn indices(&self) -> Result<Vec<u64>, StepError>;
    /// Commit items atomically; durable when this returns. A committed index is refused.
    fn commit(&self, items: &[(u64, Vec<u8>)]) -> Result<(), StepError>;
    /// [`Self::commit`] items another process computed, keeping who did (where the journal
    /// keeps such records).
    fn commit_by(&self, items: &[(u64, Vec<u8>)], _who: &WorkerRecord) -> Result<(), StepError> {
        self.commit(items)
    }
    fn all(&self) -> Result<Vec<(u64, Vec<u8>)>, StepError>;
    fn set_total(&self, total: u64) -> Result<(), StepError>;
    /// Record a checkpoint (files become blobs); the previous checkpoint's blobs are removed
    /// once this one is committed.
    fn save_checkpoint(
        &self,
        files: BTreeMap<String, OutputData>,
        cursor: Vec<u8>,
    ) -> Result<(), StepError>;
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StepError>;
    /// A writer into the blob store for large checkpoint files ([`BlobStore::large_writer`]):
    /// it hashes while writing and `finish` fsyncs and installs the blob, so a large checkpoint
    /// file is written once and never read back. Hand the digest to [`Self::save_checkpoint`]
    /// as [`OutputData::Blob`].
    fn blob_writer(&self) -> Result<BlobWriter, StepError>;
}

/// Progress of one step: an indicatif bar when stderr is a terminal, otherwise silent.
#[derive(Clone)]
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// One line the step publishes about where it stands (shown by `tsr status` while it runs).
    note: Note,
    /// The bar's position when the unit being computed began (see [`Self::within_unit`]).
    unit_start: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A step's published line, shared with the driver's live snapshot.
pub(crate) type Note = std::sync::Arc<std::sync::Mutex<Option<String>>>;

impl Progress {
    pub fn hidden() -> Self {
        Progress {
            bar: None,
            note: Note::default(),
            unit_start: Default::default(),
        }
    }
    pub(crate) fn new(bar: indicatif::ProgressBar) -> Self {
        Progress {
            bar: Some(bar),
            note: Note::default(),
            unit_start: Default::default(),
        }
    }
    /// A line on where the step stands, beyond its item count, for `tsr status` from another
    /// terminal while the step runs (such as what a paid API has cost so far).
    pub fn set_note(&self, line: impl Into<String>) {
        *self.note.lock().unwrap_or_else(|p| p.into_inner()) = Some(line.into());
    }
    pub(crate) fn note(&self) -> Note {
        self.note.clone()
    }
    pub fn set_length(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.set_length(n);
        }
    }
    pub fn set_position(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.set_position(n);
        }
    }
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
    /// Inside a unit of [`StepContext::for_each_batch`]: `n` of its items are done but not yet
    /// committed. The bar moves before the unit's commit (which can hold many items); the
    /// commit then sets it to the unit's start plus its items, so nothing counts twice.
    pub fn within_unit(&self, n: u64) {
        if let Some(b) = &self.bar {
            let start = self.unit_start.load(std::sync::atomic::Ordering::Relaxed);
            b.set_position(start + n);
        }
    }
    /// A unit begins at the bar's current position.
    fn begin_unit(&self) -> u64 {
        let start = self.bar.as_ref().map_or(0, |b| b.position());
        self.unit_start
            .store(start, std::sync::atomic::Ordering::Relaxed);
        start
    }
    pub fn set_message(&self, m: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_message(m.into());
        }
    }
    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub struct StepContext {
    pub(crate) node: String,
    pub(crate) key: Digest,
    pub(crate) scratch: PathBuf,
    pub(crate) device: String,
    pub(crate) stop: StopFlag,
    pub(crate) journal: Arc<dyn ItemJournal>,
    pub(crate) progress: Progress,
    /// The driver of a sharded step: where the batches go instead of being computed here.
    pub(crate) delegate: Option<(Arc<dyn BatchRunner>, ShardJob)>,
    /// A worker: the only batches to compute here.
    pub(crate) only: Option<BTreeSet<u64>>,
}

impl StepContext {
    pub fn new(
        node: &str,
        key: Digest,
        scratch: PathBuf,
        device: &str,
        stop: StopFlag,
        journal: Arc<dyn ItemJournal>,
        progress: Progress,
    ) -> Self {
        StepContext {
            node: node.to_string(),
            key,
            scratch,
            device: device.to_string(),
            stop,
            journal,
            progress,
            delegate: None,
            only: None,
        }
    }

    /// Batches go to `runner` (described to it by `job`; its item count and batch size are
    /// filled in by [`Self::for_each_batch`]) instead of being computed here.
    pub fn with_runner(mut self, runner: Arc<dyn BatchRunner>, job: ShardJob) -> Self {
        self.delegate = Some((runner, job));
        self
    }

    /// Computes only these batches (a worker's shard).
    pub fn with_only(mut self, batches: BTreeSet<u64>) -> Self {
        self.only = Some(batches);
        self
    }

    /// Whether batches are computed elsewhere: a step then loads no model to compute them.
    pub fn delegates(&self) -> bool {
        self.delegate.is_some()
    }

    pub fn node(&self) -> &str {
        &self.node
    }
    pub fn key(&self) -> Digest {
        self.key
    }
    /// The step's seed, derived from its key (never from time).
    pub fn seed(&self) -> u64 {
        self.derive_seed("step", 0)
    }
    /// A seed for unit `index` of this step under a label (e.g. `("sample", i)`).
    pub fn derive_seed(&self, label: &str, index: u64) -> u64 {
        let mut h = blake3::Hasher::new();
        h.update(&self.key.0);
        h.update(label.as_bytes());
        h.update(&index.to_be_bytes());
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap())
    }
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }
    pub fn device(&self) -> &str {
        &self.device
    }
    /// Whether a stop was requested. Steps call this at every unit boundary.
    ///
    /// Test hooks (each does nothing unless its variable is set):
    /// - with `TSR_TEST_PAUSE_AT="NODE#N"` (or `"NODE#N,M,..."`, and several nodes separated by
    ///   `;`), the process stops itself
    ///   (SIGSTOP) at the N-th (M-th, ...) call made by step NODE in this process, counting from 1,
    ///   so that a test can signal or kill it inside that step whatever the machine's speed: it
    ///   sees the process stopped, then sends SIGKILL, or SIGCONT and a signal a moment later (a
    ///   second stop at N+1 bounds that moment to the unit after N);
    /// - with `TSR_TEST_UNIT_LOG=FILE`, each call appends the step's node name to FILE, so that a
    ///   test knows how many unit boundaries each step of a run has.
    pub fn should_stop(&self) -> bool {
        test_hooks(&self.node);
        self.stop.is_set()
    }
    pub fn stop_flag(&self) -> &StopFlag {
        &self.stop
    }
    pub fn items(&self) -> &dyn ItemJournal {
        self.journal.as_ref()
    }
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Produce `total` items in fixed batches (`[b*size, (b+1)*size)`), skipping batches already
    /// committed and committing each batch atomically. Checks the stop flag at every batch
    /// boundary. `work` gets the indices of one batch and returns one payload per index.
    /// Batches never depend on where a previous attempt stopped, so a resumed step computes the
    /// same units as an uninterrupted one.
    pub fn for_each_batch(
        &self,
        total: u64,
        batch: usize,
        mut work: impl FnMut(&[u64]) -> Result<Vec<Vec<u8>>, StepError>,
    ) -> Result<(), StepError> {
        let batch = batch.max(1) as u64;
        self.journal.set_total(total)?;
        let done: BTreeSet<u64> = self.journal.indices()?.into_iter().collect();
        self.progress.set_length(total);
        self.progress.set_position(done.len() as u64);
        if let Some((runner, job)) = &self.delegate {
            return self.delegate_batches(runner.as_ref(), job, total, batch, &done);
        }
        let mut start = 0;
        while start < total {
            let end = (start + batch).min(total);
            let todo: Vec<u64> = (start..end).filter(|i| !done.contains(i)).collect();
            let mine = self
                .only
                .as_ref()
                .is_none_or(|only| only.contains(&(start / batch)));
            if !todo.is_empty() && mine {
                if self.should_stop() {
                    return Err(StepError::Interrupted);
                }
                let start = self.progress.begin_unit();
                let out = work(&todo)?;
                if out.len() != todo.len() {
                    return Err(StepError::Other(format!(
                        "step `{}` produced {} items for a batch of {}",
                        self.node,
                        out.len(),
                        todo.len()
                    )));
                }
                let items: Vec<(u64, Vec<u8>)> = todo.iter().copied().zip(out).collect();
                self.journal.commit(&items)?;
                self.progress.set_position(start + items.len() as u64);
            }
            start = end;
        }
        Ok(())
    }
}

impl StepContext {
    /// Hands the batches with missing items to `runner` and commits what it delivers: each
    /// batch once, whole, with exactly its indices; a batch delivered again is ignored.
    fn delegate_batches(
        &self,
        runner: &dyn BatchRunner,
        job: &ShardJob,
        total: u64,
        batch: u64,
        done: &BTreeSet<u64>,
    ) -> Result<(), StepError> {
        let job = ShardJob {
            total,
            batch,
            ..job.clone()
        };
        let missing: Vec<u64> = (0..job.batches())
            .filter(|b| job.batch_items(*b).any(|i| !done.contains(&i)))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut delivered: BTreeSet<u64> = BTreeSet::new();
        runner.run(&job, &missing, &self.stop, &mut |b, items, who| {
            if !missing.contains(&b) || !delivered.insert(b) {
                return Ok(());
            }
            let idx: Vec<u64> = job.batch_items(b).collect();
            if items.len() != idx.len() {
                return Err(StepError::Other(format!(
                    "batch {b} came back with {} items, not {}",
                    items.len(),
                    idx.len()
                )));
            }
            let new: Vec<(u64, Vec<u8>)> = idx
                .into_iter()
                .zip(items)
                .filter(|(i, _)| !done.contains(i))
                .collect();
            self.journal.commit_by(&new, &who)?;
            self.progress.inc(new.len() as u64);
            Ok(())
        })?;
        if let Some(b) = missing.iter().find(|b| !delivered.contains(b)) {
            return Err(StepError::Other(format!(
                "the workers finished without batch {b}"
            )));
        }
        Ok(())
    }
}

/// `TSR_TEST_PAUSE_AT="NODE#N[,M...][;NODE2#K...]"`: stop the whole process at step NODE's N-th
/// (M-th, ...) unit boundary in this process (and NODE2's K-th, ...), and
/// `TSR_TEST_UNIT_LOG=FILE`: log every unit boundary (see [`StepContext::should_stop`]). Unset
/// or unreadable: nothing happens.
fn test_hooks(node: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    /// Each target node, its boundaries, and the calls it has made.
    type Targets = Vec<(String, Vec<u64>, AtomicU64)>;
    static TARGETS: std::sync::OnceLock<Targets> = std::sync::OnceLock::new();
    static LOG: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let targets = TARGETS.get_or_init(|| {
        let Ok(v) = std::env::var("TSR_TEST_PAUSE_AT") else {
            return vec![];
        };
        v.split(';')
            .filter_map(|t| {
                let (n, at) = t.trim().rsplit_once('#')?;
                let at: Vec<u64> = at
                    .split(',')
                    .map(|k| k.parse().ok())
                    .collect::<Option<_>>()?;
                Some((n.to_string(), at, AtomicU64::new(0)))
            })
            .collect()
    });
    if let Some(log) = LOG.get_or_init(|| std::env::var_os("TSR_TEST_UNIT_LOG").map(Into::into)) {
        use std::io::Write;
        // One append of one line: whole lines even when steps run side by side.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = f.write_all(format!("{node}\n").as_bytes());
        }
    }
    for (target, at, calls) in targets {
        if target == node && at.contains(&(calls.fetch_add(1, Ordering::SeqCst) + 1)) {
            // SAFETY: raise only sends a signal to this process; SIGSTOP cannot be caught.
            unsafe {
                libc::raise(libc::SIGSTOP);
            }
        }
    }
}

/// The journal of a step in the store.
pub struct StoreJournal {
    store: Arc<Store>,
    key: Digest,
    record: Mutex<StepRecord>,
    /// Who computes the batches committed here (the driver), when kept.
    local: Option<WorkerRecord>,
}

impl StoreJournal {
    pub fn new(store: Arc<Store>, key: Digest, record: StepRecord) -> Self {
        StoreJournal {
            store,
            key,
            record: Mutex::new(record),
            local: None,
        }
    }
    /// Keep `who` with each batch this process computes and commits.
    pub fn with_worker(mut self, who: WorkerRecord) -> Self {
        self.local = Some(who);
        self
    }
    fn commit_as(
        &self,
        items: &[(u64, Vec<u8>)],
        who: Option<&WorkerRecord>,
    ) -> Result<(), StepError> {
        let who = who.map(|w| WorkerRecord {
            finished_ms: if w.finished_ms == 0 {
                now_ms()
            } else {
                w.finished_ms
            },
            ..w.clone()
        });
        let mut rec = self.record.lock().unwrap();
        let mut next = rec.clone();
        next.items_done += items.len() as u64;
        self.store
            .commit_items_by(&self.key, items, &next, who.as_ref())?;
        *rec = next;
        Ok(())
    }
    pub fn record(&self) -> StepRecord {
        self.record.lock().unwrap().clone()
    }
}

fn blob_from(blobs: &BlobStore, data: OutputData) -> Result<Digest, StepError> {
    Ok(match data {
        OutputData::Bytes(b) => blobs.put_bytes(&b)?,
        OutputData::File(p) => blobs.put_file(&p)?,
        OutputData::Blob(d) => {
            blobs.require(&d)?;
            d
        }
    })
}

impl ItemJournal for StoreJournal {
    fn get(&self, index: u64) -> Result<Option<Vec<u8>>, StepError> {
        Ok(self.store.get_item(&self.key, index)?)
    }
    fn indices(&self) -> Result<Vec<u64>, StepError> {
        Ok(self.store.item_indices(&self.key)?)
    }
    fn commit(&self, items: &[(u64, Vec<u8>)]) -> Result<(), StepError> {
        self.commit_as(items, self.local.as_ref())
    }
    fn commit_by(&self, items: &[(u64, Vec<u8>)], who: &WorkerRecord) -> Result<(), StepError> {
        self.commit_as(items, Some(who))
    }
    fn all(&self) -> Result<Vec<(u64, Vec<u8>)>, StepError> {
        Ok(self.store.items(&self.key)?)
    }
    fn set_total(&self, total: u64) -> Result<(), StepError> {
        let mut rec = self.record.lock().unwrap();
        if rec.items_total == Some(total) {
            return Ok(());
        }
        let mut next = rec.clone();
        next.items_total = Some(total);
        self.store.commit_items(&self.key, &[], &next)?;
        *rec = next;
        Ok(())
    }
    fn save_checkpoint(
        &self,
        files: BTreeMap<String, OutputData>,
        cursor: Vec<u8>,
    ) -> Result<(), StepError> {
        let blobs = self.store.blobs();
        let mut digests = BTreeMap::new();
        for (name, data) in files {
            digests.insert(name, blob_from(blobs, data)?);
        }
        let mut rec = self.record.lock().unwrap();
        let mut next = rec.clone();
        let old = next.checkpoint.take();
        next.checkpoint = Some(CheckpointRecord {
            seq: old.as_ref().map(|c| c.seq + 1).unwrap_or(0),
            blobs: digests.clone(),
            cursor,
        });
        self.store.commit_items(&self.key, &[], &next)?;
        *rec = next;
        self.store
            .mark(tsr_state::SyncPoint::Checkpoint, &remote_waiting);
        // Only now, with the new checkpoint durable, drop the old one's files (unless shared).
        if let Some(old) = old {
            for d in old.blobs.values() {
                if !digests.values().any(|n| n == d) && self.store.get_artifact(d)?.is_none() {
                    blobs.remove(d)?;
                }
            }
        }
        Ok(())
    }
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StepError> {
        let rec = self.record.lock().unwrap();
        let Some(cp) = &rec.checkpoint else {
            return Ok(None);
        };
        let mut files = BTreeMap::new();
        for (name, d) in &cp.blobs {
            files.insert(name.clone(), self.store.blobs().verified_path(d)?);
        }
        Ok(Some(Checkpoint {
            seq: cp.seq,
            cursor: cp.cursor.clone(),
            files,
            digests: cp.blobs.clone(),
        }))
    }
    fn blob_writer(&self) -> Result<BlobWriter, StepError> {
        Ok(self.store.blobs().large_writer()?)
    }
}

/// An in-memory journal (for replay): same contract, nothing persisted. Checkpoint files are
/// written to a scratch blob store.
pub struct MemoryJournal {
    items: Mutex<BTreeMap<u64, Vec<u8>>>,
    checkpoint: Mutex<Option<Checkpoint>>,
    blobs: BlobStore,
}

impl MemoryJournal {
    pub fn new(blobs: BlobStore) -> Self {
        MemoryJournal {
            items: Mutex::new(BTreeMap::new()),
            checkpoint: Mutex::new(None),
            blobs,
        }
    }
    /// A journal holding `items` as committed.
    pub fn with_items(self, items: Vec<(u64, Vec<u8>)>) -> Self {
        *self.items.lock().unwrap() = items.into_iter().collect();
        self
    }
}

impl ItemJournal for MemoryJournal {
    fn get(&self, index: u64) -> Result<Option<Vec<u8>>, StepError> {
        Ok(self.items.lock().unwrap().get(&index).cloned())
    }
    fn indices(&self) -> Result<Vec<u64>, StepError> {
        Ok(self.items.lock().unwrap().keys().copied().collect())
    }
    fn commit(&self, items: &[(u64, Vec<u8>)]) -> Result<(), StepError> {
        let mut m = self.items.lock().unwrap();
        for (i, b) in items {
            if m.insert(*i, b.clone()).is_some() {
                return Err(StepError::Other(format!("item {i} committed twice")));
            }
        }
        Ok(())
    }
    fn all(&self) -> Result<Vec<(u64, Vec<u8>)>, StepError> {
        Ok(self
            .items
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }
    fn set_total(&self, _total: u64) -> Result<(), StepError> {
        Ok(())
    }
    fn save_checkpoint(
        &self,
        files: BTreeMap<String, OutputData>,
        cursor: Vec<u8>,
    ) -> Result<(), StepError> {
        let mut digests = BTreeMap::new();
        let mut paths = BTreeMap::new();
        for (name, data) in files {
            let d = blob_from(&self.blobs, data)?;
            paths.insert(name.clone(), self.blobs.path(&d));
            digests.insert(name, d);
        }
        let mut cp = self.checkpoint.lock().unwrap();
        let seq = cp.as_ref().map(|c| c.seq + 1).unwrap_or(0);
        *cp = Some(Checkpoint {
            seq,
            cursor,
            files: paths,
            digests,
        });
        Ok(())
    }
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StepError> {
        Ok(self.checkpoint.lock().unwrap().clone())
    }
    fn blob_writer(&self) -> Result<BlobWriter, StepError> {
        Ok(self.blobs.large_writer()?)
    }
}

pub(crate) fn new_step_record(
    kind: &str,
    version: u32,
    config: &serde_json::Value,
    inputs: &BTreeMap<String, Digest>,
    run: &str,
    node: &str,
) -> StepRecord {
    let _ = now_ms;
    StepRecord {
        kind: kind.to_string(),
        version,
        config: serde_json::to_string(config).expect("config JSON"),
        inputs: inputs.clone(),
        status: tsr_state::StepStatus::Pending,
        attempts: 0,
        items_done: 0,
        items_total: None,
        busy_ms: 0,
        checkpoint: None,
        first_run: run.to_string(),
        first_node: node.to_string(),
    }
}

/// Said when a sync point waits for a remote that fell too far behind.
pub(crate) fn remote_waiting(msg: &str) {
    eprintln!("tsr: remote: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions of a (hidden) bar: where each unit's `within_unit` calls put it, then where
    /// its commit did, for 10 items in units of 4 on a journal that already holds `done`.
    fn positions(done: &[u64]) -> Vec<u64> {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("b"), dir.path().join("t")).unwrap();
        let journal = MemoryJournal::new(blobs)
            .with_items(done.iter().map(|&i| (i, b"x".to_vec())).collect());
        let bar = indicatif::ProgressBar::hidden();
        let ctx = StepContext::new(
            "n",
            Digest::of(b"k"),
            dir.path().to_path_buf(),
            "cpu",
            StopFlag::new(),
            Arc::new(journal),
            Progress::new(bar.clone()),
        );
        let seen = Mutex::new(Vec::new());
        ctx.for_each_batch(10, 4, |idx| {
            let p = ctx.progress();
            for n in 1..=idx.len() as u64 {
                p.within_unit(n);
                seen.lock().unwrap().push(bar.position());
            }
            Ok(idx.iter().map(|_| b"y".to_vec()).collect())
        })
        .unwrap();
        let mut seen = seen.into_inner().unwrap();
        seen.push(bar.position());
        seen
    }

    #[test]
    fn the_bar_moves_inside_a_unit_and_each_item_counts_once() {
        // Units 0-3, 4-7, 8-9: each item moves the bar as it is done; commits add nothing more.
        let mut want: Vec<u64> = (1..=10).collect();
        want.push(10);
        assert_eq!(positions(&[]), want);
        // Resumed with items 0-3 and 5 committed: the bar starts at 5, unit 4-7 has 3 to do.
        assert_eq!(positions(&[0, 1, 2, 3, 5]), vec![6, 7, 8, 9, 10, 10]);
    }
}
