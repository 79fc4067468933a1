//! A node's cache of the inputs workers read from the remote (`[executor] node_cache`): a blob
//! folder on the node's own disk, shared by the workers of the node, so that a node reads a
//! model from the remote once.
//!
//! ```text
//! <cache>/blobs/<hex[..2]>/<hex[2..]>   verified blobs, installed whole by rename
//! <cache>/locks/<hex>                   one lock file per blob: held shared while in use
//! <cache>/locks/<hex>.fetch             one per blob: held exclusive while downloading it
//! <cache>/tmp/                          downloads under way
//! ```
//!
//! A worker holds a shared lock on each blob it uses for as long as it runs. Fetching a missing
//! blob takes that blob's fetch lock, exclusively, so the workers of a node download it once;
//! it is a lock of its own, because a worker that holds a blob in use (for its whole run, and a
//! stopped or suspended one for longer) must never keep another from fetching it. Beyond the
//! size limit, the least recently used blobs that no worker holds are removed (a blob is used
//! when a worker takes it: its time is set then).

use crate::error::StepError;
use fs2::FileExt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tsr_state::remote::Remote;
use tsr_state::{BlobStore, Digest};

/// A node's input cache, and the locks this worker holds on it.
pub struct NodeCache {
    dir: PathBuf,
    max_bytes: u64,
    blobs: BlobStore,
    held: Mutex<Vec<File>>,
}

/// What [`NodeCache::take`] did, for the worker's log.
#[derive(Debug, Default, PartialEq)]
pub struct Taken {
    /// Blobs already in the cache, and their bytes.
    pub hits: usize,
    pub hit_bytes: u64,
    /// Blobs this worker downloaded, and their bytes.
    pub fetched: usize,
    pub fetched_bytes: u64,
    /// Blobs removed to stay under the limit, and their bytes.
    pub evicted: usize,
    pub evicted_bytes: u64,
}

fn io(what: String, e: std::io::Error) -> StepError {
    StepError::io(what, e)
}

