//! Content digests (blake3, 32 bytes) used for blobs, step keys and model identities.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

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
