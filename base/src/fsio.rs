//! Crash-safe file writes, the one implementation every crate uses: a file is written whole
//! or not at all (a temporary file beside it, fsync, rename, fsync of the folder), a file that
//! is published another way is written and fsynced with [`create_synced`], a folder's entries
//! are made durable with [`sync_dir`], and two folders are swapped in one step with
//! [`exchange`].

use std::io::Write;
use std::path::{Path, PathBuf};

/// An I/O error on a named path.
#[derive(Debug, thiserror::Error)]
#[error("I/O error on {}", path.display())]
pub struct PathError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl PathError {
    /// A `map_err` adapter naming `path`.
    pub fn at(path: &Path) -> impl Fn(std::io::Error) -> PathError + '_ {
        move |source| PathError {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes `path` whole or not at all: `write` streams the content into a buffered temporary file
/// beside it (`.NAME.tmp-PID`), which is fsynced and renamed over `path`, and then the folder is
/// fsynced so that the rename survives a power loss. On an error the temporary file is removed
/// and `path` is as it was.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), PathError> {
    let name = path
        .file_name()
        .ok_or_else(|| PathError {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = parent_of(path);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<(), PathError> {
        let file = std::fs::File::create(&tmp).map_err(PathError::at(&tmp))?;
        {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
            write(&mut w).map_err(PathError::at(&tmp))?;
            w.flush().map_err(PathError::at(&tmp))?;
        }
        file.sync_all().map_err(PathError::at(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(PathError::at(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&dir)
}

/// [`write_atomic_with`] for bytes in memory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PathError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes a new file that is published some other way (inside a folder that is renamed into
/// place whole, or a step's scratch file the store then takes in): `write` streams into a
/// buffered `path`, which is then flushed and fsynced. The caller syncs the folder when it
/// publishes. `write`'s own errors come back as they are.
pub fn create_synced<E: From<PathError>>(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    let file = std::fs::File::create(path).map_err(PathError::at(path))?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        write(&mut w)?;
        w.flush().map_err(PathError::at(path))?;
    }
    file.sync_all().map_err(PathError::at(path))?;
    Ok(())
}

/// Makes a folder's entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> Result<(), PathError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(PathError::at(dir))
}

/// The folder that holds `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Exchanges two paths atomically (`renameat2(RENAME_EXCHANGE)`); `Ok(false)` where the
/// filesystem or the platform cannot.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn exchange(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

/// Exchanges two paths atomically (`renameat2(RENAME_EXCHANGE)`); `Ok(false)` where the
/// filesystem cannot.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths; the call only renames.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.path.to_string_lossy().contains(".a.json.tmp-"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn exchange_swaps_two_folders() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("x"), b"").unwrap();
        if exchange(&a, &b).unwrap() {
            assert!(b.join("x").exists() && !a.join("x").exists());
        }
    }
}
