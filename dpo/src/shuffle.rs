//! Deterministic epoch order and a resumable data cursor for gradient accumulation.
//!
//! Epoch `e`'s order is a Fisher-Yates shuffle driven by ChaCha20 seeded from the run's seed,
//! on stream `e` (ChaCha's 64-bit stream id keeps epochs independent without mixing seed and
//! epoch arithmetically). The bounded draws use our own rejection sampling on `next_u64`, not
//! `rand`'s `gen_range`, whose algorithm has changed between `rand` releases: the order
//! depends only on ChaCha20's output, which is specified.
//!
//! Batching rule: an optimizer step consumes `micro_batch * accum_steps` consecutive pairs of
//! the epoch order, split into micro-batches of `micro_batch`. Steps never cross an epoch
//! boundary: the last step of an epoch takes what is left (fewer pairs, possibly fewer
//! micro-batches). Nothing is skipped or repeated, unlike trainers that drop the last
//! partial batch or skip up to a batch on resume.
//!
//! [`DataCursor`] names the next pair to consume. [`BatchPlan::next_micro_batch`] and
//! [`BatchPlan::next_batch`] are pure functions `cursor -> (indices, next cursor)`, so a
//! serialised cursor resumes exactly where the run stopped.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use super::DpoError;

/// A uniform integer in `0..bound` (`bound > 0`), unbiased by rejection.
fn below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    // 2^64 mod bound values at the bottom of the range would be over-represented; skip them.
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let x = rng.next_u64();
        if x >= threshold {
            return x % bound;
        }
    }
}

/// The order of `n` items in `epoch` for `seed`: a permutation of `0..n`.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// How a dataset of pairs is cut into optimizer steps and micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// Number of pairs in the dataset.
    pub n_pairs: usize,
    /// Pairs per forward/backward pass.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accum_steps: usize,
    /// Shuffle seed.
    pub seed: u64,
    /// Shuffle each epoch (`false`: dataset order every epoch).
    pub shuffle: bool,
}

/// Where a run stands in its data. Serialise it with a checkpoint to resume exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataCursor {
    /// Current epoch, from 0.
    pub epoch: u64,
    /// Index into the epoch order of the next pair to consume.
    pub position_in_epoch: usize,
    /// Optimizer steps completed since the start of training.
    pub optimizer_step: u64,
    /// Micro-batches of the current optimizer step already consumed (0 at a step boundary).
    pub micro_step: usize,
}

impl DataCursor {
    /// Whether the cursor sits between optimizer steps (the only place a checkpoint can be
    /// taken, since accumulated gradients are not saved).
    pub fn at_step_boundary(&self) -> bool {
        self.micro_step == 0
    }
}

/// One micro-batch: dataset indices, and whether it completes its optimizer step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Dataset indices of the pairs, in epoch order.
    pub indices: Vec<usize>,
    /// The epoch these pairs belong to.
    pub epoch: u64,
    /// This micro-batch is the last of its optimizer step.
    pub last_in_step: bool,
}

/// All micro-batches of one optimizer step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Dataset indices per micro-batch.
    pub micro_batches: Vec<Vec<usize>>,
    /// The epoch these pairs belong to.
    pub epoch: u64,
}

impl Batch {
    /// Total number of pairs in the step.
    pub fn pairs(&self) -> usize {
        self.micro_batches.iter().map(Vec::len).sum()
    }
}

