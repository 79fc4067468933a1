//! The remote copy of a store, in object storage (S3 and S3-compatible servers, GCS, Azure, a
//! local folder) through the `object_store` crate. sled stays the local journal; the remote
//! holds, per generation (one per writer that took the remote), a snapshot and the ordered
//! segments of commits after it, plus the blobs records refer to.
//!
//! ```text
//! <prefix>/lease.json                                   the one writer (the only object rewritten)
//! <prefix>/blobs/<hex digest>                           content-addressed, as in the local store
//! <prefix>/gens/<epoch>/snapshots/<seq>                 every record as of commit seq
//! <prefix>/gens/<epoch>/segments/<first>-<last>         commits first..=last
//! ```
//! Numbers are zero-padded so that names sort in numeric order. Invariants (also in
//! ARCHITECTURE.md): a blob is uploaded before any segment that refers to it; segments and
//! snapshots are written once (`If-None-Match: *`) and never rewritten; a restore reads the
//! newest generation that has a snapshot and applies its segments in order up to the first gap,
//! so the remote always holds a consistent prefix of the local history.
//!
//! Credentials and endpoints come from the environment as `object_store` reads them
//! (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! ...). A URL with credentials in it is refused; only the URL without them is ever stored.

mod lease;
mod replicate;
mod restore;
pub mod work;

pub use lease::{Holder, LeaseDoc};
pub use replicate::StartReport;
pub use replicate::{ReplicaOptions, Replicator, StopReport};
pub use restore::{restore, verify_remote, RemoteGcReport, RemoteVerifyReport, RestoreReport};

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::error::{Redacted, RemoteError, RemoteResult};

/// A parsed remote URL: what the user gave, checked, without credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteUrl {
    url: url::Url,
}

impl RemoteUrl {
    pub fn parse(s: &str) -> RemoteResult<RemoteUrl> {
        let bad = |reason: &str| RemoteError::BadUrl {
            url: redact(s),
            reason: reason.to_string(),
        };
        let url = url::Url::parse(s).map_err(|e| bad(&format!("{e}; use s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///absolute/folder")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("credentials do not belong in the URL: give them in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3)"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a remote URL has no query or fragment: give settings in the environment (AWS_ENDPOINT, AWS_REGION, ...)"));
        }
        match url.scheme() {
            "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => {
                if url.host_str().unwrap_or("").is_empty() {
                    return Err(bad("name the bucket: s3://bucket/prefix"));
                }
            }
            "file" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(bad(
                        "a file URL names an absolute folder: file:///path/to/folder",
                    ));
                }
            }
            other => {
                return Err(bad(&format!(
                    "scheme `{other}` is not supported; use s3://, gs://, az:// or file://"
                )))
            }
        }
        Ok(RemoteUrl { url })
    }

    pub fn as_str(&self) -> &str {
        self.url.as_str().trim_end_matches('/')
    }

    fn prefix(&self) -> &str {
        self.url.path().trim_matches('/')
    }
}

impl std::fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What of a URL may be shown when it does not parse: the scheme and host, never a user part.
fn redact(s: &str) -> String {
    match s.find("://") {
        Some(i) => {
            let rest = &s[i + 3..];
            let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
            let rest = rest.split(['?', '#']).next().unwrap_or(rest);
            format!("{}://{}", &s[..i], rest)
        }
        None => s.chars().take(64).collect(),
    }
}

/// A connection to a remote: the object store client and its own small runtime (the rest of
/// tsr is synchronous).
pub struct Remote {
    url: RemoteUrl,
    store: Arc<dyn ObjectStore>,
    root: ObjPath,
    /// For `file://` remotes: the folder (its lease is swapped under a lock file, as the local
    /// backend has no conditional update).
    local_dir: Option<PathBuf>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url.as_str())
            .finish()
    }
}

/// An object's (ETag, version), for conditional replaces.
pub(crate) type ObjectVersion = (Option<String>, Option<String>);

