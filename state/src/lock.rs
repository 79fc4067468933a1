//! The store lock: an exclusive `flock` on `<store>/LOCK` holding the owner's pid. The kernel
//! drops the lock when the process dies (SIGKILL included), so a crash never leaves a stale lock.

use crate::error::{StateError, StateResult};
use fs2::FileExt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct StoreLock {
    _file: File,
    #[allow(dead_code)]
    path: PathBuf,
}

impl StoreLock {
    pub fn acquire(store_dir: &Path, wait: std::time::Duration) -> StateResult<StoreLock> {
        let path = store_dir.join("LOCK");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StateError::io(&path, e))?;
        // A short-lived holder (`tsr status` reading a snapshot, `tsr verify`) lets go within
        // milliseconds; wait briefly before reporting the store as in use.
        let deadline = std::time::Instant::now() + wait;
        while file.try_lock_exclusive().is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        if file.try_lock_exclusive().is_err() {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim().to_string();
            return Err(StateError::InUse {
                path: store_dir.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid
                },
            });
        }
        file.set_len(0).map_err(|e| StateError::io(&path, e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| StateError::io(&path, e))?;
        write!(file, "{}", std::process::id()).map_err(|e| StateError::io(&path, e))?;
        file.sync_all().map_err(|e| StateError::io(&path, e))?;
        Ok(StoreLock { _file: file, path })
    }
}