impl BatchPlan {
    /// A validated plan.
    pub fn new(
        n_pairs: usize,
        micro_batch: usize,
        accum_steps: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<Self, DpoError> {
        let plan = Self {
            n_pairs,
            micro_batch,
            accum_steps,
            seed,
            shuffle,
        };
        plan.validate()?;
        Ok(plan)
    }

    fn validate(&self) -> Result<(), DpoError> {
        if self.n_pairs == 0 || self.micro_batch == 0 || self.accum_steps == 0 {
            return Err(DpoError::InvalidConfig(format!(
                "batch plan needs pairs, micro_batch and accum_steps > 0: {self:?}"
            )));
        }
        Ok(())
    }

    /// Pairs per optimizer step (`micro_batch * accum_steps`), the last step of an epoch
    /// excepted.
    pub fn batch_size(&self) -> usize {
        self.micro_batch * self.accum_steps
    }

    /// Optimizer steps per epoch: `ceil(n_pairs / batch_size)`.
    pub fn steps_per_epoch(&self) -> u64 {
        self.n_pairs.div_ceil(self.batch_size()) as u64
    }

    /// The order of the dataset in `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        if self.shuffle {
            epoch_permutation(self.n_pairs, self.seed, epoch)
        } else {
            (0..self.n_pairs).collect()
        }
    }

    /// Checks that `cursor` is one this plan can produce.
    pub fn check_cursor(&self, cursor: &DataCursor) -> Result<(), DpoError> {
        self.validate()?;
        let pos = cursor.position_in_epoch;
        let in_step = pos % self.batch_size();
        let ok = pos < self.n_pairs
            && cursor.micro_step < self.accum_steps
            && in_step == cursor.micro_step * self.micro_batch
            && cursor.optimizer_step
                >= cursor.epoch * self.steps_per_epoch() + (pos / self.batch_size()) as u64;
        if ok {
            Ok(())
        } else {
            Err(DpoError::Corrupt {
                what: "data cursor",
                reason: format!("{cursor:?} is not a position of plan {self:?}"),
            })
        }
    }

    /// The next micro-batch and the cursor after it.
    pub fn next_micro_batch(
        &self,
        cursor: &DataCursor,
    ) -> Result<(MicroBatch, DataCursor), DpoError> {
        self.check_cursor(cursor)?;
        let pos = cursor.position_in_epoch;
        let step_start = pos - pos % self.batch_size();
        let step_end = (step_start + self.batch_size()).min(self.n_pairs);
        let end = (pos + self.micro_batch).min(step_end);
        let indices = self.order(cursor.epoch)[pos..end].to_vec();
        let last_in_step = end == step_end;
        let next = if !last_in_step {
            DataCursor {
                position_in_epoch: end,
                micro_step: cursor.micro_step + 1,
                ..*cursor
            }
        } else if end == self.n_pairs {
            DataCursor {
                epoch: cursor.epoch + 1,
                position_in_epoch: 0,
                optimizer_step: cursor.optimizer_step + 1,
                micro_step: 0,
            }
        } else {
            DataCursor {
                epoch: cursor.epoch,
                position_in_epoch: end,
                optimizer_step: cursor.optimizer_step + 1,
                micro_step: 0,
            }
        };
        let batch = MicroBatch {
            indices,
            epoch: cursor.epoch,
            last_in_step,
        };
        Ok((batch, next))
    }

    /// All micro-batches of the next optimizer step; `cursor` must be at a step boundary.
    pub fn next_batch(&self, cursor: &DataCursor) -> Result<(Batch, DataCursor), DpoError> {
        if !cursor.at_step_boundary() {
            return Err(DpoError::InvalidConfig(format!(
                "next_batch needs a cursor at a step boundary, got {cursor:?}"
            )));
        }
        let mut micro_batches = Vec::with_capacity(self.accum_steps);
        let mut cur = *cursor;
        loop {
            let (mb, next) = self.next_micro_batch(&cur)?;
            micro_batches.push(mb.indices);
            cur = next;
            if mb.last_in_step {
                break;
            }
        }
        Ok((
            Batch {
                micro_batches,
                epoch: cursor.epoch,
            },
            cur,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn permutation_is_pinned_and_valid() {
        // Pinned: a change here changes every run's data order (and its step keys).
        assert_eq!(epoch_permutation(10, 42, 0), PINNED_42_0);
        for (n, seed, epoch) in [(0, 1, 0), (1, 1, 0), (17, 3, 5), (1000, 9, 2)] {
            let mut p = epoch_permutation(n, seed, epoch);
            assert_eq!(p, epoch_permutation(n, seed, epoch));
            p.sort();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
        assert_ne!(epoch_permutation(50, 1, 0), epoch_permutation(50, 1, 1));
        assert_ne!(epoch_permutation(50, 1, 0), epoch_permutation(50, 2, 0));
    }
    const PINNED_42_0: [usize; 10] = [4, 2, 0, 1, 9, 7, 3, 5, 8, 6];

    #[test]
    fn batches_cover_each_epoch_once_with_a_short_last_step() {
        let plan = BatchPlan::new(11, 2, 2, 7, true).unwrap();
        assert_eq!(plan.steps_per_epoch(), 3);
        let mut cur = DataCursor::default();
        let mut sizes = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (b, next) = plan.next_batch(&cur).unwrap();
            sizes.push(b.micro_batches.iter().map(Vec::len).collect::<Vec<_>>());
            seen.extend(b.micro_batches.concat());
            cur = next;
        }
        assert_eq!(sizes, vec![vec![2, 2], vec![2, 2], vec![2, 1]]);
        seen.sort();
        assert_eq!(seen, (0..11).collect::<Vec<_>>());
        assert_eq!(
            cur,
            DataCursor {
                epoch: 1,
                position_in_epoch: 0,
                optimizer_step: 3,
                micro_step: 0
            }
        );
    }

    /// Interrupt at random micro-batches, round-trip the cursor through JSON, rebuild the
    /// plan, and count: every pair exactly once per epoch.
    #[test]
    fn random_interruptions_neither_skip_nor_repeat() {
        let mut chaos = ChaCha8Rng::seed_from_u64(5);
        for (n, mb, acc) in [(23, 3, 4), (24, 4, 2), (5, 8, 3), (1, 1, 1), (97, 5, 1)] {
            let epochs = 4u64;
            let mut counts = vec![vec![0u32; n]; epochs as usize];
            let mut cur = DataCursor::default();
            let mut steps = 0u64;
            while cur.epoch < epochs {
                let plan = BatchPlan::new(n, mb, acc, 11, true).unwrap();
                let (m, next) = plan.next_micro_batch(&cur).unwrap();
                for i in m.indices {
                    counts[m.epoch as usize][i] += 1;
                }
                steps += m.last_in_step as u64;
                cur = next;
                if chaos.next_u32() % 3 == 0 {
                    let json = serde_json::to_string(&cur).unwrap();
                    cur = serde_json::from_str(&json).unwrap();
                }
            }
            for (e, c) in counts.iter().enumerate() {
                assert!(c.iter().all(|&k| k == 1), "n={n} epoch {e}: {c:?}");
            }
            let plan = BatchPlan::new(n, mb, acc, 11, true).unwrap();
            assert_eq!(steps, epochs * plan.steps_per_epoch());
            assert_eq!(cur.optimizer_step, steps);
        }
    }

    #[test]
    fn foreign_cursors_are_rejected() {
        let plan = BatchPlan::new(10, 2, 2, 0, false).unwrap();
        let bad = [
            DataCursor {
                position_in_epoch: 10,
                ..Default::default()
            },
            DataCursor {
                position_in_epoch: 1,
                ..Default::default()
            },
            DataCursor {
                position_in_epoch: 2,
                micro_step: 0,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(plan.next_micro_batch(&c).is_err(), "{c:?}");
        }
        let mid = DataCursor {
            position_in_epoch: 2,
            micro_step: 1,
            ..Default::default()
        };
        assert!(plan.next_micro_batch(&mid).is_ok());
        assert!(plan.next_batch(&mid).is_err());
        assert!(BatchPlan::new(0, 1, 1, 0, true).is_err());
    }
}
