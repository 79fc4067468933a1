//! Reading the remote back: restore a store from it, verify it, and clean it.

use super::{
    blob_key, chains, current_chain, parse_name, referenced_blobs, segment_key, snapshot_key,
    Chain, Named, Remote, RemoteError, RemoteUrl,
};
use crate::error::{StateError, StateResult};
use crate::format::{decode_object, Kind, Object};
use crate::{Digest, Store};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    pub url: String,
    pub epoch: u64,
    pub seq: u64,
    pub segments: usize,
    pub records: usize,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub secs: f64,
}

/// Fetch and check one snapshot or segment.
fn fetch(remote: &Remote, key: &str, named: &Named) -> StateResult<Object> {
    let corrupt = |reason: String| -> StateError {
        RemoteError::Corrupt {
            url: remote.url.to_string(),
            key: key.to_string(),
            reason,
        }
        .into()
    };
    let Some((bytes, _)) = remote.get(key)? else {
        return Err(corrupt("it is listed but cannot be read (missing)".into()));
    };
    let o = decode_object(&bytes).map_err(corrupt)?;
    let ok = match *named {
        Named::Snapshot { epoch, seq } => {
            o.kind == Kind::Snapshot && o.epoch == epoch && o.last == seq
        }
        Named::Segment { epoch, first, last } => {
            o.kind == Kind::Segment && o.epoch == epoch && o.first == first && o.last == last
        }
    };
    if !ok {
        return Err(corrupt(format!(
            "its header ({:?} of generation {}, commits {}..={}) does not match its name",
            o.kind, o.epoch, o.first, o.last
        )));
    }
    Ok(o)
}

/// The records as of the end of a chain.
fn replay(remote: &Remote, chain: &Chain) -> StateResult<BTreeMap<Vec<u8>, Vec<u8>>> {
    let snap = chain.snapshot.expect("a chain has a snapshot");
    let named = Named::Snapshot {
        epoch: chain.epoch,
        seq: snap,
    };
    let o = fetch(remote, &snapshot_key(chain.epoch, snap), &named)?;
    let mut records: BTreeMap<Vec<u8>, Vec<u8>> = o
        .ops
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    for &(first, last) in &chain.segments {
        let named = Named::Segment {
            epoch: chain.epoch,
            first,
            last,
        };
        let o = fetch(remote, &segment_key(chain.epoch, first, last), &named)?;
        for (k, v) in o.ops {
            match v {
                Some(v) => records.insert(k, v),
                None => records.remove(&k),
            };
        }
    }
    Ok(records)
}

/// Download a blob into the local store, checking its digest.
fn fetch_blob(remote: &Remote, store: &Store, d: &Digest) -> StateResult<u64> {
    let key = blob_key(&d.to_hex());
    let mut w = store.blobs().large_writer()?;
    if !remote.get_into(&key, &mut w)? {
        return Err(RemoteError::MissingBlob {
            url: remote.url.to_string(),
            digest: d.to_hex(),
        }
        .into());
    }
    let got = w.finish()?;
    if got != *d {
        let _ = store.blobs().remove(&got);
        return Err(RemoteError::Corrupt {
            url: remote.url.to_string(),
            key,
            reason: format!("its content hashes to {}", got.to_hex()),
        }
        .into());
    }
    Ok(store.blobs().size(d).unwrap_or(0))
}

