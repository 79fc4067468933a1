//! One writer per remote: `lease.json` names its holder and when the lease expires. It is taken
//! and renewed with conditional writes (`If-None-Match: *` to create, `If-Match: <etag>` to
//! replace), so two machines never both believe they hold it. A writer learns that it lost the
//! lease at its next renewal, and renews right before every segment it writes.
//!
//! Taking the lease from another store starts a new generation (epoch + 1): the new writer's
//! history continues in `gens/<epoch>/`, and a restore reads only the newest generation, so
//! whatever the old writer still managed to upload is never part of the restored history.

use super::{Remote, RemoteError, RemoteResult, LEASE};
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Who writes to a remote: the store (its identity), the machine and the process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub store_id: String,
    pub host: String,
    pub pid: u32,
}

impl Holder {
    pub fn this_process(store_id: String) -> Holder {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown-host".into());
        Holder {
            store_id,
            host,
            pid: std::process::id(),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host {} (pid {}, store {})",
            self.host, self.pid, self.store_id
        )
    }
}

/// The format of `lease.json` this tsr writes and reads.
const LEASE_FORMAT: u32 = 1;

/// The content of `lease.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDoc {
    /// [`LEASE_FORMAT`]; another value is an error, never a guess.
    #[serde(default)]
    pub format: u32,
    pub holder: Holder,
    /// The generation this holder writes (`gens/<epoch>/`).
    pub epoch: u64,
    pub expires_ms: u64,
    pub renewed_ms: u64,
}

/// Which version of `lease.json` we last saw, for the conditional replace.
#[derive(Clone, Debug)]
enum Version {
    /// The ETag and the version (GCS's generation) the store gave, both passed back.
    Tag {
        e_tag: Option<String>,
        version: Option<String>,
    },
    /// `file://` remotes: the content itself (swapped under a lock file).
    Content(Vec<u8>),
}

#[derive(Clone, Debug)]
pub(crate) struct Lease {
    pub doc: LeaseDoc,
    version: Version,
}

