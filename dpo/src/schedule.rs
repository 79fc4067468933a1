//! Learning-rate schedules: linear warmup, then constant, linear decay or cosine decay.
//!
//! [`LrSchedule::lr_at`] is a pure function of the optimizer step about to be taken
//! (0-based: the first update uses `lr_at(0)`), so a resumed run recomputes exactly the same
//! rate from the optimizer's step count and nothing about the schedule needs saving.
//!
//! Warmup is `peak * (step + 1) / warmup_steps` for `step < warmup_steps`: unlike Hugging
//! Face's `step / warmup` it never spends an update at learning rate zero. After warmup the
//! decay runs over `total_steps - warmup_steps` steps from `peak` down to
//! `peak * min_lr_ratio` and stays there.

use serde::{Deserialize, Serialize};

use super::DpoError;

/// The shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Stay at the peak.
    Constant,
    /// Straight line down to `peak * min_lr_ratio` at `total_steps`.
    Linear,
    /// Half cosine down to `peak * min_lr_ratio` at `total_steps`.
    Cosine,
}

/// A learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Learning rate after warmup.
    pub peak_lr: f64,
    /// Number of warmup steps (0: none).
    pub warmup_steps: u64,
    /// Step at which the decay reaches its floor; ignored by [`Decay::Constant`].
    pub total_steps: u64,
    /// Shape after warmup.
    pub decay: Decay,
    /// Floor of the decay as a fraction of `peak_lr`, in [0, 1].
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// A constant rate without warmup.
    pub fn constant(lr: f64) -> Self {
        Self {
            peak_lr: lr,
            warmup_steps: 0,
            total_steps: 0,
            decay: Decay::Constant,
            min_lr_ratio: 1.0,
        }
    }

    /// Checks that the numbers make a schedule.
    pub fn validate(&self) -> Result<(), DpoError> {
        let ok = self.peak_lr.is_finite()
            && self.peak_lr >= 0.0
            && (0.0..=1.0).contains(&self.min_lr_ratio)
            && (self.decay == Decay::Constant || self.total_steps >= self.warmup_steps);
        if ok {
            Ok(())
        } else {
            Err(DpoError::InvalidConfig(format!(
                "learning-rate schedule {self:?}"
            )))
        }
    }

    /// The learning rate of the update with 0-based index `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps);
        let progress = if span == 0 {
            1.0
        } else {
            ((step - self.warmup_steps) as f64 / span as f64).min(1.0)
        };
        let floor = self.peak_lr * self.min_lr_ratio;
        match self.decay {
            Decay::Constant => self.peak_lr,
            Decay::Linear => floor + (self.peak_lr - floor) * (1.0 - progress),
            Decay::Cosine => {
                floor
                    + (self.peak_lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> LrSchedule {
        LrSchedule {
            peak_lr: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            decay,
            min_lr_ratio: 0.1,
        }
    }

    #[test]
    fn warmup_is_linear_and_never_zero() {
        for d in [Decay::Constant, Decay::Linear, Decay::Cosine] {
            let s = sched(d);
            s.validate().unwrap();
            let w: Vec<f64> = (0..4).map(|i| s.lr_at(i)).collect();
            assert_eq!(w, vec![0.25, 0.5, 0.75, 1.0]);
            assert_eq!(s.lr_at(4), 1.0);
        }
    }

    #[test]
    fn decays_reach_the_floor_and_stay() {
        let lin = sched(Decay::Linear);
        assert!((lin.lr_at(9) - 0.55).abs() < 1e-12);
        assert!((lin.lr_at(14) - 0.1).abs() < 1e-12);
        assert!((lin.lr_at(1000) - 0.1).abs() < 1e-12);
        let cos = sched(Decay::Cosine);
        assert!((cos.lr_at(9) - 0.55).abs() < 1e-12);
        assert!(cos.lr_at(6) > lin.lr_at(6));
        assert!((cos.lr_at(14) - 0.1).abs() < 1e-12);
        assert_eq!(sched(Decay::Constant).lr_at(1000), 1.0);
        assert_eq!(LrSchedule::constant(3e-4).lr_at(0), 3e-4);
        let mut monotone = sched(Decay::Cosine);
        monotone.min_lr_ratio = 0.0;
        let lrs: Vec<f64> = (4..20).map(|i| monotone.lr_at(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn invalid_schedules_are_rejected() {
        let mut s = sched(Decay::Linear);
        s.total_steps = 2;
        assert!(s.validate().is_err());
        let mut s = sched(Decay::Cosine);
        s.min_lr_ratio = 2.0;
        assert!(s.validate().is_err());
    }
}