/// Fill an empty store from a chain: records first into memory, blobs into the store, then the
/// records in one commit (a crash before it leaves an empty store with stray blobs, which a
/// second restore reuses).
pub(crate) fn restore_into(
    remote: &Remote,
    store: &Store,
    chain: &Chain,
) -> StateResult<RestoreReport> {
    let t0 = Instant::now();
    let records = replay(remote, chain)?;
    let mut report = RestoreReport {
        url: remote.url.to_string(),
        epoch: chain.epoch,
        seq: chain.last(),
        segments: chain.segments.len(),
        records: records.len(),
        ..Default::default()
    };
    for d in referenced_blobs(records.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))) {
        if store.blobs().exists(&d) {
            continue;
        }
        match fetch_blob(remote, store, &d) {
            Ok(n) => {
                report.blobs += 1;
                report.blob_bytes += n;
            }
            // An artifact record whose blob was removed later (its step was dropped) does not
            // stop a restore; a step's output or checkpoint does.
            Err(StateError::Remote(e))
                if matches!(*e, RemoteError::MissingBlob { .. }) && !needed(&records, &d) => {}
            Err(e) => return Err(e),
        }
    }
    store.import_replica(records, chain.epoch, chain.last(), remote.url.as_str())?;
    report.secs = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn needed(records: &BTreeMap<Vec<u8>, Vec<u8>>, d: &Digest) -> bool {
    referenced_blobs(
        records
            .iter()
            .filter(|(k, _)| k.first() == Some(&crate::keys::STEP))
            .map(|(k, v)| (k.as_slice(), v.as_slice())),
    )
    .contains(d)
}

/// Rebuild a store at `dir` (a new or empty folder) from the remote. The restored store is
/// replicated to the same remote: a run continued on it takes the remote's lease.
pub fn restore(url: &RemoteUrl, dir: &Path) -> StateResult<RestoreReport> {
    if dir.join("db").exists() {
        let store = Store::open(dir)?;
        if store.seq() != 0 || !store.dump_records()?.is_empty() {
            return Err(StateError::NotEmpty(dir.to_path_buf()));
        }
    }
    let remote = Remote::open(url)?;
    let chain = current_chain(&remote.list("gens")?).ok_or_else(|| RemoteError::Empty {
        url: url.to_string(),
    })?;
    let store = Store::open(dir)?;
    restore_into(&remote, &store, &chain)
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RemoteVerifyReport {
    pub url: String,
    pub generations: usize,
    pub epoch: u64,
    pub snapshot: Option<u64>,
    pub segments: usize,
    pub seq: u64,
    pub records: usize,
    pub blobs_checked: usize,
    pub problems: Vec<String>,
    pub lease: Option<super::LeaseDoc>,
    /// Workers' folders under `work/` (one per step key) and their bytes: not part of the
    /// store's history, so not checked.
    pub work_folders: Vec<(String, u64)>,
}

impl RemoteVerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check the remote copy: every object of the current history decodes, its checksum holds and
/// its name matches its header; segments follow each other without a gap; every blob a record
/// refers to exists and hashes to its name. Never writes.
pub fn verify_remote(url: &RemoteUrl) -> StateResult<RemoteVerifyReport> {
    let remote = Remote::open(url)?;
    let names = remote.list("gens")?;
    let mut report = RemoteVerifyReport {
        url: url.to_string(),
        generations: chains(&names).len(),
        lease: super::lease::holder(&remote)?,
        work_folders: remote.work_folders()?,
        ..Default::default()
    };
    for (name, _) in &names {
        if parse_name(name).is_none() {
            report
                .problems
                .push(format!("`{name}` is not a snapshot or segment name"));
        }
    }
    let Some(chain) = current_chain(&names) else {
        report.problems.push(if names.is_empty() {
            "the remote holds nothing: no generation, no snapshot".to_string()
        } else {
            "no generation has a snapshot to start from".to_string()
        });
        return Ok(report);
    };
    report.epoch = chain.epoch;
    report.snapshot = chain.snapshot;
    report.segments = chain.segments.len();
    report.seq = chain.last();
    for &(first, last) in &chain.stray {
        report.problems.push(format!(
            "segment {} of generation {} does not follow commit {} (a segment before it is missing): commits from {first} on cannot be restored",
            segment_key(chain.epoch, first, last),
            chain.epoch,
            chain.last()
        ));
    }
    let records = match replay(&remote, &chain) {
        Ok(r) => r,
        // The remote could not be read (network): that is not damage.
        Err(StateError::Remote(e)) if matches!(*e, RemoteError::Backend { .. }) => {
            return Err(StateError::Remote(e))
        }
        Err(e) => {
            report.problems.push(crate::error_chain(&e));
            return Ok(report);
        }
    };
    report.records = records.len();
    for (k, v) in &records {
        if let Err(detail) = crate::records::decode_check(k, v) {
            report
                .problems
                .push(format!("a record in the remote history: {detail}"));
        }
    }
    let present: BTreeMap<String, u64> = remote
        .list("blobs")?
        .into_iter()
        .filter_map(|(n, s)| n.strip_prefix("blobs/").map(|h| (h.to_string(), s)))
        .collect();
    for d in referenced_blobs(records.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))) {
        let hex = d.to_hex();
        if !present.contains_key(&hex) {
            if needed(&records, &d) {
                report.problems.push(format!(
                    "blob {hex} is missing: a record refers to it (restore would fail)"
                ));
            }
            continue;
        }
        report.blobs_checked += 1;
        let mut h = HashWriter(blake3::Hasher::new());
        match remote.get_into(&blob_key(&hex), &mut h) {
            Ok(true) => {
                let got = Digest::from(h.0.finalize());
                if got != d {
                    report.problems.push(format!(
                        "blob {hex} is corrupt: its content hashes to {}",
                        got.to_hex()
                    ));
                }
            }
            Ok(false) => report
                .problems
                .push(format!("blob {hex} is listed but cannot be read")),
            Err(e) => report.problems.push(crate::error_chain(&e)),
        }
    }
    Ok(report)
}

