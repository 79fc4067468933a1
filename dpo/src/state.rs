//! The trainer checkpoint: everything besides the weights that an exact resume needs.
//!
//! A [`TrainerCheckpoint`] holds the data plan, the data cursor, the optimizer state bytes,
//! an optional RNG position and the tail of the metrics history. The model layer saves the
//! weights separately (safetensors); both are taken at an optimizer-step boundary, after the
//! update, so `cursor.optimizer_step == optimizer step count`.
//!
//! Encoding (all integers little-endian):
//!
//! ```text
//! magic            8 bytes  "TSRDPOCK"
//! format_version   u32      CHECKPOINT_FORMAT_VERSION; another value is UnsupportedVersion
//! header_len       u64
//! header           JSON     {plan, cursor, rng, metrics_tail}
//! optimizer_len    u64
//! optimizer        bytes    AdamW::save_state (safetensors)
//! digest           32 bytes blake3 of everything before it
//! ```
//!
//! The version is read before the digest is checked, so a file from a newer build reports
//! its version rather than "corrupt". Encoding is deterministic: equal checkpoints give equal
//! bytes.

use std::io::Write;

use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use super::{AdamW, BatchPlan, DataCursor, DpoError, StepMetrics};

/// Version written by [`TrainerCheckpoint::to_bytes`].
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;
/// How many of the latest [`StepMetrics`] a checkpoint keeps.
pub const METRICS_TAIL: usize = 64;
const MAGIC: &[u8; 8] = b"TSRDPOCK";
const WHAT: &str = "trainer checkpoint";

/// The position of a ChaCha20 generator, enough to rebuild it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// 32-byte key, as given to `from_seed`.
    pub seed: [u8; 32],
    /// Stream id.
    pub stream: u64,
    /// Position in the stream, in 32-bit words (decimal string: JSON numbers are not u128).
    #[serde(with = "u128_string")]
    pub word_pos: u128,
}

impl RngState {
    /// Captures a generator's position.
    pub fn capture(rng: &ChaCha20Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    /// Rebuilds the generator at the captured position.
    pub fn rebuild(&self) -> ChaCha20Rng {
        use rand_chacha::rand_core::SeedableRng;
        let mut rng = ChaCha20Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    plan: BatchPlan,
    cursor: DataCursor,
    rng: Option<RngState>,
    metrics_tail: Vec<StepMetrics>,
}

/// Trainer state at an optimizer-step boundary, weights excluded.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerCheckpoint {
    /// The data plan the cursor refers to.
    pub plan: BatchPlan,
    /// The next data position.
    pub cursor: DataCursor,
    /// [`AdamW::save_state`] bytes.
    pub optimizer_state: Vec<u8>,
    /// Position of an RNG the trainer draws from, if it has one.
    pub rng: Option<RngState>,
    /// The latest metrics, oldest first, at most [`METRICS_TAIL`].
    pub metrics_tail: Vec<StepMetrics>,
}

impl TrainerCheckpoint {
    /// Captures the trainer state. The cursor must be at a step boundary and agree with the
    /// optimizer's step count (accumulated gradients are never saved).
    pub fn capture(
        plan: &BatchPlan,
        cursor: &DataCursor,
        opt: &AdamW,
        rng: Option<RngState>,
        metrics: &[StepMetrics],
    ) -> Result<Self, DpoError> {
        check_capture(plan, cursor, opt)?;
        let tail = &metrics[metrics.len().saturating_sub(METRICS_TAIL)..];
        Ok(Self {
            plan: *plan,
            cursor: *cursor,
            optimizer_state: opt.save_state()?,
            rng,
            metrics_tail: tail.to_vec(),
        })
    }

    /// Restores the optimizer state into `opt` and returns the cursor to continue from.
    /// `plan` must equal the saved plan (same data, batch sizes and seed).
    pub fn restore(&self, plan: &BatchPlan, opt: &mut AdamW) -> Result<DataCursor, DpoError> {
        if *plan != self.plan {
            return Err(DpoError::PlanMismatch {
                saved: serde_json::to_string(&self.plan)?,
                current: serde_json::to_string(plan)?,
            });
        }
        plan.check_cursor(&self.cursor)?;
        opt.load_state(&self.optimizer_state)?;
        if opt.step_count() != self.cursor.optimizer_step {
            return Err(DpoError::Corrupt {
                what: WHAT,
                reason: format!(
                    "optimizer is at step {} but the cursor at step {}",
                    opt.step_count(),
                    self.cursor.optimizer_step
                ),
            });
        }
        Ok(self.cursor)
    }

