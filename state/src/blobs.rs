//! Content-addressed blobs: files named by the blake3 digest of their bytes, under
//! `blobs/<first two hex>/<remaining hex>`. Writes go to `tmp/`, are fsynced, renamed into place
//! and the directory fsynced, so a blob either exists whole under its name or not at all. Reads
//! verify the digest: a mismatch is an error naming the file, never silently used.

use crate::direct::DirectFile;
use crate::error::{StateError, StateResult};
use crate::faults::{FaultInjector, FaultOp};
use crate::Digest;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
    faults: Option<Arc<dyn FaultInjector>>,
}

impl BlobStore {
    pub fn open(dir: PathBuf, tmp: PathBuf) -> StateResult<Self> {
        fs::create_dir_all(&dir).map_err(|e| StateError::io(&dir, e))?;
        fs::create_dir_all(&tmp).map_err(|e| StateError::io(&tmp, e))?;
        Ok(BlobStore {
            dir,
            tmp,
            faults: None,
        })
    }

    pub(crate) fn with_faults(mut self, faults: Option<Arc<dyn FaultInjector>>) -> Self {
        self.faults = faults;
        self
    }

    fn fault(&self, op: FaultOp, path: &Path) -> io::Result<()> {
        match &self.faults {
            Some(f) => f.before(op, path),
            None => Ok(()),
        }
    }

    /// The folder the blobs live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a blob lives (whether or not it exists).
    pub fn path(&self, d: &Digest) -> PathBuf {
        Self::path_in(&self.dir, d)
    }

    /// Where blob `d` lives in the blob folder `dir` (the layout every blob folder shares:
    /// the store's, a node cache's), without opening it.
    pub fn path_in(dir: &Path, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        dir.join(&hex[..2]).join(&hex[2..])
    }

    /// The folder for temporary files of this store (same filesystem as the blobs, so a rename
    /// into place is atomic).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// A fresh unique path inside the tmp folder.
    pub fn tmp_path(&self, label: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.tmp
            .join(format!("{label}.{}.{n}.tmp", std::process::id()))
    }

    pub fn exists(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Store bytes; returns their digest. Idempotent.
    pub fn put_bytes(&self, bytes: &[u8]) -> StateResult<Digest> {
        let mut w = self.writer()?;
        w.write_all(bytes)
            .map_err(|e| StateError::io(&w.tmp_path, e))?;
        w.finish()
    }

    /// A streaming writer that hashes as it writes.
    pub fn writer(&self) -> StateResult<BlobWriter> {
        let tmp_path = self.tmp_path("blob");
        let file = File::create(&tmp_path).map_err(|e| StateError::io(&tmp_path, e))?;
        Ok(self.new_writer(
            Sink::Buffered(io::BufWriter::with_capacity(1 << 20, file)),
            tmp_path,
        ))
    }

    /// A streaming writer for a large blob (hundreds of megabytes: weights, optimizer state):
    /// like [`Self::writer`], but the bytes bypass the page cache (`O_DIRECT`) where the
    /// filesystem allows it. See the `direct` module for why and for the fallbacks.
    pub fn large_writer(&self) -> StateResult<BlobWriter> {
        let tmp_path = self.tmp_path("blob");
        let file = DirectFile::create(&tmp_path).map_err(|e| StateError::io(&tmp_path, e))?;
        Ok(self.new_writer(Sink::Direct(file), tmp_path))
    }

    fn new_writer(&self, sink: Sink, tmp_path: PathBuf) -> BlobWriter {
        BlobWriter {
            store: self.clone(),
            file: Some(sink),
            hasher: blake3::Hasher::new(),
            tmp_path,
            size: 0,
        }
    }

    /// Move a finished file (e.g. weights a step wrote into its scratch folder) into the store.
    /// The file is hashed, fsynced and renamed (or copied when on another filesystem).
    pub fn put_file(&self, path: &Path) -> StateResult<Digest> {
        let digest = hash_file(path)?;
        let dest = self.path(&digest);
        if dest.is_file() && hash_file(&dest).ok() == Some(digest) {
            let _ = fs::remove_file(path);
            return Ok(digest);
        }
        let f = File::open(path).map_err(|e| StateError::io(path, e))?;
        self.fault(FaultOp::BlobSync, path)
            .and_then(|_| f.sync_all())
            .map_err(|e| StateError::io(path, e))?;
        drop(f);
        self.install(path, &digest)?;
        Ok(digest)
    }

    fn install(&self, tmp: &Path, digest: &Digest) -> StateResult<()> {
        let dest = self.path(digest);
        let parent = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(parent).map_err(|e| StateError::io(parent, e))?;
        if let Err(e) = self
            .fault(FaultOp::BlobRename, &dest)
            .and_then(|_| fs::rename(tmp, &dest))
        {
            if e.raw_os_error() == Some(libc::EXDEV) {
                // Another filesystem: copy into our tmp (same fs as blobs) and rename that.
                let local = self.tmp_path("copy");
                fs::copy(tmp, &local).map_err(|e| StateError::io(&local, e))?;
                File::open(&local)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| StateError::io(&local, e))?;
                fs::rename(&local, &dest).map_err(|e| StateError::io(&dest, e))?;
                let _ = fs::remove_file(tmp);
            } else {
                return Err(StateError::io(&dest, e));
            }
        }
        self.fault(FaultOp::DirSync, parent)
            .map_err(|e| StateError::io(parent, e))?;
        sync_dir(parent)?;
        Ok(())
    }

