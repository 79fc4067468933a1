//! Versioned envelopes for persisted values: a big-endian u16 schema version followed by the
//! bincode payload. A record written by another schema version is a clear error, never a
//! silent misread.

use crate::error::{StateError, StateResult};
use serde::{de::DeserializeOwned, Serialize};

/// A persisted record type: a name for messages and the schema version it is written with.
/// Bump `VERSION` whenever the serialized shape changes.
pub trait Versioned: Serialize + DeserializeOwned {
    const WHAT: &'static str;
    const VERSION: u16;
}

pub fn encode<T: Versioned>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&T::VERSION.to_be_bytes());
    // bincode serialization of plain data into a Vec cannot fail.
    bincode::serialize_into(&mut out, value).expect("bincode serialization into a Vec");
    out
}

pub fn decode<T: Versioned>(key: &[u8], bytes: &[u8]) -> StateResult<T> {
    let key = crate::keys::display(key);
    if bytes.len() < 2 {
        return Err(StateError::Corrupt {
            what: T::WHAT,
            key,
            reason: format!("{} bytes, shorter than the version header", bytes.len()),
        });
    }
    let version = u16::from_be_bytes([bytes[0], bytes[1]]);
    if version != T::VERSION {
        return Err(StateError::UnknownSchema {
            what: T::WHAT,
            key,
            found: version,
            supported: T::VERSION,
        });
    }
    bincode::deserialize(&bytes[2..]).map_err(|e| StateError::Corrupt {
        what: T::WHAT,
        key,
        reason: e.to_string(),
    })
}
