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

/// The content of `lease.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDoc {
    pub holder: Holder,
    /// The generation this holder writes (`gens/<epoch>/`).
    pub epoch: u64,
    pub expires_ms: u64,
    pub renewed_ms: u64,
}

/// Which version of `lease.json` we last saw, for the conditional replace.
#[derive(Clone, Debug)]
enum Version {
    ETag(Option<String>),
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
    let Some((bytes, etag)) = remote.get(LEASE)? else {
        return Ok(None);
    };
    let doc: LeaseDoc = serde_json::from_slice(&bytes).map_err(|e| RemoteError::Corrupt {
        url: remote.url.to_string(),
        key: LEASE.into(),
        reason: format!("{e}; delete it only if no machine writes to this remote"),
    })?;
    let version = if remote.local_dir.is_some() {
        Version::Content(bytes)
    } else {
        Version::ETag(etag)
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
        Version::ETag(etag) => {
            let opts = PutOptions {
                mode: PutMode::Update(UpdateVersion {
                    e_tag: etag.clone(),
                    version: None,
                }),
                ..Default::default()
            };
            let r = remote.rt.block_on(remote.store.put_opts(
                &remote.path(LEASE),
                PutPayload::from(bytes),
                opts,
            ));
            match r {
                Ok(put) => Ok(Some(Version::ETag(put.e_tag))),
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
    for _ in 0..5 {
        let now = crate::now_ms();
        let mut doc = LeaseDoc {
            holder: me.clone(),
            epoch: 0,
            expires_ms: now + ttl.as_millis() as u64,
            renewed_ms: now,
        };
        match read(remote)? {
            None => {
                let newest = super::chains(&remote.list("gens")?)
                    .keys()
                    .last()
                    .copied()
                    .unwrap_or(0);
                doc.epoch = newest + 1;
                let bytes = serde_json::to_vec_pretty(&doc).expect("lease serializes");
                if remote.put_new(LEASE, bytes)? {
                    // Read back for its version (etag or content).
                    if let Some((d, version)) = read(remote)? {
                        if d == doc {
                            return Ok((Lease { doc, version }, true));
                        }
                    }
                }
            }
            Some((cur, version)) => {
                let ours = cur.holder.store_id == me.store_id;
                if ours {
                    doc.epoch = cur.epoch;
                } else if cur.expires_ms <= now || take_over {
                    doc.epoch = cur.epoch + 1;
                } else {
                    return Err(RemoteError::LeaseHeld {
                        url: remote.url.to_string(),
                        holder: cur.holder.to_string(),
                        until: time_of(cur.expires_ms),
                        left_s: (cur.expires_ms - now).div_ceil(1000),
                    });
                }
                if let Some(version) = swap(remote, &version, &doc)? {
                    return Ok((Lease { doc, version }, !ours));
                }
            }
        }
        // Someone else wrote the lease meanwhile: look again.
        std::thread::sleep(Duration::from_millis(50));
    }
    match read(remote)? {
        Some((cur, _)) => Err(RemoteError::LeaseHeld {
            url: remote.url.to_string(),
            holder: cur.holder.to_string(),
            until: time_of(cur.expires_ms),
            left_s: cur
                .expires_ms
                .saturating_sub(crate::now_ms())
                .div_ceil(1000),
        }),
        None => Err(RemoteError::Corrupt {
            url: remote.url.to_string(),
            key: LEASE.into(),
            reason: "it changes under every attempt to take it".into(),
        }),
    }
}

/// Extend the lease. A lease another machine took is [`RemoteError::Fenced`].
pub(crate) fn renew(remote: &Remote, lease: &mut Lease, ttl: Duration) -> RemoteResult<()> {
    let now = crate::now_ms();
    let mut doc = lease.doc.clone();
    doc.expires_ms = now + ttl.as_millis() as u64;
    doc.renewed_ms = now;
    match swap(remote, &lease.version, &doc)? {
        Some(v) => {
            lease.doc = doc;
            lease.version = v;
            Ok(())
        }
        None => {
            let holder = read(remote)?
                .map(|(d, _)| d.holder.to_string())
                .unwrap_or_else(|| "nobody (the lease was deleted)".into());
            Err(RemoteError::Fenced {
                url: remote.url.to_string(),
                holder,
            })
        }
    }
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