    /// Checks that a blob is present (not its content: a blob is verified whenever it is read,
    /// and one just made by a [`BlobWriter`] was hashed from the bytes written).
    pub fn require(&self, d: &Digest) -> StateResult<()> {
        let path = self.path(d);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(StateError::BlobMissing {
                digest: d.to_hex(),
                path,
            }),
            Err(e) => Err(self.missing_or_io(d, &path, e)),
        }
    }

    /// Read a blob and verify its digest.
    pub fn read(&self, d: &Digest) -> StateResult<Vec<u8>> {
        let path = self.path(d);
        let bytes = fs::read(&path).map_err(|e| self.missing_or_io(d, &path, e))?;
        let actual = Digest::of(&bytes);
        if actual != *d {
            return Err(StateError::BlobCorrupt {
                digest: d.to_hex(),
                actual: actual.to_hex(),
                path,
            });
        }
        Ok(bytes)
    }

    /// Verify a blob on disk and return its path (for steps that open large files themselves).
    pub fn verified_path(&self, d: &Digest) -> StateResult<PathBuf> {
        self.verify(d)?;
        Ok(self.path(d))
    }

    pub fn verify(&self, d: &Digest) -> StateResult<()> {
        let path = self.path(d);
        let actual = hash_file(&path).map_err(|e| match e {
            StateError::Io { source, .. } => self.missing_or_io(d, &path, source),
            other => other,
        })?;
        if actual != *d {
            return Err(StateError::BlobCorrupt {
                digest: d.to_hex(),
                actual: actual.to_hex(),
                path,
            });
        }
        Ok(())
    }

    fn missing_or_io(&self, d: &Digest, path: &Path, e: io::Error) -> StateError {
        if e.kind() == io::ErrorKind::NotFound {
            StateError::BlobMissing {
                digest: d.to_hex(),
                path: path.to_path_buf(),
            }
        } else {
            StateError::io(path, e)
        }
    }

    pub fn size(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.path(d)).ok().map(|m| m.len())
    }

    /// Remove a blob (used by gc and checkpoint rotation; callers check references first).
    pub fn remove(&self, d: &Digest) -> StateResult<()> {
        let path = self.path(d);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StateError::io(&path, e)),
        }
    }

    /// Every blob file present, with its name parsed as a digest. Files whose names are not
    /// digests are returned separately as stray paths.
    pub fn list(&self) -> StateResult<(Vec<Digest>, Vec<PathBuf>)> {
        let mut found = Vec::new();
        let mut stray = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(|e| StateError::io(&self.dir, e))?;
        for shard in rd {
            let shard = shard.map_err(|e| StateError::io(&self.dir, e))?;
            let shard_path = shard.path();
            if !shard_path.is_dir() {
                stray.push(shard_path);
                continue;
            }
            let prefix = shard.file_name().to_string_lossy().to_string();
            for f in fs::read_dir(&shard_path).map_err(|e| StateError::io(&shard_path, e))? {
                let f = f.map_err(|e| StateError::io(&shard_path, e))?;
                let name = format!("{prefix}{}", f.file_name().to_string_lossy());
                match name.parse::<Digest>() {
                    Ok(d) => found.push(d),
                    Err(_) => stray.push(f.path()),
                }
            }
        }
        found.sort();
        stray.sort();
        Ok((found, stray))
    }

    /// Remove leftover temporary files (from a process killed mid-write). Only safe while the
    /// store lock is held, which `Store::open` guarantees.
    pub(crate) fn clean_tmp(&self) -> StateResult<usize> {
        let mut n = 0;
        let rd = fs::read_dir(&self.tmp).map_err(|e| StateError::io(&self.tmp, e))?;
        for entry in rd.flatten() {
            let p = entry.path();
            let res = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            if res.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Where a [`BlobWriter`]'s bytes go.
enum Sink {
    Buffered(io::BufWriter<File>),
    Direct(DirectFile),
}

impl Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Buffered(w) => w.write(buf),
            Sink::Direct(w) => w.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Buffered(w) => w.write_all(buf),
            Sink::Direct(w) => w.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Buffered(w) => w.flush(),
            Sink::Direct(w) => w.flush(),
        }
    }
    /// Everything written to the file (not fsynced).
    fn into_file(self) -> io::Result<File> {
        match self {
            Sink::Buffered(w) => w.into_inner().map_err(|e| e.into_error()),
            Sink::Direct(w) => w.into_file(),
        }
    }
}