pub(crate) fn time_of(ms: u64) -> String {
    // UTC, seconds: enough to compare with `date -u`.
    let s = ms / 1000;
    let (days, rem) = (s / 86400, s % 86400);
    let (h, m, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{sec:02} UTC")
}

fn read(remote: &Remote) -> RemoteResult<Option<(LeaseDoc, Version)>> {
    let Some((bytes, (e_tag, version))) = remote.get(LEASE)? else {
        return Ok(None);
    };
    let doc: LeaseDoc = serde_json::from_slice(&bytes).map_err(|e| RemoteError::Corrupt {
        url: remote.url.to_string(),
        key: LEASE.into(),
        reason: format!("{e}; delete it only if no machine writes to this remote"),
    })?;
    if doc.format != LEASE_FORMAT {
        return Err(RemoteError::Corrupt {
            url: remote.url.to_string(),
            key: LEASE.into(),
            reason: format!(
                "it has format {}, but this tsr reads format {LEASE_FORMAT}; use the tsr release that writes this remote",
                doc.format
            ),
        });
    }
    let version = if remote.local_dir.is_some() {
        Version::Content(bytes)
    } else {
        Version::Tag { e_tag, version }
    };
    Ok(Some((doc, version)))
}

/// The holder of a remote's lease, if any (for messages and `tsr status`).
pub fn holder(remote: &Remote) -> RemoteResult<Option<LeaseDoc>> {
    Ok(read(remote)?.map(|(d, _)| d))
}

/// Replace `lease.json` if it is still at `version`. `Ok(None)` when it changed meanwhile.
fn swap(remote: &Remote, version: &Version, doc: &LeaseDoc) -> RemoteResult<Option<Version>> {
    let bytes = serde_json::to_vec_pretty(doc).expect("lease serializes");
    match version {
        Version::Tag { e_tag, version } => {
            let opts = PutOptions {
                mode: PutMode::Update(UpdateVersion {
                    e_tag: e_tag.clone(),
                    version: version.clone(),
                }),
                ..Default::default()
            };
            let r = remote.rt.block_on(remote.store.put_opts(
                &remote.path(LEASE),
                PutPayload::from(bytes),
                opts,
            ));
            match r {
                Ok(put) => Ok(Some(Version::Tag {
                    e_tag: put.e_tag,
                    version: put.version,
                })),
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(remote.err("replacing", LEASE, e)),
            }
        }
        Version::Content(expected) => {
            let dir = remote.local_dir.as_ref().expect("file remote");
            swap_file(dir, expected, &bytes).map_err(|e| {
                remote.err(
                    "replacing",
                    LEASE,
                    object_store::Error::Generic {
                        store: "local",
                        source: Box::new(e),
                    },
                )
            })
        }
    }
}

/// Compare-and-swap of `lease.json` in a local folder, under an exclusive lock file.
fn swap_file(
    dir: &std::path::Path,
    expected: &[u8],
    bytes: &[u8],
) -> std::io::Result<Option<Version>> {
    use fs2::FileExt;
    use std::io::Write;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lease.json.lock"))?;
    lock.lock_exclusive()?;
    let path = dir.join(LEASE);
    let current = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if current != expected {
        return Ok(None);
    }
    let tmp = dir.join(format!("lease.json.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(Some(Version::Content(bytes.to_vec())))
}

/// Take the lease. `Ok((lease, true))` when this starts a new generation (the remote was empty
/// or held by another store), `false` when this store continues its own.
pub(crate) fn acquire(
    remote: &Remote,
    me: &Holder,
    ttl: Duration,
    take_over: bool,
) -> RemoteResult<(Lease, bool)> {
    // What we last tried to write: if a write succeeded but its reply was lost, the next read
    // shows our own document, which is then ours with the generation decided at that attempt.
    let mut attempt: Option<(LeaseDoc, bool)> = None;
    for _ in 0..5 {
        let current = read(remote)?;
        if let (Some((cur, version)), Some((doc, new_gen))) = (&current, &attempt) {
            if cur == doc {
                return Ok((
                    Lease {
                        doc: doc.clone(),
                        version: version.clone(),
                    },
                    *new_gen,
                ));
            }
        }
        let now = crate::now_ms();
        let mut doc = LeaseDoc {
            format: LEASE_FORMAT,
            holder: me.clone(),
            epoch: 0,
            expires_ms: now + ttl.as_millis() as u64,
            renewed_ms: now,
        };
        match current {
            None => {
                let newest = super::chains(&remote.list("gens")?)
                    .keys()
                    .last()
                    .copied()
                    .unwrap_or(0);
                doc.epoch = newest + 1;
                attempt = Some((doc.clone(), true));
                let bytes = serde_json::to_vec_pretty(&doc).expect("lease serializes");
                remote.put_new(LEASE, bytes)?;
                // Read back (next round) for its version (etag or content).
                continue;
            }
            Some((cur, version)) => {
                // The same store continues its own lease, unless the lease is live on another
                // host (a copied store folder is not the same writer).
                let ours = cur.holder.store_id == me.store_id
                    && (cur.holder.host == me.host || cur.expires_ms <= now);
                if ours {
                    doc.epoch = cur.epoch;
                } else if cur.expires_ms <= now || take_over {
                    doc.epoch = cur.epoch + 1;
                } else {
                    return Err(held(remote, &cur, now));
                }
                attempt = Some((doc.clone(), !ours));
                if let Some(version) = swap(remote, &version, &doc)? {
                    return Ok((Lease { doc, version }, !ours));
                }
            }
        }
        // Someone else wrote the lease meanwhile: look again.
        std::thread::sleep(Duration::from_millis(50));
    }
    match read(remote)? {
        Some((cur, _)) => Err(held(remote, &cur, crate::now_ms())),
        None => Err(RemoteError::Corrupt {
            url: remote.url.to_string(),
            key: LEASE.into(),
            reason: "it changes under every attempt to take it".into(),
        }),
    }
}

fn held(remote: &Remote, cur: &LeaseDoc, now: u64) -> RemoteError {
    RemoteError::LeaseHeld {
        url: remote.url.to_string(),
        holder: cur.holder.to_string(),
        until: time_of(cur.expires_ms),
        left_s: cur.expires_ms.saturating_sub(now).div_ceil(1000),
    }
}

/// Whether taking the lease now would start a new generation (it is held by another store or
/// by this store on another host), without taking it.
pub(crate) fn would_start_generation(remote: &Remote, me: &Holder) -> RemoteResult<bool> {
    let now = crate::now_ms();
    Ok(match read(remote)? {
        None => true,
        Some((cur, _)) => {
            !(cur.holder.store_id == me.store_id
                && (cur.holder.host == me.host || cur.expires_ms <= now))
        }
    })
}

/// Extend the lease. A lease another machine took is [`RemoteError::Fenced`].
pub(crate) fn renew(remote: &Remote, lease: &mut Lease, ttl: Duration) -> RemoteResult<()> {
    for _ in 0..3 {
        let now = crate::now_ms();
        let mut doc = lease.doc.clone();
        doc.expires_ms = now + ttl.as_millis() as u64;
        doc.renewed_ms = now;
        if let Some(v) = swap(remote, &lease.version, &doc)? {
            lease.doc = doc;
            lease.version = v;
            return Ok(());
        }
        match read(remote)? {
            // An earlier renewal went through but its reply was lost: the lease is still
            // ours, at another version.
            Some((cur, v)) if cur.holder == lease.doc.holder && cur.epoch == lease.doc.epoch => {
                lease.doc = cur;
                lease.version = v;
            }
            cur => {
                return Err(RemoteError::Fenced {
                    url: remote.url.to_string(),
                    holder: cur
                        .map(|(d, _)| d.holder.to_string())
                        .unwrap_or_else(|| "nobody (the lease was deleted)".into()),
                })
            }
        }
    }
    Err(RemoteError::Corrupt {
        url: remote.url.to_string(),
        key: LEASE.into(),
        reason: "it refuses every renewal although this process holds it".into(),
    })
}

/// Let the lease go at a clean exit, so the next machine takes it without waiting. Best effort:
/// a lease that cannot be released simply expires.
pub(crate) fn release(remote: &Remote, lease: &Lease) {
    let mut doc = lease.doc.clone();
    doc.expires_ms = crate::now_ms();
    let _ = swap(remote, &lease.version, &doc);
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_utc_dates() {
        assert_eq!(super::time_of(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::time_of(1_796_387_096_000), "2026-12-04 12:24:56 UTC");
    }
}