struct HashWriter(blake3::Hasher);

impl std::io::Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RemoteGcReport {
    pub removed_objects: usize,
    pub removed_blobs: usize,
    pub removed_bytes: u64,
    pub kept_blobs: usize,
    pub snapshot: Option<u64>,
    pub dry_run: bool,
}

/// After a fresh snapshot at commit `snap` of generation `epoch`: delete what a restore no
/// longer reads (older generations, this generation's objects before the snapshot) and blobs
/// the store's current records do not refer to.
pub(crate) fn gc_after_snapshot(
    remote: &Remote,
    store: &Store,
    epoch: u64,
    snap: Option<u64>,
    dry_run: bool,
) -> StateResult<RemoteGcReport> {
    let mut report = RemoteGcReport {
        snapshot: snap,
        dry_run,
        ..Default::default()
    };
    let keep_from = snap.unwrap_or(0);
    let names = remote.list("gens")?;
    let mut doomed = Vec::new();
    for (name, size) in &names {
        let old = match parse_name(name) {
            // Never a newer generation: it belongs to a writer that took the remote over.
            Some(Named::Snapshot { epoch: e, seq }) => e < epoch || (e == epoch && seq < keep_from),
            Some(Named::Segment { epoch: e, last, .. }) => {
                e < epoch || (e == epoch && last <= keep_from)
            }
            None => false,
        };
        if old && snap.is_some() {
            doomed.push((name.clone(), *size));
        }
    }
    let records = store.dump_records()?;
    let live: std::collections::BTreeSet<String> =
        referenced_blobs(records.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
            .into_iter()
            .map(|d| d.to_hex())
            .collect();
    for (name, size) in remote.list("blobs")? {
        let hex = name.strip_prefix("blobs/").unwrap_or(&name);
        if live.contains(hex) {
            report.kept_blobs += 1;
        } else {
            report.removed_blobs += 1;
            report.removed_bytes += size;
            doomed.push((name.clone(), size));
        }
    }
    report.removed_objects = doomed.len() - report.removed_blobs;
    if !dry_run {
        // Blobs last: a record still in an object being deleted never points at a deleted blob
        // for longer than the deletion takes.
        doomed.sort_by_key(|(n, _)| n.starts_with("blobs/"));
        for (name, _) in doomed {
            remote.delete(&name)?;
        }
    }
    Ok(report)
}