/// A blob being written: hashes as it goes, installed under its digest by [`BlobWriter::finish`].
pub struct BlobWriter {
    store: BlobStore,
    file: Option<Sink>,
    hasher: blake3::Hasher,
    tmp_path: PathBuf,
    size: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Err(e) = self.store.fault(FaultOp::BlobWrite, &self.tmp_path) {
            // A short write: part of the buffer reaches the file, then the error.
            let half = &buf[..buf.len() / 2];
            let _ = self.file.as_mut().expect("writer open").write_all(half);
            self.hasher.update(half);
            return Err(e);
        }
        let n = match self.file.as_mut().expect("writer open").write(buf) {
            Ok(n) => n,
            // Name the file: the caller's error may otherwise say only what it was writing.
            Err(e) => {
                let path = self.tmp_path.display();
                return Err(io::Error::new(e.kind(), format!("{path}: {e}")));
            }
        };
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("writer open").flush()
    }
}

impl BlobWriter {
    /// Flush, fsync, rename into place and fsync the directory. Returns the digest.
    pub fn finish(mut self) -> StateResult<Digest> {
        let sink = self.file.take().expect("writer open");
        let result = self.complete(sink);
        if result.is_err() {
            // Whatever failed (flush, fsync, rename), the partial file is not left behind.
            let _ = fs::remove_file(&self.tmp_path);
        }
        result
    }

