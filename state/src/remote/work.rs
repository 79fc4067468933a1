//! What the cluster executor exchanges through a remote, beside the store's own objects:
//!
//! ```text
//! <prefix>/blobs/<hex digest>          a step's inputs, offered by the driver before its shards
//! <prefix>/work/<step key>/<build>/…   the shard job, the workers' results and errors
//! ```
//!
//! Workers read input blobs (verified against their digest, installed whole by rename) and
//! write under `work/` only. `work/` objects are never part of the store's history: a restore,
//! a remote verify and the remote's gc leave them alone, and the driver or `tsr gc` removes a
//! done step's folder.

use super::{blob_key, Remote, RemoteError, RemoteResult};
use crate::{BlobStore, Digest};
use object_store::ObjectStoreExt;

/// The folder of `work/` objects.
pub const WORK: &str = "work";

/// `rel` under `work/`, refused when it could leave that folder.
fn work_key(rel: &str) -> RemoteResult<String> {
    if rel.is_empty()
        || rel.starts_with('/')
        || rel
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(RemoteError::WorkName {
            name: rel.to_string(),
        });
    }
    Ok(format!("{WORK}/{rel}"))
}

/// Hashes what passes through to the file it writes.
struct HashingFile {
    file: std::fs::File,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl std::io::Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Remote {
    /// Whether the remote holds blob `d`.
    pub fn has_blob(&self, d: &Digest) -> RemoteResult<bool> {
        let rel = blob_key(&d.to_hex());
        match self.rt.block_on(self.store.head(&self.path(&rel))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("looking up", &rel, e)),
        }
    }

    /// Uploads the local blob `d` (at `file`) unless the remote holds it; `Ok(true)` when it
    /// was uploaded. A damaged local file is refused, never uploaded.
    pub fn offer_blob(&self, d: &Digest, file: &std::path::Path) -> RemoteResult<bool> {
        if self.has_blob(d)? {
            return Ok(false);
        }
        self.put_blob(d, file)?;
        Ok(true)
    }

    /// Downloads blob `d` into `blobs`: streamed to a temporary file, hashed on the way,
    /// synced, and renamed into place only when it is `d`. Returns its size, or `None` when the
    /// remote does not hold it.
    pub fn fetch_blob(&self, d: &Digest, blobs: &BlobStore) -> RemoteResult<Option<u64>> {
        self.fetch_as(blob_key(&d.to_hex()), d, blobs)
    }