/// Objects under a prefix: (name relative to the remote's root, size).
pub(crate) type Listing = Vec<(String, u64)>;

impl Remote {
    /// Open a remote to read it (restore, verify): a `file://` folder that does not exist is
    /// an empty remote, and is not created.
    pub fn open(url: &RemoteUrl) -> RemoteResult<Remote> {
        Self::open_with(url, false)
    }

    /// Open a remote to write to it: a `file://` folder is created if missing.
    pub fn open_for_writing(url: &RemoteUrl) -> RemoteResult<Remote> {
        Self::open_with(url, true)
    }

    fn open_with(url: &RemoteUrl, create: bool) -> RemoteResult<Remote> {
        let backend = |source: object_store::Error| RemoteError::Connect {
            url: url.to_string(),
            source: Redacted::of(&source),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| RemoteError::BadUrl {
                url: url.to_string(),
                reason: format!("cannot start the I/O runtime: {e}"),
            })?;
        // A few quick retries inside the client; longer outages are the replicator's (it says so
        // and backs off), so an unreachable remote is reported within seconds.
        let retry = object_store::RetryConfig {
            backoff: Default::default(),
            max_retries: 3,
            retry_timeout: std::time::Duration::from_secs(5),
        };
        let (store, root, local_dir): (Arc<dyn ObjectStore>, ObjPath, Option<PathBuf>) =
            match url.url.scheme() {
                "file" => {
                    let dir = url.url.to_file_path().map_err(|_| RemoteError::BadUrl {
                        url: url.to_string(),
                        reason: "not an absolute folder".into(),
                    })?;
                    if create {
                        std::fs::create_dir_all(&dir).map_err(|e| RemoteError::BadUrl {
                            url: url.to_string(),
                            reason: format!("cannot create the folder: {e}"),
                        })?;
                    } else if !dir.is_dir() {
                        return Err(RemoteError::Empty {
                            url: url.to_string(),
                        });
                    }
                    let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                        .map_err(backend)?;
                    (Arc::new(fs), ObjPath::default(), Some(dir))
                }
                "s3" | "s3a" => {
                    let s = object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url.url.as_str())
                        .with_retry(retry.clone())
                        .build()
                        .map_err(backend)?;
                    (Arc::new(s), ObjPath::from(url.prefix()), None)
                }
                "gs" => {
                    let s = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(url.url.as_str())
                        .with_retry(retry.clone())
                        .build()
                        .map_err(backend)?;
                    (Arc::new(s), ObjPath::from(url.prefix()), None)
                }
                _ => {
                    let s = object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(url.url.as_str())
                        .with_retry(retry.clone())
                        .build()
                        .map_err(backend)?;
                    (Arc::new(s), ObjPath::from(url.prefix()), None)
                }
            };
        Ok(Remote {
            url: url.clone(),
            store,
            root,
            local_dir,
            rt,
        })
    }

    pub fn url(&self) -> &RemoteUrl {
        &self.url
    }

    fn path(&self, rel: &str) -> ObjPath {
        let mut p = self.root.clone();
        for part in rel.split('/') {
            p = p.join(part);
        }
        p
    }

    fn err(&self, op: &'static str, rel: &str, source: object_store::Error) -> RemoteError {
        RemoteError::Backend {
            url: self.url.to_string(),
            op,
            key: rel.to_string(),
            source: Redacted::of(&source),
        }
    }

    /// Write an object that must not exist yet. `Ok(false)` when it already exists.
    pub(crate) fn put_new(&self, rel: &str, bytes: Vec<u8>) -> RemoteResult<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let r = self.rt.block_on(self.store.put_opts(
            &self.path(rel),
            PutPayload::from(bytes),
            opts,
        ));
        match r {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.err("writing", rel, e)),
        }
    }

    /// Upload a local blob (hashed as it is read: a damaged local file is never uploaded under
    /// its name), in parts of 16 MiB above 32 MiB, never holding a large one whole in memory.
    pub(crate) fn put_blob(&self, digest: &crate::Digest, file: &Path) -> RemoteResult<()> {
        self.put_file_as(&blob_key(&digest.to_hex()), digest, file)
    }

    /// Upload `file`, whose content is `digest`, as the object `rel` (see [`Self::put_blob`]).
    pub(crate) fn put_file_as(
        &self,
        rel: &str,
        digest: &crate::Digest,
        file: &Path,
    ) -> RemoteResult<()> {
        use std::io::Read;
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let io_err = |e: std::io::Error| {
            self.err(
                "reading the local file for",
                rel,
                object_store::Error::Generic {
                    store: "local",
                    source: Box::new(e),
                },
            )
        };
        let damaged = || RemoteError::LocalBlobCorrupt {
            url: self.url.to_string(),
            digest: digest.to_hex(),
            path: file.to_path_buf(),
        };
        let mut f = std::fs::File::open(file).map_err(io_err)?;
        if size <= 32 << 20 {
            let mut buf = Vec::with_capacity(size as usize);
            f.read_to_end(&mut buf).map_err(io_err)?;
            if crate::Digest::of(&buf) != *digest {
                return Err(damaged());
            }
            // Content-addressed: an object already under this name holds these bytes.
            self.put_new(rel, buf)?;
            return Ok(());
        }
        let path = self.path(rel);
        self.rt.block_on(async {
            let upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(|e| self.err("starting the upload of", rel, e))?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, 16 << 20);
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 4 << 20];
            loop {
                let n = match f.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(io_err(e));
                    }
                };
                if n == 0 {
                    break;
                }
                if let Err(e) = w.wait_for_capacity(4).await {
                    let _ = w.abort().await;
                    return Err(self.err("uploading", rel, e));
                }
                hasher.update(&buf[..n]);
                w.write(&buf[..n]);
            }
            // Checked before the upload completes: a damaged file never appears remotely.
            if crate::Digest::from(hasher.finalize()) != *digest {
                let _ = w.abort().await;
                return Err(damaged());
            }
            w.finish()
                .await
                .map(|_| ())
                .map_err(|e| self.err("uploading", rel, e))
        })
    }

    /// Read an object whole, with its ETag and version. `Ok(None)` when it does not exist.
    pub(crate) fn get(&self, rel: &str) -> RemoteResult<Option<(Vec<u8>, ObjectVersion)>> {
        let r = self.rt.block_on(async {
            let g = self.store.get(&self.path(rel)).await?;
            let v = (g.meta.e_tag.clone(), g.meta.version.clone());
            let bytes = g.bytes().await?;
            Ok::<_, object_store::Error>((bytes.to_vec(), v))
        });
        match r {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("reading", rel, e)),
        }
    }

    /// Stream an object into a writer, chunk by chunk.
    pub(crate) fn get_into(&self, rel: &str, out: &mut dyn std::io::Write) -> RemoteResult<bool> {
        let r = self.rt.block_on(async {
            let g = self.store.get(&self.path(rel)).await?;
            let mut s = g.into_stream();
            while let Some(chunk) = s.next().await {
                let chunk = chunk?;
                out.write_all(&chunk)
                    .map_err(|e| object_store::Error::Generic {
                        store: "local",
                        source: Box::new(e),
                    })?;
            }
            Ok::<_, object_store::Error>(())
        });
        match r {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("reading", rel, e)),
        }
    }

    /// Every object under `rel/` (names relative to the remote's root), sorted by name.
    pub(crate) fn list(&self, rel: &str) -> RemoteResult<Listing> {
        let prefix = self.path(rel);
        let root_len = if self.root.as_ref().is_empty() {
            0
        } else {
            self.root.as_ref().len() + 1
        };
        let r = self.rt.block_on(async {
            let mut out = Vec::new();
            let mut s = self.store.list(Some(&prefix));
            while let Some(m) = s.next().await {
                let m = m?;
                let name = m.location.as_ref();
                out.push((name.get(root_len..).unwrap_or(name).to_string(), m.size));
            }
            Ok::<_, object_store::Error>(out)
        });
        let mut out = r.map_err(|e| self.err("listing", rel, e))?;
        out.sort();
        Ok(out)
    }

    pub(crate) fn delete(&self, rel: &str) -> RemoteResult<()> {
        match self.rt.block_on(self.store.delete(&self.path(rel))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("deleting", rel, e)),
        }
    }
}

