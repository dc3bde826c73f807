//! Learning-rate schedules with HF `get_scheduler` semantics: the learning rate of optimizer
//! step `s` (0-based) is `lr * factor(s)`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum SchedulerType {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
    Polynomial,
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub kind: SchedulerType,
    pub lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

/// HF's polynomial defaults.
const POLY_LR_END: f64 = 1e-7;
const POLY_POWER: f64 = 1.0;

impl Schedule {
    pub fn lr_at(&self, step: usize) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps.max(1));
        let warm = |s: usize| {
            if s < w {
                Some(s as f64 / w.max(1) as f64)
            } else {
                None
            }
        };
        match self.kind {
            SchedulerType::Constant => self.lr,
            SchedulerType::ConstantWithWarmup => self.lr * warm(step).unwrap_or(1.0),
            SchedulerType::Linear => {
                self.lr
                    * warm(step).unwrap_or_else(|| {
                        ((t.saturating_sub(step)) as f64 / (t.saturating_sub(w)).max(1) as f64)
                            .max(0.0)
                    })
            }
            SchedulerType::Cosine => {
                self.lr
                    * warm(step).unwrap_or_else(|| {
                        let p = (step - w) as f64 / (t.saturating_sub(w)).max(1) as f64;
                        (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
                    })
            }
            SchedulerType::Polynomial => {
                if let Some(f) = warm(step) {
                    return self.lr * f;
                }
                if step > t {
                    return POLY_LR_END;
                }
                let remaining = 1.0 - (step - w) as f64 / (t.saturating_sub(w)).max(1) as f64;
                (self.lr - POLY_LR_END) * remaining.powf(POLY_POWER) + POLY_LR_END
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: SchedulerType) -> Schedule {
        Schedule {
            kind,
            lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
        }
    }

    #[test]
    fn shapes() {
        let l = s(SchedulerType::Linear);
        assert_eq!(l.lr_at(0), 0.0);
        assert_eq!(l.lr_at(5), 0.5);
        assert_eq!(l.lr_at(10), 1.0);
        assert_eq!(l.lr_at(60), 0.5);
        assert_eq!(l.lr_at(110), 0.0);
        let c = s(SchedulerType::Cosine);
        assert_eq!(c.lr_at(10), 1.0);
        assert!((c.lr_at(60) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(110).abs() < 1e-12);
        assert!(c.lr_at(35) > l.lr_at(35), "cosine stays higher early");
        assert_eq!(s(SchedulerType::Constant).lr_at(0), 1.0);
        let cw = s(SchedulerType::ConstantWithWarmup);
        assert_eq!((cw.lr_at(2), cw.lr_at(100)), (0.2, 1.0));
        let p = s(SchedulerType::Polynomial);
        assert!((p.lr_at(60) - (0.5 * (1.0 - 1e-7) + 1e-7)).abs() < 1e-12);
        assert!((p.lr_at(110) - 1e-7).abs() < 1e-15);
        // monotone decay after warmup for the decaying schedules
        for k in [
            SchedulerType::Linear,
            SchedulerType::Cosine,
            SchedulerType::Polynomial,
        ] {
            let x = s(k);
            for i in 10..110 {
                assert!(x.lr_at(i + 1) <= x.lr_at(i), "{k:?} at {i}");
            }
        }
    }
}