impl NodeCache {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<NodeCache, StepError> {
        for sub in ["locks", "tmp"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d)
                .map_err(|e| io(format!("creating the node cache {}", d.display()), e))?;
        }
        let blobs = BlobStore::open(dir.join("blobs"), dir.join("tmp"))?;
        Ok(NodeCache {
            dir: dir.to_path_buf(),
            max_bytes,
            blobs,
            held: Mutex::new(Vec::new()),
        })
    }

    /// The cache's blobs (what a worker reads its inputs from once [`Self::take`] returned).
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    fn lock_file(&self, d: &Digest) -> Result<File, StepError> {
        self.open_lock(&self.dir.join("locks").join(d.to_hex()))
    }

    /// The lock a worker holds exclusively while it downloads `d`.
    fn fetch_lock_file(&self, d: &Digest) -> Result<File, StepError> {
        self.open_lock(&self.dir.join("locks").join(format!("{}.fetch", d.to_hex())))
    }

    fn open_lock(&self, p: &Path) -> Result<File, StepError> {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(p)
            .map_err(|e| io(format!("opening the node cache's lock {}", p.display()), e))
    }

    /// Makes every blob of `digests` present, downloading the missing ones from `remote`, and
    /// holds them (a shared lock each) until this cache is dropped; then keeps the cache under
    /// its limit.
    pub fn take(&self, remote: &Remote, digests: &[Digest]) -> Result<Taken, StepError> {
        let mut t = Taken::default();
        let digests: Vec<Digest> = digests
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let digests = &digests[..];
        for d in digests {
            // In use from now on: no worker of the node removes it while this one runs.
            let lock = self.lock_file(d)?;
            lock.lock_shared()
                .map_err(|e| io(format!("locking {} in the node cache", d.short()), e))?;
            let path = self.blobs.path(d);
            if !path.is_file() {
                // Missing: download it under its fetch lock (another worker of the node may be
                // doing so; it then finds it present). Blobs are installed whole by rename.
                let fetch = self.fetch_lock_file(d)?;
                fetch.lock_exclusive().map_err(|e| {
                    io(
                        format!("locking {} for download in the node cache", d.short()),
                        e,
                    )
                })?;
                if !path.is_file() {
                    match crate::exchange::patiently(&format!("downloading input {}", d.short()), || {
                        remote.fetch_blob(d, &self.blobs)
                    })
                    .map_err(|e| StepError::State(e.into()))?
                    {
                        Some(n) => {
                            t.fetched += 1;
                            t.fetched_bytes += n;
                        }
                        None => {
                            return Err(StepError::Other(format!(
                                "input blob {} is not in the remote {}: the driver offers a step's inputs before its shards, so the remote was changed under the run (a gc?); run the step again",
                                d.short(),
                                remote.url()
                            )))
                        }
                    }
                }
                fetch.unlock().map_err(|e| {
                    io(
                        format!("unlocking {} for download in the node cache", d.short()),
                        e,
                    )
                })?;
            }
            // Used now (the owner may set the time through a read-only handle).
            if let Ok(f) = File::open(&path) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            self.held.lock().unwrap().push(lock);
        }
        t.hits = digests.len() - t.fetched;
        t.hit_bytes = digests
            .iter()
            .map(|d| std::fs::metadata(self.blobs.path(d)).map_or(0, |m| m.len()))
            .sum::<u64>()
            .saturating_sub(t.fetched_bytes);
        let (n, bytes) = self.evict(digests)?;
        t.evicted = n;
        t.evicted_bytes = bytes;
        Ok(t)
    }

    /// Removes the least recently used blobs that no worker holds, not in `keep`, until the
    /// cache is under its limit.
    fn evict(&self, keep: &[Digest]) -> Result<(usize, u64), StepError> {
        let (present, _) = self.blobs.list()?;
        let mut all: Vec<(std::time::SystemTime, u64, Digest)> = present
            .into_iter()
            .filter_map(|d| {
                let m = std::fs::metadata(self.blobs.path(&d)).ok()?;
                Some((m.modified().ok()?, m.len(), d))
            })
            .collect();
        let mut total: u64 = all.iter().map(|(_, n, _)| n).sum();
        all.sort();
        let (mut removed, mut bytes) = (0, 0);
        for (_, n, d) in all {
            if total <= self.max_bytes {
                break;
            }
            if keep.contains(&d) {
                continue;
            }
            let lock = self.lock_file(&d)?;
            if lock.try_lock_exclusive().is_err() {
                continue; // a worker of this node reads it
            }
            if std::fs::remove_file(self.blobs.path(&d)).is_ok() {
                total -= n;
                removed += 1;
                bytes += n;
            }
            let _ = lock.unlock();
        }
        Ok((removed, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsr_state::remote::RemoteUrl;

    fn remote_with(dir: &Path, contents: &[&[u8]]) -> (Remote, Vec<Digest>) {
        let url = RemoteUrl::parse(&format!("file://{}", dir.join("remote").display())).unwrap();
        let remote = Remote::open_for_writing(&url).unwrap();
        let here = BlobStore::open(dir.join("store/blobs"), dir.join("store/tmp")).unwrap();
        let ds = contents
            .iter()
            .map(|c| {
                let d = here.put_bytes(c).unwrap();
                remote.offer_blob(&d, &here.path(&d)).unwrap();
                d
            })
            .collect();
        (remote, ds)
    }

    #[test]
    fn a_node_reads_each_input_once_and_keeps_under_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (remote, ds) = remote_with(dir.path(), &[&[1u8; 100], &[2u8; 100], &[3u8; 100]]);
        let cache_dir = dir.path().join("cache");
        // Two workers of one node at once: the blob is downloaded by one of them.
        let taken: Vec<Taken> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let c = NodeCache::open(&cache_dir, 1000).unwrap();
                        c.take(&remote, &[ds[0], ds[0]]).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            taken.iter().map(|t| t.fetched).sum::<usize>(),
            1,
            "{taken:?}"
        );
        assert_eq!(taken.iter().map(|t| t.hits).sum::<usize>(), 1, "{taken:?}");

        // A limit of two blobs: taking a third removes the least recently used one that no
        // worker holds.
        let holder = NodeCache::open(&cache_dir, 250).unwrap();
        let t = holder.take(&remote, &[ds[1]]).unwrap();
        assert_eq!((t.fetched, t.evicted), (1, 0));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let other = NodeCache::open(&cache_dir, 250).unwrap();
        let t = other.take(&remote, &[ds[2]]).unwrap();
        assert_eq!(
            (t.fetched, t.evicted, t.evicted_bytes),
            (1, 1, 100),
            "{t:?}"
        );
        assert!(!other.blobs().exists(&ds[0]), "the unheld, oldest one went");
        assert!(other.blobs().exists(&ds[1]), "held by `holder`");
        drop(holder);
        // Now ds[1] is free to go, and ds[2] is held by `other`.
        let third = NodeCache::open(&cache_dir, 150).unwrap();
        let t = third.take(&remote, &[ds[0]]).unwrap();
        assert_eq!((t.fetched, t.evicted), (1, 1), "{t:?}");
        assert!(!third.blobs().exists(&ds[1]) && third.blobs().exists(&ds[2]));
        assert_eq!(third.blobs().read(&ds[0]).unwrap(), vec![1u8; 100]);

        // A worker that must fetch a blob another worker holds in use (here: removed under
        // it, the state a worker that found it missing just before the other installed it
        // sees) fetches it at once: it does not wait for the holder, which may run for long or
        // be stopped.
        let user = NodeCache::open(&cache_dir, 10_000).unwrap();
        user.take(&remote, &[ds[0]]).unwrap();
        std::fs::remove_file(user.blobs().path(&ds[0])).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let url = format!("file://{}", dir.path().join("remote").display());
        let (cache2, d0) = (cache_dir.clone(), ds[0]);
        std::thread::spawn(move || {
            let remote = Remote::open_for_writing(&RemoteUrl::parse(&url).unwrap()).unwrap();
            let c = NodeCache::open(&cache2, 10_000).unwrap();
            let _ = tx.send(c.take(&remote, &[d0]).map(|t| t.fetched));
        });
        // A guard against a hang only, far beyond any machine's speed.
        let fetched = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the fetch waited for the worker that holds the blob");
        assert_eq!(fetched.unwrap(), 1);
        assert_eq!(user.blobs().read(&ds[0]).unwrap(), vec![1u8; 100]);
        drop(user);

        // An input the remote does not hold is a clear error.
        let e = third.take(&remote, &[Digest::of(b"absent")]).unwrap_err();
        assert!(e.to_string().contains("is not in the remote"), "{e}");
    }
}