// ---- object names ----------------------------------------------------------------------------

pub(crate) const LEASE: &str = "lease.json";

pub(crate) fn blob_key(hex: &str) -> String {
    format!("blobs/{hex}")
}

pub(crate) fn gen_prefix(epoch: u64) -> String {
    format!("gens/{epoch:010}")
}

pub(crate) fn snapshot_key(epoch: u64, seq: u64) -> String {
    format!("{}/snapshots/{seq:020}", gen_prefix(epoch))
}

pub(crate) fn segment_key(epoch: u64, first: u64, last: u64) -> String {
    format!("{}/segments/{first:020}-{last:020}", gen_prefix(epoch))
}

/// What a name under `gens/` says it is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Named {
    Snapshot { epoch: u64, seq: u64 },
    Segment { epoch: u64, first: u64, last: u64 },
}

pub(crate) fn parse_name(rel: &str) -> Option<Named> {
    let rest = rel.strip_prefix("gens/")?;
    let (epoch, rest) = rest.split_once('/')?;
    let epoch: u64 = epoch.parse().ok()?;
    if let Some(seq) = rest.strip_prefix("snapshots/") {
        return Some(Named::Snapshot {
            epoch,
            seq: seq.parse().ok()?,
        });
    }
    let (first, last) = rest.strip_prefix("segments/")?.split_once('-')?;
    Some(Named::Segment {
        epoch,
        first: first.parse().ok()?,
        last: last.parse().ok()?,
    })
}

