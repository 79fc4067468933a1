//! The store: one sled tree of versioned records (layout in `keys.rs`) plus the blob directory.
//!
//! ```text
//! <store>/LOCK      pid of the process that holds the store
//! <store>/db/       sled database
//! <store>/blobs/    content-addressed files
//! <store>/tmp/      temporary files, removed on open
//! <store>/work/     worker processes' results per step key and build (the CLI's `processes`
//!                   executor; `tsr gc` removes those no step will read again)
//! ```

use crate::blobs::BlobStore;
use crate::clock::now_ms;
use crate::envelope::{decode, encode, Versioned};
use crate::error::{StateError, StateResult};
use crate::faults::{FaultInjector, FaultOp};
use crate::keys;
use crate::lock::StoreLock;
use crate::records::*;
use crate::Digest;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FORMAT: &[u8] = b"tsr-store-1";

/// Meta keys of a replicated store (local facts, never replicated).
pub(crate) const META_REMOTE: &str = "remote";
pub(crate) const META_REMOTE_SEQ: &str = "remote-seq";
pub(crate) const META_STORE_ID: &str = "store-id";
/// The device and inode of the store's folder when its identity was made.
pub(crate) const META_STORE_HOME: &str = "store-home";
pub(crate) const META_REMOTE_EPOCH: &str = "remote-epoch";
/// Set when a rolled-back database was accepted while replicated: it no longer continues the
/// remote's history.
pub(crate) const META_REMOTE_ROLLED_BACK: &str = "remote-rolled-back";

/// Where a replicated store stands with its remote (as last known locally).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteState {
    /// The remote's URL, without credentials.
    pub url: String,
    /// The generation whose history this store continues.
    pub epoch: u64,
    /// The remote holds every commit up to this one.
    pub seq: u64,
    /// A rolled-back database was accepted since: the store no longer continues the remote.
    pub rolled_back: bool,
}