    /// Downloads the object `rel`, whose content is `d`, into `blobs` (as [`Self::fetch_blob`]).
    fn fetch_as(&self, rel: String, d: &Digest, blobs: &BlobStore) -> RemoteResult<Option<u64>> {
        let tmp = blobs.tmp_path("fetch");
        let local = |e: std::io::Error, what: &str, path: &std::path::Path| {
            self.err(
                "storing",
                &rel,
                object_store::Error::Generic {
                    store: "local",
                    source: format!("{what} {}: {e}", path.display()).into(),
                },
            )
        };
        let file = std::fs::File::create(&tmp).map_err(|e| local(e, "creating", &tmp))?;
        let mut out = HashingFile {
            file,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        };
        let found = self.get_into(&rel, &mut out);
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if !found {
            let _ = std::fs::remove_file(&tmp);
            return Ok(None);
        }
        if Digest::from(out.hasher.finalize()) != *d {
            let _ = std::fs::remove_file(&tmp);
            return Err(RemoteError::Corrupt {
                url: self.url.to_string(),
                key: rel,
                reason: "its content does not hash to its name".into(),
            });
        }
        out.file.sync_all().map_err(|e| local(e, "syncing", &tmp))?;
        let dest = blobs.path(d);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| local(e, "creating", parent))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| local(e, "installing", &dest))?;
        Ok(Some(out.bytes))
    }

    /// Uploads `file`, whose content is `d`, as `work/<rel>` (streamed, hashed on the way: a
    /// file that is not `d` is refused, never uploaded).
    pub fn work_put_file(&self, rel: &str, d: &Digest, file: &std::path::Path) -> RemoteResult<()> {
        self.put_file_as(&work_key(rel)?, d, file)
    }

    /// Downloads `work/<rel>`, whose content is `d`, into `blobs` as blob `d` (verified, installed
    /// by rename). Returns its size, or `None` when there is no such object.
    pub fn work_fetch(
        &self,
        rel: &str,
        d: &Digest,
        blobs: &BlobStore,
    ) -> RemoteResult<Option<u64>> {
        self.fetch_as(work_key(rel)?, d, blobs)
    }

    /// Writes (or replaces) `work/<rel>`.
    pub fn work_put(&self, rel: &str, bytes: Vec<u8>) -> RemoteResult<()> {
        let key = work_key(rel)?;
        self.rt
            .block_on(
                self.store
                    .put(&self.path(&key), object_store::PutPayload::from(bytes)),
            )
            .map(|_| ())
            .map_err(|e| self.err("writing", &key, e))
    }

    /// Writes `work/<rel>` only if no object has that name; `Ok(false)` when one has.
    pub fn work_put_new(&self, rel: &str, bytes: Vec<u8>) -> RemoteResult<bool> {
        self.put_new(&work_key(rel)?, bytes)
    }

    /// `work/<rel>`, or `None` when there is no such object.
    pub fn work_get(&self, rel: &str) -> RemoteResult<Option<Vec<u8>>> {
        Ok(self.get(&work_key(rel)?)?.map(|(b, _)| b))
    }

    /// The objects under `work/<rel>/`: their names relative to that folder, and sizes.
    pub fn work_list(&self, rel: &str) -> RemoteResult<Vec<(String, u64)>> {
        let key = work_key(rel)?;
        let strip = format!("{key}/");
        Ok(self
            .list(&key)?
            .into_iter()
            .filter_map(|(n, size)| Some((n.strip_prefix(&strip)?.to_string(), size)))
            .collect())
    }

    /// The folders directly under `work/` (one per step key), with the bytes each holds.
    pub fn work_folders(&self) -> RemoteResult<Vec<(String, u64)>> {
        let mut out: std::collections::BTreeMap<String, u64> = Default::default();
        for (n, size) in self.list(WORK)? {
            let rest = n.strip_prefix(&format!("{WORK}/")).unwrap_or(&n);
            if let Some((top, _)) = rest.split_once('/') {
                *out.entry(top.to_string()).or_default() += size;
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Deletes `work/<rel>` (nothing to do when it is gone).
    pub fn work_delete(&self, rel: &str) -> RemoteResult<()> {
        self.delete(&work_key(rel)?)
    }

    /// Deletes every object under `work/<rel>/`; returns how many there were.
    pub fn work_delete_all(&self, rel: &str) -> RemoteResult<usize> {
        let key = work_key(rel)?;
        let names = self.list(&key)?;
        for (n, _) in &names {
            self.delete(n)?;
        }
        Ok(names.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_names_stay_in_the_work_folder() {
        assert_eq!(work_key("ab/cd/job.json").unwrap(), "work/ab/cd/job.json");
        for bad in ["", "/x", "a/../b", "a//b", "./a", ".."] {
            assert!(work_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn blobs_and_work_objects_go_through_a_folder_remote() {
        let dir = tempfile::tempdir().unwrap();
        let url = super::super::RemoteUrl::parse(&format!(
            "file://{}",
            dir.path().join("remote").display()
        ))
        .unwrap();
        let remote = Remote::open_for_writing(&url).unwrap();
        let here = BlobStore::open(dir.path().join("a/blobs"), dir.path().join("a/tmp")).unwrap();
        let d = here.put_bytes(b"weights").unwrap();
        assert!(!remote.has_blob(&d).unwrap());
        assert!(remote.offer_blob(&d, &here.path(&d)).unwrap());
        assert!(
            !remote.offer_blob(&d, &here.path(&d)).unwrap(),
            "already there"
        );
        let node = BlobStore::open(dir.path().join("n/blobs"), dir.path().join("n/tmp")).unwrap();
        assert_eq!(remote.fetch_blob(&d, &node).unwrap(), Some(7));
        assert_eq!(node.read(&d).unwrap(), b"weights");
        assert_eq!(remote.fetch_blob(&Digest::of(b"no"), &node).unwrap(), None);
        // A damaged remote object is refused and never installed.
        let other = Digest::of(b"other");
        std::fs::write(
            dir.path().join("remote").join(blob_key(&other.to_hex())),
            b"not other",
        )
        .unwrap();
        assert!(remote.fetch_blob(&other, &node).is_err());
        assert!(!node.exists(&other));

        assert!(remote
            .work_put_new("k/b/results/0.t", b"one".to_vec())
            .unwrap());
        assert!(!remote
            .work_put_new("k/b/results/0.t", b"two".to_vec())
            .unwrap());
        remote.work_put("k/b/job.json", b"{}".to_vec()).unwrap();
        remote.work_put("k/b/job.json", b"{ }".to_vec()).unwrap();
        assert_eq!(remote.work_get("k/b/job.json").unwrap().unwrap(), b"{ }");
        assert_eq!(remote.work_get("k/b/none").unwrap(), None);
        assert_eq!(
            remote.work_list("k/b/results").unwrap(),
            vec![("0.t".to_string(), 3)]
        );
        assert_eq!(remote.work_list("k/x").unwrap(), vec![]);
        assert_eq!(remote.work_folders().unwrap(), vec![("k".to_string(), 6)]);
        assert_eq!(remote.work_delete_all("k").unwrap(), 2);
        assert_eq!(remote.work_list("k").unwrap(), vec![]);
        assert!(remote.has_blob(&d).unwrap(), "blobs are not work objects");
    }
}