/// The newest generation's usable history: its newest snapshot and the segments that follow
/// it without a gap.
#[derive(Clone, Debug, Default)]
pub(crate) struct Chain {
    pub epoch: u64,
    pub snapshot: Option<u64>,
    /// (first, last) in order, contiguous from snapshot + 1.
    pub segments: Vec<(u64, u64)>,
    /// Segments of the generation left out: after a gap, or overlapping.
    pub stray: Vec<(u64, u64)>,
}

impl Chain {
    pub fn last(&self) -> u64 {
        self.segments
            .last()
            .map(|s| s.1)
            .or(self.snapshot)
            .unwrap_or(0)
    }
}

/// Per generation: its snapshots' commit numbers and its segments' (first, last).
pub(crate) type Generations = std::collections::BTreeMap<u64, (Vec<u64>, Vec<(u64, u64)>)>;

/// Read the remote's layout: every generation's snapshots and segments.
pub(crate) fn chains(names: &Listing) -> Generations {
    let mut gens = Generations::new();
    for (name, _) in names {
        match parse_name(name) {
            Some(Named::Snapshot { epoch, seq }) => gens.entry(epoch).or_default().0.push(seq),
            Some(Named::Segment { epoch, first, last }) => {
                gens.entry(epoch).or_default().1.push((first, last))
            }
            None => {}
        }
    }
    gens
}

/// The chain a restore uses: the newest generation with a snapshot.
pub(crate) fn current_chain(names: &Listing) -> Option<Chain> {
    let gens = chains(names);
    for (epoch, (mut snaps, mut segs)) in gens.into_iter().rev() {
        snaps.sort();
        let Some(&snap) = snaps.last() else {
            continue;
        };
        segs.sort();
        let mut chain = Chain {
            epoch,
            snapshot: Some(snap),
            ..Default::default()
        };
        // A segment may start before the commit that is next: a retried upload (its first
        // reply lost) covers the commits of the first one and more. Segments hold the last
        // write of each key over their commits of one linear history, so applying one that
        // overlaps what is already applied gives the state at its last commit.
        let mut next = snap + 1;
        for (first, last) in segs {
            if last < next {
                continue; // before the snapshot or covered by a wider segment
            }
            if first <= next && chain.stray.is_empty() {
                chain.segments.push((first, last));
                next = last + 1;
            } else {
                chain.stray.push((first, last));
            }
        }
        return Some(chain);
    }
    None
}

