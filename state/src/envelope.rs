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

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::records::{RunRecord, StepRecord};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes never panic the decoder: a record decodes or is a clear error.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<StepRecord>(b"Sx", &bytes);
            let _ = decode::<RunRecord>(b"Rx", &bytes);
        }

        /// A valid record with any single byte flipped never panics either.
        #[test]
        fn flipped_bytes_of_a_real_record_never_panic(pos in 0usize..200, bit in 0u8..8) {
            let rec = StepRecord {
                kind: "generate".into(), version: 1, config: "{\"k\":4}".into(), inputs: Default::default(),
                status: crate::StepStatus::Pending, attempts: 2, items_done: 5, items_total: Some(9), busy_ms: 10,
                checkpoint: None, first_run: "r".into(), first_node: "n".into(),
            };
            let mut bytes = encode(&rec);
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
            let _ = decode::<StepRecord>(b"Sx", &bytes);
        }
    }
}