    /// The versioned, digested encoding (see the module docs).
    pub fn to_bytes(&self) -> Result<Vec<u8>, DpoError> {
        let mut out = Vec::with_capacity(1024 + self.optimizer_state.len());
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Streams [`TrainerCheckpoint::to_bytes`]'s bytes into `w`, hashing as it writes.
    pub fn write_to(&self, w: &mut impl std::io::Write) -> Result<(), DpoError> {
        let header = Header {
            plan: self.plan,
            cursor: self.cursor,
            rng: self.rng,
            metrics_tail: self.metrics_tail.clone(),
        };
        write_encoding(&header, self.optimizer_state.len(), w, |w| {
            w.write_all(&self.optimizer_state)
                .map_err(|e| DpoError::Io {
                    what: WHAT,
                    source: e,
                })
        })
    }

    /// Writes the encoding of `TrainerCheckpoint::capture(plan, cursor, opt, rng, metrics)`
    /// into `w` without capturing: the optimizer state is streamed from the optimizer, never
    /// held as bytes (about 1 GB, and a fresh 1 GB buffer costs seconds of page faults the
    /// first time). The bytes equal `capture(..)?.to_bytes()`.
    pub fn write_captured(
        plan: &BatchPlan,
        cursor: &DataCursor,
        opt: &AdamW,
        rng: Option<RngState>,
        metrics: &[StepMetrics],
        w: &mut impl std::io::Write,
    ) -> Result<(), DpoError> {
        check_capture(plan, cursor, opt)?;
        let header = Header {
            plan: *plan,
            cursor: *cursor,
            rng,
            metrics_tail: metrics[metrics.len().saturating_sub(METRICS_TAIL)..].to_vec(),
        };
        write_encoding(&header, opt.state_len()?, w, |w| opt.write_state(w))
    }

    /// Decodes [`TrainerCheckpoint::to_bytes`] output, checking magic, version and digest.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DpoError> {
        let corrupt = |reason: &str| DpoError::Corrupt {
            what: WHAT,
            reason: reason.to_string(),
        };
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(corrupt("not a trainer checkpoint (bad magic)"));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != CHECKPOINT_FORMAT_VERSION {
            return Err(DpoError::UnsupportedVersion {
                what: WHAT,
                found: version,
                supported: CHECKPOINT_FORMAT_VERSION,
            });
        }
        if bytes.len() < 12 + 8 + 8 + 32 {
            return Err(corrupt("truncated"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != digest {
            return Err(corrupt("digest mismatch (truncated or modified)"));
        }
        let mut at = 12usize;
        let mut take = |n: usize| -> Result<&[u8], DpoError> {
            let end = at.checked_add(n).filter(|&e| e <= body.len());
            let end = end.ok_or_else(|| corrupt("length field points past the end"))?;
            let s = &body[at..end];
            at = end;
            Ok(s)
        };
        let len = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize;
        let header_len = len(take(8)?);
        let header: Header = serde_json::from_slice(take(header_len)?)?;
        let opt_len = len(take(8)?);
        let optimizer_state = take(opt_len)?.to_vec();
        if at != body.len() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Self {
            plan: header.plan,
            cursor: header.cursor,
            optimizer_state,
            rng: header.rng,
            metrics_tail: header.metrics_tail,
        })
    }
}

fn check_capture(plan: &BatchPlan, cursor: &DataCursor, opt: &AdamW) -> Result<(), DpoError> {
    plan.check_cursor(cursor)?;
    if !cursor.at_step_boundary() || cursor.optimizer_step != opt.step_count() {
        return Err(DpoError::InvalidConfig(format!(
            "checkpoint needs a cursor at a step boundary matching optimizer step {}, got {cursor:?}",
            opt.step_count()
        )));
    }
    Ok(())
}

/// Writes magic, version, header, the optimizer state (`opt_len` bytes from `write_opt`) and
/// the blake3 digest of all of it (see the module docs).
fn write_encoding(
    header: &Header,
    opt_len: usize,
    w: &mut impl std::io::Write,
    write_opt: impl FnOnce(&mut dyn std::io::Write) -> Result<(), DpoError>,
) -> Result<(), DpoError> {
    struct Hashing<'a, W: std::io::Write> {
        inner: &'a mut W,
        hasher: blake3::Hasher,
        written: usize,
    }
    impl<W: std::io::Write> std::io::Write for Hashing<'_, W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hasher.update(&buf[..n]);
            self.written += n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let io = |e: std::io::Error| DpoError::Io {
        what: WHAT,
        source: e,
    };
    let header = serde_json::to_vec(header)?;
    let mut h = Hashing {
        inner: w,
        hasher: blake3::Hasher::new(),
        written: 0,
    };
    h.write_all(MAGIC).map_err(io)?;
    h.write_all(&CHECKPOINT_FORMAT_VERSION.to_le_bytes())
        .map_err(io)?;
    h.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    h.write_all(&header).map_err(io)?;
    h.write_all(&(opt_len as u64).to_le_bytes()).map_err(io)?;
    let before = h.written;
    write_opt(&mut h)?;
    if h.written - before != opt_len {
        return Err(DpoError::InvalidConfig(format!(
            "optimizer state wrote {} bytes, announced {opt_len}",
            h.written - before
        )));
    }
    let digest = h.hasher.finalize();
    h.inner.write_all(digest.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AdamWConfig;
    use candle_core::{Device, Tensor, Var};
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    fn sample() -> (BatchPlan, AdamW, TrainerCheckpoint) {
        let plan = BatchPlan::new(10, 2, 2, 3, true).unwrap();
        let w = Var::from_tensor(&Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap()).unwrap();
        let opt = AdamW::new(vec![("w".to_string(), w)], AdamWConfig::default()).unwrap();
        let metrics: Vec<StepMetrics> = (1..=70)
            .map(|s| StepMetrics {
                step: s,
                lr: 1e-3 * (s as f64).sqrt(),
                loss: (s as f64 * 0.1).sin() / 3.0,
                grad_norm: 1.0 / (s as f64 * 1e10) - 0.010532736778259276,
                clipped: false,
                pairs: 4,
                micro_batches: 2,
                dpo: None,
            })
            .collect();
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        rng.next_u64();
        let ck = TrainerCheckpoint::capture(
            &plan,
            &DataCursor::default(),
            &opt,
            Some(RngState::capture(&rng)),
            &metrics,
        )
        .unwrap();
        (plan, opt, ck)
    }

    #[test]
    fn round_trip_is_exact_and_deterministic() {
        let (plan, mut opt, ck) = sample();
        assert_eq!(ck.metrics_tail.len(), METRICS_TAIL);
        assert_eq!(ck.metrics_tail[0].step, 70 - METRICS_TAIL as u64 + 1);
        let bytes = ck.to_bytes().unwrap();
        assert_eq!(bytes, ck.to_bytes().unwrap());
        let back = TrainerCheckpoint::from_bytes(&bytes).unwrap();
        assert_eq!(back, ck);
        let mut streamed = Vec::new();
        let metrics: Vec<StepMetrics> = ck.metrics_tail.clone();
        TrainerCheckpoint::write_captured(&plan, &ck.cursor, &opt, ck.rng, &metrics, &mut streamed)
            .unwrap();
        assert_eq!(streamed, bytes, "streaming writes the same bytes");
        assert_eq!(
            back.restore(&plan, &mut opt).unwrap(),
            DataCursor::default()
        );

        let mut a = ChaCha20Rng::seed_from_u64(9);
        a.next_u64();
        let mut b = back.rng.unwrap().rebuild();
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn unknown_version_corruption_and_plan_change_are_clear_errors() {
        let (plan, mut opt, ck) = sample();
        let bytes = ck.to_bytes().unwrap();

        let mut v2 = bytes.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let err = TrainerCheckpoint::from_bytes(&v2).unwrap_err();
        assert!(
            matches!(
                err,
                DpoError::UnsupportedVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );

        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert!(matches!(
            TrainerCheckpoint::from_bytes(&flipped),
            Err(DpoError::Corrupt { .. })
        ));
        assert!(TrainerCheckpoint::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(TrainerCheckpoint::from_bytes(b"nonsense").is_err());

        let other = BatchPlan { seed: 4, ..plan };
        assert!(matches!(
            ck.restore(&other, &mut opt),
            Err(DpoError::PlanMismatch { .. })
        ));
    }
}