    fn complete(&self, sink: Sink) -> StateResult<Digest> {
        let file = sink
            .into_file()
            .map_err(|e| StateError::io(&self.tmp_path, e))?;
        self.store
            .fault(FaultOp::BlobSync, &self.tmp_path)
            .and_then(|_| file.sync_all())
            .map_err(|e| StateError::io(&self.tmp_path, e))?;
        drop(file);
        let digest = Digest::from(self.hasher.clone().finalize());
        // An existing blob of the same size is kept (content is verified on every read); one
        // of another size is damaged and is replaced by the bytes just written.
        if self.store.size(&digest) == Some(self.size) {
            let _ = fs::remove_file(&self.tmp_path);
        } else {
            self.store.install(&self.tmp_path, &digest)?;
        }
        Ok(digest)
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// blake3 of a file's content, streamed.
pub fn hash_file(path: &Path) -> StateResult<Digest> {
    let mut f = File::open(path).map_err(|e| StateError::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| StateError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::from(hasher.finalize()))
}

pub(crate) fn sync_dir(dir: &Path) -> StateResult<()> {
    Ok(tsr_base::fsio::sync_dir(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let t = tempfile::tempdir().unwrap();
        let b = BlobStore::open(t.path().join("blobs"), t.path().join("tmp")).unwrap();
        (t, b)
    }

    #[test]
    fn put_read_verify() {
        let (_t, b) = store();
        let d = b.put_bytes(b"hello world").unwrap();
        assert_eq!(d, Digest::of(b"hello world"));
        assert_eq!(b.read(&d).unwrap(), b"hello world");
        // idempotent
        assert_eq!(b.put_bytes(b"hello world").unwrap(), d);
        assert_eq!(b.list().unwrap().0, vec![d]);
        assert_eq!(fs::read_dir(b.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn large_writer_stores_the_same_blob_as_writer() {
        let (_t, b) = store();
        let data: Vec<u8> = (0..20_000_123u32).map(|i| (i % 253) as u8).collect();
        let mut w = b.large_writer().unwrap();
        for chunk in data.chunks(777_777) {
            w.write_all(chunk).unwrap();
        }
        let d = w.finish().unwrap();
        assert_eq!(d, Digest::of(&data));
        assert_eq!(b.read(&d).unwrap(), data);
        assert_eq!(fs::read_dir(b.tmp_dir()).unwrap().count(), 0);
        // A dropped large writer leaves nothing behind either.
        let mut w = b.large_writer().unwrap();
        w.write_all(&data[..5_000_000]).unwrap();
        drop(w);
        assert_eq!(fs::read_dir(b.tmp_dir()).unwrap().count(), 0);
        assert_eq!(b.list().unwrap().0, vec![d]);
    }

    #[test]
    fn writing_a_blob_again_replaces_a_truncated_copy() {
        let (_t, b) = store();
        let d = b.put_bytes(b"optimizer moments").unwrap();
        fs::write(b.path(&d), b"optim").unwrap();
        assert!(b.read(&d).is_err());
        let mut w = b.large_writer().unwrap();
        w.write_all(b"optimizer moments").unwrap();
        assert_eq!(w.finish().unwrap(), d);
        assert_eq!(b.read(&d).unwrap(), b"optimizer moments");
    }

    #[test]
    fn flipped_byte_is_detected_on_read() {
        let (_t, b) = store();
        let d = b.put_bytes(b"some weights").unwrap();
        let p = b.path(&d);
        let mut bytes = fs::read(&p).unwrap();
        bytes[3] ^= 0x40;
        fs::write(&p, bytes).unwrap();
        let err = b.read(&d).unwrap_err();
        assert!(matches!(err, StateError::BlobCorrupt { .. }), "{err}");
        assert!(err.to_string().contains(&p.display().to_string()));
        assert!(b.verify(&d).is_err());
    }

    #[test]
    fn missing_blob_is_named() {
        let (_t, b) = store();
        let d = Digest::of(b"never written");
        let err = b.read(&d).unwrap_err();
        assert!(matches!(err, StateError::BlobMissing { .. }), "{err}");
        let err = b.require(&d).unwrap_err();
        assert!(matches!(err, StateError::BlobMissing { .. }), "{err}");
        let present = b.put_bytes(b"written").unwrap();
        b.require(&present).unwrap();
    }

    #[test]
    fn put_file_moves_into_place() {
        let (t, b) = store();
        let src = t.path().join("w.bin");
        fs::write(&src, vec![7u8; 3 << 20]).unwrap();
        let d = b.put_file(&src).unwrap();
        assert!(!src.exists());
        assert_eq!(b.read(&d).unwrap().len(), 3 << 20);
    }

    #[test]
    fn dropped_writer_leaves_no_tmp() {
        let (_t, b) = store();
        {
            let mut w = b.writer().unwrap();
            w.write_all(b"partial").unwrap();
        }
        assert_eq!(fs::read_dir(b.tmp_dir()).unwrap().count(), 0);
        assert!(b.list().unwrap().0.is_empty());
    }
}