/// Blobs a set of records refers to: step outputs and checkpoint files, and artifact records.
pub(crate) fn referenced_blobs<'a>(
    records: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> std::collections::BTreeSet<crate::Digest> {
    use crate::keys;
    use crate::records::{StepRecord, StepStatus};
    let mut out = std::collections::BTreeSet::new();
    for (k, v) in records {
        match k.first() {
            Some(&keys::STEP) => {
                if let Ok(r) = crate::envelope::decode::<StepRecord>(k, v) {
                    if let StepStatus::Done { outputs, .. } = &r.status {
                        out.extend(outputs.values().copied());
                    }
                    if let Some(cp) = &r.checkpoint {
                        out.extend(cp.blobs.values().copied());
                    }
                }
            }
            Some(&keys::ARTIFACT) => {
                if let Some(d) = keys::digest_at(k, 1) {
                    out.insert(d);
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_never_keep_credentials() {
        assert!(RemoteUrl::parse("s3://bucket/some/prefix").is_ok());
        assert!(RemoteUrl::parse("file:///tmp/x").is_ok());
        for (bad, says) in [
            ("s3://AKIA:secret@bucket/p", "credentials"),
            ("s3://bucket/p?secret=1", "no query"),
            ("ftp://host/p", "not supported"),
            ("file://host/p", "absolute folder"),
            ("not a url", "s3://bucket/prefix"),
        ] {
            let e = RemoteUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }

    #[test]
    fn backend_errors_lose_url_queries() {
        let e = std::io::Error::other(
            "GET https://acct.blob.core.windows.net/c/lease.json?sv=2021&sig=SECRETSIG failed",
        );
        let r = Redacted::of(&e).to_string();
        assert!(
            !r.contains("SECRETSIG") && r.contains("lease.json?<redacted> failed"),
            "{r}"
        );
        let e = std::io::Error::other("500: <?xml version=\"1.0\"?> is it up?");
        assert_eq!(
            Redacted::of(&e).to_string(),
            "500: <?xml version=\"1.0\"?> is it up?"
        );
    }

    #[test]
    fn the_chain_is_the_newest_generation_with_a_snapshot_up_to_a_gap() {
        let names: Listing = [
            "gens/0000000001/snapshots/00000000000000000000",
            "gens/0000000001/segments/00000000000000000001-00000000000000000009",
            "gens/0000000002/snapshots/00000000000000000005",
            "gens/0000000002/segments/00000000000000000003-00000000000000000004",
            "gens/0000000002/segments/00000000000000000006-00000000000000000007",
            "gens/0000000002/segments/00000000000000000008-00000000000000000008",
            "gens/0000000002/segments/00000000000000000007-00000000000000000009",
            "gens/0000000002/segments/00000000000000000010-00000000000000000011",
            "gens/0000000002/segments/00000000000000000013-00000000000000000014",
            "gens/0000000003/segments/00000000000000000012-00000000000000000012",
        ]
        .iter()
        .map(|s| (s.to_string(), 1))
        .collect();
        let c = current_chain(&names).unwrap();
        assert_eq!(c.epoch, 2);
        assert_eq!(c.snapshot, Some(5));
        // 7-9 is a retry that also took commits 8 and 9 (a reply was lost), so 8-8 adds
        // nothing; commit 12 is missing, so 13-14 cannot be applied.
        assert_eq!(c.segments, vec![(6, 7), (7, 9), (10, 11)]);
        assert_eq!(c.stray, vec![(13, 14)]);
        assert_eq!(c.last(), 11);
    }
}
