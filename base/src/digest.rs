//! Content digests (blake3, 32 bytes) used for blobs, step keys and model identities.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::PathError;

/// A blake3 digest. Displayed and parsed as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of a byte string.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// The first 12 hex characters, for tables and messages.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }

    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

/// Error for a string that is not 64 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a digest: expected 64 hexadecimal characters")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadDigest(s.to_string()));
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).map_err(|_| BadDigest(s.to_string()))?;
            out[i] = u8::from_str_radix(hex, 16).map_err(|_| BadDigest(s.to_string()))?;
        }
        Ok(Digest(out))
    }
}

/// Content fingerprint of an external input: blake3 of a file, or of a folder's sorted
/// (relative path, file digest) list.
pub fn fingerprint(path: &Path) -> Result<Digest, PathError> {
    let meta = std::fs::metadata(path).map_err(PathError::at(path))?;
    if meta.is_file() {
        return hash_file(path);
    }
    let mut files = Vec::new();
    collect_files(path, path, &mut files)?;
    files.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"tsr-dir-v1\0");
    for rel in files {
        let d = hash_file(&path.join(&rel))?;
        h.update(rel.to_string_lossy().as_bytes());
        h.update(b"\0");
        h.update(&d.0);
    }
    Ok(Digest::from(h.finalize()))
}

fn hash_file(path: &Path) -> Result<Digest, PathError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(PathError::at(path))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(PathError::at(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::from(h.finalize()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PathError> {
    for entry in std::fs::read_dir(dir).map_err(PathError::at(dir))? {
        let p = entry.map_err(PathError::at(dir))?.path();
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else {
            out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
        }
    }
    Ok(())
}

/// Serde as 64 hex characters, for records that store a digest as text (models in pairs,
/// judgements and evaluations): `#[serde(with = "tsr_base::hex")]`.
pub mod hex {
    use super::Digest;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }

    /// An optional digest: hex, or `null`.
    pub mod option {
        use super::Digest;
        use serde::{de::Error, Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(d: &Option<Digest>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.collect_str(d),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Digest>, D::Error> {
            Option::<std::borrow::Cow<str>>::deserialize(d)?
                .map(|s| s.parse().map_err(D::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert!("xyz".parse::<Digest>().is_err());
        assert!(s[..63].parse::<Digest>().is_err());
    }
}