/// How long `open` waits for a short-lived holder of the store (an inspection command) to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Run and node names: non-empty, at most 128 bytes, letters, digits and `._-/:` (no NUL, no
/// spaces), so that they can be keys and path components.
pub fn validate_name(name: &str) -> StateResult<()> {
    let bad = |reason| {
        Err(StateError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 128 {
        return bad("it is longer than 128 bytes");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/:".contains(c))
    {
        return bad("use only letters, digits and . _ - / :");
    }
    Ok(())
}

/// Run names, which become file names (report folders) and object keys: 1 to 100 characters,
/// letters, digits and `._-`, not starting with a dot (so never `..`, a hidden file or a path).
pub fn validate_run_name(name: &str) -> StateResult<()> {
    let ok = !name.is_empty()
        && name.chars().count() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadName {
            name: name.to_string(),
            reason:
                "a run name is 1 to 100 letters, digits, `.`, `_` or `-`, not starting with a dot",
        })
    }
}

/// sled 0.34 writes a snapshot to `snap.<lsn>.generating` and renames it when complete. A
/// process killed in between leaves the partial file, and the next open fails with "Read
/// corrupted data at file offset None" (sled issues #1527, #1533; reproduced here by SIGKILL
/// during open). The partial file is never needed: sled recovers from the previous snapshot and
/// its log. We hold the store lock, so no other process is writing one.
fn remove_partial_snapshots(db_path: &Path) -> StateResult<()> {
    let Ok(rd) = std::fs::read_dir(db_path) else {
        return Ok(());
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path()).map_err(|e| StateError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// One write of a commit: a key and its new value (`None` removes it).
pub(crate) type Op = (Vec<u8>, Option<Vec<u8>>);

/// A set of writes applied atomically (one sled batch) and flushed before `commit` returns.
#[derive(Default)]
pub struct Commit {
    ops: Vec<Op>,
}

impl Commit {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn run(&mut self, r: &RunRecord) -> &mut Self {
        self.put(keys::run(&r.name), encode(r))
    }
    pub fn node(&mut self, run: &str, node: &str, r: &NodeRecord) -> &mut Self {
        self.put(keys::node(run, node), encode(r))
    }
    pub fn step(&mut self, key: &Digest, r: &StepRecord) -> &mut Self {
        self.put(keys::step(key), encode(r))
    }
    pub fn artifact(&mut self, d: &Digest, r: &ArtifactRecord) -> &mut Self {
        self.put(keys::artifact(d), encode(r))
    }
    pub fn edge(&mut self, output: &Digest, input: &Digest, r: &EdgeRecord) -> &mut Self {
        self.put(keys::edge(output, input), encode(r))
    }
    /// Who computed the items `first..=who.last` of step `key` (or, at 0 for a step without
    /// items, who ran it elsewhere).
    pub fn worker(&mut self, key: &Digest, first: u64, who: &WorkerRecord) -> &mut Self {
        self.put(keys::worker(key, first), encode(who))
    }
    pub fn remove_step(&mut self, key: &Digest) -> &mut Self {
        self.ops.push((keys::step(key), None));
        self
    }
    pub fn remove_artifact(&mut self, d: &Digest) -> &mut Self {
        self.ops.push((keys::artifact(d), None));
        self
    }
    pub fn remove_node(&mut self, run: &str, node: &str) -> &mut Self {
        self.ops.push((keys::node(run, node), None));
        self
    }
    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) -> &mut Self {
        self.ops.push((k, Some(v)));
        self
    }
}

pub struct Store {
    root: PathBuf,
    db: sled::Db,
    blobs: BlobStore,
    faults: Option<Arc<dyn FaultInjector>>,
    /// Commit sequence number: in sled (`M seq`) and mirrored to `<store>/SEQ` after each flush,
    /// so a sled database that recovers to an earlier state than it acknowledged is detected.
    seq: std::sync::Mutex<u64>,
    /// Set when opened despite a rolled-back database (for `verify`).
    rolled_back: Option<(u64, u64)>,
    /// Whether commits are also written to the journal (`J` keys) for the remote copy: on while
    /// the store is replicated (`M remote` set), whether or not a replicator runs now.
    journal: std::sync::atomic::AtomicBool,
    sync: Arc<crate::sync::SyncState>,
    _lock: StoreLock,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

impl Store {
    /// Open (creating if needed) the store at `dir`. Fails with `InUse` if another process holds it.
    pub fn open(dir: &Path) -> StateResult<Store> {
        Self::open_with_faults(dir, None)
    }

    /// Open with a fault injector (tests only; see `faults.rs`).
    pub fn open_with_faults(
        dir: &Path,
        faults: Option<Arc<dyn FaultInjector>>,
    ) -> StateResult<Store> {
        let store = Self::open_inner(dir, faults, LOCK_WAIT)?;
        if let Some((db, acked)) = store.rolled_back {
            return Err(StateError::RolledBack {
                path: dir.join("db"),
                db,
                acked,
            });
        }
        Ok(store)
    }

    /// Open a store that must already exist (inspection commands never create one).
    pub fn open_existing(dir: &Path) -> StateResult<Store> {
        if !dir.join("db").is_dir() {
            return Err(StateError::NoStore(dir.to_path_buf()));
        }
        Self::open(dir)
    }

    /// Open even if the database lost acknowledged commits (`verify` reports it and `--repair`
    /// accepts the database as it is, so lost steps are recomputed).
    pub fn open_for_verify(dir: &Path) -> StateResult<Store> {
        if !dir.join("db").is_dir() {
            return Err(StateError::NoStore(dir.to_path_buf()));
        }
        Self::open_inner(dir, None, LOCK_WAIT)
    }

    /// The database's commit number and the higher one acknowledged before, if sled lost commits.
    pub fn rolled_back(&self) -> Option<(u64, u64)> {
        self.rolled_back
    }

    /// Accept the database as it is (after a rollback): the sidecar is reset to its commit number.
    pub fn accept_rollback(&mut self) -> StateResult<()> {
        let seq = *self.seq.lock().unwrap();
        // Commit numbers after this one are about to be reused for other commits: the remote
        // may hold the lost ones, so this store no longer continues the remote's generation.
        if self.get_raw(&keys::meta(META_REMOTE))?.is_some() {
            self.set_local_meta(META_REMOTE_ROLLED_BACK, b"1")?;
        }
        self.write_seq_sidecar(seq)?;
        self.rolled_back = None;
        Ok(())
    }

    /// Open an existing store without waiting for its lock (`status` falls back to the live
    /// snapshot at once when a run holds the store).
    pub fn open_existing_nowait(dir: &Path) -> StateResult<Store> {
        if !dir.join("db").is_dir() {
            return Err(StateError::NoStore(dir.to_path_buf()));
        }
        let store = Self::open_inner(dir, None, std::time::Duration::ZERO)?;
        if let Some((db, acked)) = store.rolled_back {
            return Err(StateError::RolledBack {
                path: dir.join("db"),
                db,
                acked,
            });
        }
        Ok(store)
    }

    fn open_inner(
        dir: &Path,
        faults: Option<Arc<dyn FaultInjector>>,
        lock_wait: std::time::Duration,
    ) -> StateResult<Store> {
        // Absolute, so that paths handed out (blob paths, scratch folders) stay valid from any
        // working directory and as symlink targets.
        let dir = &std::path::absolute(dir).map_err(|e| StateError::io(dir, e))?;
        std::fs::create_dir_all(dir).map_err(|e| StateError::io(dir, e))?;
        let lock = StoreLock::acquire(dir, lock_wait)?;
        let db_path = dir.join("db");
        remove_partial_snapshots(&db_path)?;
        // sled's page cache defaults to 1 GiB; records are small and read rarely, so a bounded
        // cache keeps memory flat however many items a run accumulates.
        let db = sled::Config::new()
            .path(&db_path)
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(|e| StateError::db(db_path.clone(), e))?;
        let blobs =
            BlobStore::open(dir.join("blobs"), dir.join("tmp"))?.with_faults(faults.clone());
        blobs.clean_tmp()?;
        let db_seq = db
            .get(keys::meta("seq"))
            .map_err(|e| StateError::db(db_path.clone(), e))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        let acked = std::fs::read(dir.join("SEQ"))
            .ok()
            .and_then(|b| {
                b.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
            })
            .unwrap_or(0);
        let store = Store {
            root: dir.to_path_buf(),
            db,
            blobs,
            faults,
            seq: std::sync::Mutex::new(db_seq),
            rolled_back: (acked > db_seq).then_some((db_seq, acked)),
            journal: std::sync::atomic::AtomicBool::new(false),
            sync: Arc::new(crate::sync::SyncState::default()),
            _lock: lock,
        };
        store.sync.committed(db_seq);
        let replicated = store.get_raw(&keys::meta(META_REMOTE))?.is_some();
        store
            .journal
            .store(replicated, std::sync::atomic::Ordering::SeqCst);
        match store.get_raw(&keys::meta("format"))? {
            None => {
                store
                    .db
                    .insert(keys::meta("format"), FORMAT)
                    .map_err(|e| store.db_err(e))?;
                store.flush()?;
            }
            Some(v) if v.as_slice() == FORMAT => {}
            Some(v) => {
                return Err(StateError::UnknownSchema {
                    what: "store format",
                    key: String::from_utf8_lossy(&v).into_owned(),
                    found: 0,
                    supported: 1,
                })
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    fn db_err(&self, e: sled::Error) -> StateError {
        StateError::db(self.root.join("db"), e)
    }

    /// Make every write so far durable.
    pub fn flush(&self) -> StateResult<()> {
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(())
    }

    fn get_raw(&self, key: &[u8]) -> StateResult<Option<Vec<u8>>> {
        Ok(self
            .db
            .get(key)
            .map_err(|e| self.db_err(e))?
            .map(|v| v.to_vec()))
    }

    fn get<T: Versioned>(&self, key: &[u8]) -> StateResult<Option<T>> {
        match self.db.get(key).map_err(|e| self.db_err(e))? {
            None => Ok(None),
            Some(v) => decode(key, &v).map(Some),
        }
    }

    fn scan<T: Versioned>(&self, prefix: &[u8]) -> StateResult<Vec<(Vec<u8>, T)>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(prefix) {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            out.push((k.to_vec(), decode(&k, &v)?));
        }
        Ok(out)
    }

    fn write_seq_sidecar(&self, seq: u64) -> StateResult<()> {
        use std::io::Write;
        let path = self.root.join("SEQ");
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .and_then(|mut f| f.write_all(&seq.to_be_bytes()))
            .map_err(|e| StateError::io(path, e))
    }

    /// Apply writes atomically with the next commit number, flush, then mirror the number to
    /// `SEQ`. Commits are serialized so the recorded number only grows. While the store is
    /// replicated, the same batch records the writes in the journal under that number.
    fn apply(&self, ops: Vec<Op>) -> StateResult<()> {
        self.fault(FaultOp::DbCommit)?;
        let mut seq = self.seq.lock().unwrap();
        let next = *seq + 1;
        let mut batch = sled::Batch::default();
        if self.journal.load(std::sync::atomic::Ordering::SeqCst) {
            batch.insert(keys::journal(next), crate::format::encode_ops(&ops));
        }
        for (k, v) in ops {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch.insert(keys::meta("seq"), &next.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.db_err(e))?;
        self.flush()?;
        *seq = next;
        // After the flush: the sidecar never runs ahead of what sled acknowledged.
        self.write_seq_sidecar(next)?;
        drop(seq);
        self.sync.committed(next);
        Ok(())
    }

    fn fault(&self, op: FaultOp) -> StateResult<()> {
        if let Some(f) = &self.faults {
            let path = self.root.join("db");
            f.before(op, &path).map_err(|e| StateError::io(path, e))?;
        }
        Ok(())
    }

    /// Apply a set of writes atomically and flush. Only after this returns are they durable.
    pub fn commit(&self, c: Commit) -> StateResult<()> {
        self.apply(c.ops)
    }

    // ---- replication --------------------------------------------------------------------------

    /// Replication progress shared with the engine and the replicator.
    pub fn sync(&self) -> &Arc<crate::sync::SyncState> {
        &self.sync
    }

    /// The engine reached a sync point (a step is done, a checkpoint is saved).
    pub fn mark(&self, point: crate::sync::SyncPoint, waiting: &dyn Fn(&str)) {
        self.sync.mark(point, waiting)
    }

    /// The last commit number.
    pub fn seq(&self) -> u64 {
        *self.seq.lock().unwrap()
    }

    /// The remote this store is replicated to (its URL as the user gave it, without
    /// credentials) and the last commit the remote is known to hold.
    pub fn remote(&self) -> StateResult<Option<RemoteState>> {
        let Some(url) = self.get_raw(&keys::meta(META_REMOTE))? else {
            return Ok(None);
        };
        let num = |name| -> StateResult<u64> {
            Ok(self
                .get_raw(&keys::meta(name))?
                .and_then(|b| b.as_slice().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0))
        };
        Ok(Some(RemoteState {
            url: String::from_utf8_lossy(&url).into_owned(),
            epoch: num(META_REMOTE_EPOCH)?,
            seq: num(META_REMOTE_SEQ)?,
            rolled_back: self
                .get_raw(&keys::meta(META_REMOTE_ROLLED_BACK))?
                .is_some(),
        }))
    }

    /// This store's identity (random): the remote lease names its holder by it, so the same
    /// store continuing after a crash takes its own lease back at once. It belongs to the
    /// folder (its device and inode): a copy of the folder is another store, which can only
    /// continue a remote whose history it holds whole.
    pub fn store_id(&self) -> StateResult<String> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.root).map_err(|e| StateError::io(&self.root, e))?;
        let home = format!("{}:{}", meta.dev(), meta.ino());
        let recorded_home = self.get_raw(&keys::meta(META_STORE_HOME))?;
        if let Some(id) = self.get_raw(&keys::meta(META_STORE_ID))? {
            match recorded_home {
                Some(h) if h == home.as_bytes() => {
                    return Ok(String::from_utf8_lossy(&id).into_owned())
                }
                None => {
                    self.set_local_meta(META_STORE_HOME, home.as_bytes())?;
                    return Ok(String::from_utf8_lossy(&id).into_owned());
                }
                Some(_) => {} // copied: a new identity below
            }
        }
        let mut seed = [0u8; 32];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            use std::io::Read;
            let _ = f.read_exact(&mut seed);
        }
        let mut h = blake3::Hasher::new();
        h.update(&seed);
        h.update(&now_ms().to_be_bytes());
        h.update(&std::process::id().to_be_bytes());
        h.update(self.root.as_os_str().as_encoded_bytes());
        let id = h.finalize().to_hex()[..16].to_string();
        self.set_local_meta(META_STORE_HOME, home.as_bytes())?;
        self.set_local_meta(META_STORE_ID, id.as_bytes())?;
        Ok(id)
    }

    /// Write a local meta value (not a commit: not numbered, never replicated), durably.
    pub(crate) fn set_local_meta(&self, name: &str, value: &[u8]) -> StateResult<()> {
        self.db
            .insert(keys::meta(name), value)
            .map_err(|e| self.db_err(e))?;
        self.flush()
    }

    /// Run `f` with commits held back: what it reads is the state at one commit number.
    pub(crate) fn with_commits_paused<R>(&self, f: impl FnOnce(u64) -> R) -> R {
        let seq = self.seq.lock().unwrap();
        f(*seq)
    }

    /// Turn journaling on and mark the store as replicated to `url` (durably). Call with
    /// commits paused, so that no commit falls between the snapshot and the journal.
    pub(crate) fn start_journal(&self, url: &str) -> StateResult<()> {
        self.db
            .insert(keys::meta(META_REMOTE), url.as_bytes())
            .map_err(|e| self.db_err(e))?;
        self.flush()?;
        self.journal
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The remote holds every commit up to `seq` in generation `epoch`: record it and drop the
    /// journal up to it.
    pub(crate) fn remote_acked(&self, epoch: u64, seq: u64) -> StateResult<()> {
        let mut batch = sled::Batch::default();
        for k in self.db.range(keys::journal(0)..=keys::journal(seq)).keys() {
            batch.remove(k.map_err(|e| self.db_err(e))?);
        }
        batch.insert(keys::meta(META_REMOTE_SEQ), &seq.to_be_bytes());
        batch.insert(keys::meta(META_REMOTE_EPOCH), &epoch.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.db_err(e))?;
        self.flush()
    }

    /// The journal's commits after `after` up to `upto`, collapsed to the last write of each
    /// key. `None` when the journal does not hold all of them (the remote then needs a
    /// snapshot).
    pub(crate) fn journal_range(
        &self,
        after: u64,
        upto: u64,
    ) -> StateResult<Option<crate::format::Ops>> {
        let mut out = std::collections::BTreeMap::new();
        let mut expect = after + 1;
        for kv in self
            .db
            .range(keys::journal(after + 1)..=keys::journal(upto))
        {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let n = u64::from_be_bytes(k[1..9].try_into().unwrap());
            if n != expect {
                return Ok(None);
            }
            expect += 1;
            for (k, v) in crate::format::decode_ops(&v).map_err(|reason| StateError::Corrupt {
                what: "journal entry",
                key: keys::display(&k),
                reason,
            })? {
                out.insert(k, v);
            }
        }
        Ok((expect == upto + 1).then_some(out))
    }

    /// Every replicated record (all but meta and journal), in key order.
    pub(crate) fn dump_records(&self) -> StateResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for kv in self.db.iter() {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            if keys::replicated(&k) {
                out.push((k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Fill an empty store with records restored from a remote, as commit `seq`, replicated to
    /// `url` from there on.
    pub(crate) fn import_replica(
        &self,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        epoch: u64,
        seq: u64,
        url: &str,
    ) -> StateResult<()> {
        let mut cur = self.seq.lock().unwrap();
        if *cur != 0
            || self
                .db
                .iter()
                .keys()
                .any(|k| k.map(|k| keys::replicated(&k)).unwrap_or(true))
        {
            return Err(StateError::NotEmpty(self.root.clone()));
        }
        let mut batch = sled::Batch::default();
        for (k, v) in records {
            batch.insert(k, v);
        }
        batch.insert(keys::meta("seq"), &seq.to_be_bytes());
        batch.insert(keys::meta(META_REMOTE), url.as_bytes());
        batch.insert(keys::meta(META_REMOTE_SEQ), &seq.to_be_bytes());
        batch.insert(keys::meta(META_REMOTE_EPOCH), &epoch.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.db_err(e))?;
        self.flush()?;
        *cur = seq;
        self.write_seq_sidecar(seq)?;
        drop(cur);
        self.journal
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.sync.committed(seq);
        Ok(())
    }

    // ---- runs -------------------------------------------------------------------------------

    pub fn get_run(&self, name: &str) -> StateResult<Option<RunRecord>> {
        self.get(&keys::run(name))
    }

    pub fn run(&self, name: &str) -> StateResult<RunRecord> {
        self.get_run(name)?
            .ok_or_else(|| StateError::NoSuchRun(name.to_string()))
    }

    pub fn put_run(&self, r: &RunRecord) -> StateResult<()> {
        let mut c = Commit::new();
        c.run(r);
        self.commit(c)
    }

    pub fn runs(&self) -> StateResult<Vec<RunRecord>> {
        Ok(self
            .scan::<RunRecord>(&[keys::RUN])?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    // ---- nodes ------------------------------------------------------------------------------

    pub fn get_node(&self, run: &str, node: &str) -> StateResult<Option<NodeRecord>> {
        self.get(&keys::node(run, node))
    }

    /// All node bindings of a run, sorted by node name.
    pub fn nodes(&self, run: &str) -> StateResult<Vec<(String, NodeRecord)>> {
        let prefix = keys::node_prefix(run);
        Ok(self
            .scan::<NodeRecord>(&prefix)?
            .into_iter()
            .map(|(k, r)| (String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), r))
            .collect())
    }

    // ---- steps ------------------------------------------------------------------------------

    pub fn get_step(&self, key: &Digest) -> StateResult<Option<StepRecord>> {
        self.get(&keys::step(key))
    }

    pub fn steps(&self) -> StateResult<Vec<(Digest, StepRecord)>> {
        Ok(self
            .scan::<StepRecord>(&[keys::STEP])?
            .into_iter()
            .map(|(k, r)| (keys::digest_at(&k, 1).expect("step key"), r))
            .collect())
    }

    // ---- items ------------------------------------------------------------------------------

    pub fn get_item(&self, step: &Digest, index: u64) -> StateResult<Option<Vec<u8>>> {
        self.get_raw(&keys::item(step, index))
    }

    /// Commit finished items of a step together with its updated record, atomically, then flush.
    /// An item that is already committed is refused: items are produced exactly once.
    pub fn commit_items(
        &self,
        step: &Digest,
        items: &[(u64, Vec<u8>)],
        record: &StepRecord,
    ) -> StateResult<()> {
        self.commit_items_by(step, items, record, None)
    }

    /// [`Self::commit_items`], with who computed them (kept beside the items, in the same
    /// commit) when `who` is given and there are items.
    pub fn commit_items_by(
        &self,
        step: &Digest,
        items: &[(u64, Vec<u8>)],
        record: &StepRecord,
        who: Option<&WorkerRecord>,
    ) -> StateResult<()> {
        let mut ops = Vec::with_capacity(items.len() + 2);
        if let (Some(who), Some((first, _)), Some((last, _))) = (who, items.first(), items.last()) {
            let who = WorkerRecord {
                last: *last,
                ..who.clone()
            };
            ops.push((keys::worker(step, *first), Some(encode(&who))));
        }
        for (i, bytes) in items {
            let k = keys::item(step, *i);
            if self.db.contains_key(&k).map_err(|e| self.db_err(e))? {
                return Err(StateError::DuplicateItem {
                    step: step.short(),
                    index: *i,
                });
            }
            ops.push((k, Some(bytes.clone())));
        }
        ops.push((keys::step(step), Some(encode(record))));
        self.apply(ops)
    }

    /// All committed items of a step in index order.
    pub fn items(&self, step: &Digest) -> StateResult<Vec<(u64, Vec<u8>)>> {
        let prefix = keys::item_prefix(step);
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let idx = k
                .get(prefix.len()..prefix.len() + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StateError::Corrupt {
                    what: "item",
                    key: keys::display(&k),
                    reason: "key is not step key + u64".into(),
                })?;
            out.push((idx, v.to_vec()));
        }
        Ok(out)
    }

    /// Indices of committed items of a step (without loading payloads into a Vec of bytes).
    pub fn item_indices(&self, step: &Digest) -> StateResult<Vec<u64>> {
        let prefix = keys::item_prefix(step);
        let mut out = Vec::new();
        for k in self.db.scan_prefix(&prefix).keys() {
            let k = k.map_err(|e| self.db_err(e))?;
            if let Some(b) = k.get(prefix.len()..prefix.len() + 8) {
                out.push(u64::from_be_bytes(b.try_into().unwrap()));
            }
        }
        Ok(out)
    }

    /// Remove all items of a step and who computed them (used by `verify --repair` to
    /// recompute a step from scratch, and by gc).
    pub fn clear_items(&self, step: &Digest) -> StateResult<()> {
        let mut ops = Vec::new();
        for prefix in [keys::item_prefix(step), keys::worker_prefix(step)] {
            for k in self.db.scan_prefix(prefix).keys() {
                ops.push((k.map_err(|e| self.db_err(e))?.to_vec(), None));
            }
        }
        self.apply(ops)
    }

    /// Who computed item `index` of `step`: the record of the batch that holds it (none for
    /// items committed before tsr kept them).
    pub fn worker_of(&self, step: &Digest, index: u64) -> StateResult<Option<WorkerRecord>> {
        let prefix = keys::worker_prefix(step);
        let Some(kv) = self
            .db
            .range(prefix.clone()..=keys::worker(step, index))
            .next_back()
        else {
            return Ok(None);
        };
        let (k, v) = kv.map_err(|e| self.db_err(e))?;
        let who: WorkerRecord = decode(&k, &v)?;
        Ok((who.last >= index).then_some(who))
    }

    /// Who computed each batch of `step`, by the batch's first item index.
    pub fn workers(&self, step: &Digest) -> StateResult<Vec<(u64, WorkerRecord)>> {
        let prefix = keys::worker_prefix(step);
        Ok(self
            .scan::<WorkerRecord>(&prefix)?
            .into_iter()
            .filter_map(|(k, r)| {
                let first = u64::from_be_bytes(k.get(33..41)?.try_into().ok()?);
                Some((first, r))
            })
            .collect())
    }

    // ---- artifacts and lineage ----------------------------------------------------------------

    pub fn get_artifact(&self, d: &Digest) -> StateResult<Option<ArtifactRecord>> {
        self.get(&keys::artifact(d))
    }

    pub fn artifacts(&self) -> StateResult<Vec<(Digest, ArtifactRecord)>> {
        Ok(self
            .scan::<ArtifactRecord>(&[keys::ARTIFACT])?
            .into_iter()
            .map(|(k, r)| (keys::digest_at(&k, 1).expect("artifact key"), r))
            .collect())
    }

    /// Lineage edges into `output`: the inputs it was made from.
    pub fn edges_into(&self, output: &Digest) -> StateResult<Vec<(Digest, EdgeRecord)>> {
        Ok(self
            .scan::<EdgeRecord>(&keys::edge_prefix(output))?
            .into_iter()
            .map(|(k, r)| (keys::digest_at(&k, 33).expect("edge key"), r))
            .collect())
    }

    /// Every raw record, for `verify`.
    pub(crate) fn raw_iter(&self) -> impl Iterator<Item = StateResult<(Vec<u8>, Vec<u8>)>> + '_ {
        self.db.iter().map(move |kv| {
            kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| self.db_err(e))
        })
    }

    /// Step records that decode (damaged ones are reported by `verify`, skipped here).
    pub(crate) fn steps_lenient(&self) -> Vec<(Digest, StepRecord)> {
        let mut out = Vec::new();
        for (k, v) in self.db.scan_prefix([keys::STEP]).flatten() {
            if let (Some(d), Ok(r)) = (keys::digest_at(&k, 1), decode::<StepRecord>(&k, &v)) {
                out.push((d, r));
            }
        }
        out
    }

    /// Write a raw value under a key, for tests that plant damaged records.
    #[doc(hidden)]
    pub fn plant_raw_step(&self, key: &Digest, bytes: &[u8]) -> StateResult<()> {
        self.db
            .insert(keys::step(key), bytes)
            .map_err(|e| self.db_err(e))?;
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn step_record() -> StepRecord {
        StepRecord {
            kind: "toy".into(),
            version: 1,
            config: "{}".into(),
            inputs: BTreeMap::new(),
            status: StepStatus::Pending,
            attempts: 0,
            items_done: 0,
            items_total: Some(3),
            busy_ms: 0,
            checkpoint: None,
            first_run: "r".into(),
            first_node: "n".into(),
        }
    }

    #[test]
    fn second_open_names_the_pid() {
        let t = tempfile::tempdir().unwrap();
        let _a = Store::open(t.path()).unwrap();
        let err = Store::open(t.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("in use by pid"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    }

    #[test]
    fn items_are_committed_once_in_order() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let key = Digest::of(b"step");
        let rec = step_record();
        s.commit_items(&key, &[(2, b"c".to_vec()), (0, b"a".to_vec())], &rec)
            .unwrap();
        s.commit_items(&key, &[(1, b"b".to_vec())], &rec).unwrap();
        let err = s
            .commit_items(&key, &[(1, b"x".to_vec())], &rec)
            .unwrap_err();
        assert!(matches!(err, StateError::DuplicateItem { index: 1, .. }));
        let items = s.items(&key).unwrap();
        assert_eq!(
            items,
            vec![(0, b"a".to_vec()), (1, b"b".to_vec()), (2, b"c".to_vec())]
        );
        // big-endian keys: 256 sorts after 255
        s.commit_items(&key, &[(256, vec![]), (255, vec![])], &rec)
            .unwrap();
        assert_eq!(s.item_indices(&key).unwrap(), vec![0, 1, 2, 255, 256]);
    }

    #[test]
    fn unknown_schema_version_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let key = Digest::of(b"k");
        let mut bytes = encode(&step_record());
        bytes[0] = 0;
        bytes[1] = 99;
        s.plant_raw_step(&key, &bytes).unwrap();
        let err = s.get_step(&key).unwrap_err();
        assert!(matches!(
            err,
            StateError::UnknownSchema {
                found: 99,
                supported: 1,
                ..
            }
        ));
        assert!(err.to_string().contains("schema version 99"), "{err}");
        s.plant_raw_step(&key, &[0, 1, 0xff]).unwrap();
        assert!(matches!(
            s.get_step(&key).unwrap_err(),
            StateError::Corrupt { .. }
        ));
    }

    #[test]
    fn records_survive_reopen() {
        let t = tempfile::tempdir().unwrap();
        let key = Digest::of(b"k");
        {
            let s = Store::open(t.path()).unwrap();
            let mut c = Commit::new();
            c.step(&key, &step_record());
            c.node(
                "run1",
                "gen",
                &NodeRecord {
                    step_key: key,
                    reused: false,
                    iteration: Some(1),
                },
            );
            s.commit(c).unwrap();
        }
        let s = Store::open(t.path()).unwrap();
        assert_eq!(s.get_step(&key).unwrap().unwrap(), step_record());
        assert_eq!(s.nodes("run1").unwrap().len(), 1);
        assert!(
            s.nodes("run").unwrap().is_empty(),
            "prefix must not leak across runs"
        );
    }

    #[test]
    fn a_partial_sled_snapshot_left_by_a_kill_does_not_block_open() {
        // Regression: SIGKILL while sled writes a snapshot left `snap.*.generating`, and the
        // next open failed with "Read corrupted data".
        let t = tempfile::tempdir().unwrap();
        let key = Digest::of(b"k");
        {
            let s = Store::open(t.path()).unwrap();
            let mut c = Commit::new();
            c.step(&key, &step_record());
            s.commit(c).unwrap();
        }
        std::fs::write(
            t.path().join("db").join("snap.0000000000006D2D.generating"),
            b"",
        )
        .unwrap();
        let s = Store::open(t.path()).unwrap();
        assert_eq!(s.get_step(&key).unwrap().unwrap(), step_record());
    }

    #[test]
    fn a_replicated_store_journals_each_commit_and_ranges_collapse_or_say_gap() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let key = Digest::of(b"k");
        // Not replicated: no journal.
        s.commit_items(&key, &[(0, b"a".to_vec())], &step_record())
            .unwrap();
        assert_eq!(s.journal_range(0, 1).unwrap(), None);
        s.with_commits_paused(|_| s.start_journal("file:///r"))
            .unwrap();
        s.commit_items(&key, &[(1, b"b".to_vec())], &step_record())
            .unwrap();
        let mut c = Commit::new();
        c.remove_step(&key);
        s.commit(c).unwrap();
        let ops = s.journal_range(1, 3).unwrap().unwrap();
        // The last write of each key: item 1 put, the step removed.
        assert_eq!(ops.get(&keys::item(&key, 1)), Some(&Some(b"b".to_vec())));
        assert_eq!(ops.get(&keys::step(&key)), Some(&None));
        assert!(
            !ops.keys().any(|k| !keys::replicated(k)),
            "meta never travels"
        );
        assert_eq!(
            s.journal_range(0, 3).unwrap(),
            None,
            "commit 1 was not journaled"
        );
        s.remote_acked(1, 2).unwrap();
        assert_eq!(
            s.journal_range(1, 3).unwrap(),
            None,
            "acknowledged commits are dropped"
        );
        assert!(s.journal_range(2, 3).unwrap().is_some());
        assert_eq!(
            s.remote().unwrap().unwrap(),
            RemoteState {
                url: "file:///r".into(),
                epoch: 1,
                seq: 2,
                rolled_back: false,
            }
        );
        drop(s);
        // Journaling survives a reopen; the dump holds records only.
        let s = Store::open(t.path()).unwrap();
        s.commit_items(&key, &[(2, b"c".to_vec())], &step_record())
            .unwrap();
        assert!(s.journal_range(2, 4).unwrap().is_some());
        assert!(s
            .dump_records()
            .unwrap()
            .iter()
            .all(|(k, _)| keys::replicated(k)));
        // A restore fills only an empty store.
        let err = s.import_replica(vec![], 1, 9, "file:///r").unwrap_err();
        assert!(matches!(err, StateError::NotEmpty(_)), "{err}");
        let t2 = tempfile::tempdir().unwrap();
        let r = Store::open(t2.path()).unwrap();
        r.import_replica(s.dump_records().unwrap(), 1, 4, "file:///r")
            .unwrap();
        assert_eq!(r.seq(), 4);
        assert_eq!(r.items(&key).unwrap(), s.items(&key).unwrap());
        r.commit_items(&key, &[(3, b"d".to_vec())], &step_record())
            .unwrap();
        assert!(
            r.journal_range(4, 5).unwrap().is_some(),
            "a restored store journals"
        );
    }

    #[test]
    fn a_copied_store_folder_is_another_store() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let id = {
            let s = Store::open(&a).unwrap();
            let id = s.store_id().unwrap();
            assert_eq!(s.store_id().unwrap(), id, "stable");
            id
        };
        assert_eq!(
            Store::open(&a).unwrap().store_id().unwrap(),
            id,
            "after a reopen"
        );
        let b = t.path().join("b");
        std::fs::rename(&a, &b).unwrap();
        assert_eq!(
            Store::open(&b).unwrap().store_id().unwrap(),
            id,
            "a moved folder"
        );
        let c = t.path().join("c");
        let status = std::process::Command::new("cp")
            .args(["-a", b.to_str().unwrap(), c.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
        assert_ne!(Store::open(&c).unwrap().store_id().unwrap(), id, "a copy");
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("run-1.a/b:c").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("a\0b").is_err());
        assert!(validate_run_name("quickstart-2.b_c").is_ok());
        for bad in ["../../evil", "a/b", ".hidden", "..", "a:b", "", "a b", "é"] {
            assert!(validate_run_name(bad).is_err(), "{bad}");
        }
        assert!(validate_run_name(&"a".repeat(100)).is_ok());
        assert!(validate_run_name(&"a".repeat(101)).is_err());
    }
}
