//! `metrics.csv` of a run directory: one typed row per logging step and per evaluation, written
//! by the trainer and read by the report (csv + serde both ways).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.csv";

/// One row. Empty cells are `None`: step 0 holds only the evaluation before training; a
/// logging row without an evaluation has no `eval_loss`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    /// Optimizer steps done.
    pub step: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean token loss over the steps since the previous row.
    pub loss: Option<f64>,
    /// Global gradient norm before clipping, of the last step.
    pub grad_norm: Option<f64>,
    pub learning_rate: Option<f64>,
    /// Tokens trained on so far (real tokens, no padding).
    pub tokens: usize,
    /// Training throughput since the previous row.
    pub tokens_per_s: Option<f64>,
    /// Wall time of the run so far (resumed runs continue the count).
    pub elapsed_s: f64,
    /// Peak memory so far: resident set on CPU.
    pub peak_mem_mib: f64,
    pub eval_loss: Option<f64>,
}

fn round(x: f64, decimals: i32) -> f64 {
    if !x.is_finite() {
        return x;
    }
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// `x` to `digits` significant digits (the learning rate spans many magnitudes).
fn significant(x: f64, digits: usize) -> f64 {
    format!("{x:.*e}", digits.saturating_sub(1))
        .parse()
        .unwrap_or(x)
}

impl MetricsRow {
    /// The row as written: readable precision (losses 6 decimals, times 2, rates 1).
    fn rounded(&self) -> Self {
        let r = |v: Option<f64>, d| v.map(|x| round(x, d));
        MetricsRow {
            epoch: round(self.epoch, 4),
            loss: r(self.loss, 6),
            grad_norm: r(self.grad_norm, 6),
            learning_rate: self.learning_rate.map(|x| significant(x, 7)),
            tokens_per_s: r(self.tokens_per_s, 1),
            elapsed_s: round(self.elapsed_s, 2),
            peak_mem_mib: round(self.peak_mem_mib, 1),
            eval_loss: r(self.eval_loss, 6),
            ..self.clone()
        }
    }
}

/// Reads every row of `<dir>/metrics.csv`.
pub fn read(dir: &Path) -> Result<Vec<MetricsRow>> {
    let path = dir.join(METRICS_FILE);
    let mut r = csv::Reader::from_path(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    r.deserialize()
        .enumerate()
        .map(|(i, row)| row.with_context(|| format!("{}: row {}", path.display(), i + 2)))
        .collect()
}

/// The open metrics log of a run: metrics.csv, and TensorBoard event files when the run
/// reports there (every row goes to both).
pub struct MetricsLog {
    path: PathBuf,
    w: csv::Writer<std::fs::File>,
    tensorboard: Option<super::tensorboard::EventWriter>,
}

impl MetricsLog {
    /// Opens `<dir>/metrics.csv` for appending: a fresh file with its header, or on resume the
    /// rows up to `keep_through_step` (later ones belong to the interrupted attempt and are
    /// dropped; the file is rewritten atomically first).
    pub fn open(dir: &Path, keep_through_step: Option<usize>) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let keep: Vec<MetricsRow> = match keep_through_step {
            Some(step) if path.exists() => {
                read(dir)?.into_iter().filter(|r| r.step <= step).collect()
            }
            _ => Vec::new(),
        };
        let mut w = csv::Writer::from_writer(Vec::new());
        if keep.is_empty() {
            // serde writes the header with the first row; an empty log still gets one
            w.write_record([
                "step",
                "epoch",
                "loss",
                "grad_norm",
                "learning_rate",
                "tokens",
                "tokens_per_s",
                "elapsed_s",
                "peak_mem_mib",
                "eval_loss",
            ])?;
        }
        for row in &keep {
            w.serialize(row)?;
        }
        let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::atomic::write_file(&path, &bytes)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(file);
        Ok(MetricsLog {
            path,
            w,
            tensorboard: None,
        })
    }

    /// Also writes every row to a new TensorBoard event file in `dir`. `resumed_at`: the step
    /// an attempt resumes from (what an earlier one logged after it is superseded, as in
    /// metrics.csv); a fresh run first records `args` (the run's arguments, as HF does).
    pub fn report_to_tensorboard(
        &mut self,
        dir: &Path,
        resumed_at: Option<usize>,
        args: &str,
    ) -> Result<()> {
        let mut w = super::tensorboard::EventWriter::create(dir, resumed_at)?;
        if resumed_at.is_none() {
            w.text(0, "args", args)?;
        }
        self.tensorboard = Some(w);
        Ok(())
    }

    /// Appends a row and flushes it to disk (a killed run keeps every row it logged).
    pub fn append(&mut self, row: &MetricsRow) -> Result<()> {
        self.w
            .serialize(row.rounded())
            .and_then(|_| Ok(self.w.flush()?))
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        if let Some(tb) = &mut self.tensorboard {
            tb.row(row)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_resume_drops_later_rows() {
        let d = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(d.path(), None).unwrap();
        let first = MetricsRow {
            eval_loss: Some(3.5),
            peak_mem_mib: 100.04,
            ..Default::default()
        };
        log.append(&first).unwrap();
        for step in [2, 4] {
            log.append(&MetricsRow {
                step,
                epoch: step as f64 / 10.0,
                loss: Some(1.0 / 3.0),
                grad_norm: Some(0.5),
                learning_rate: Some(2.0 / 3.0 * 1e-3),
                tokens: 100 * step,
                tokens_per_s: Some(123.456),
                elapsed_s: 1.0,
                ..Default::default()
            })
            .unwrap();
        }
        drop(log);
        let text = std::fs::read_to_string(d.path().join(METRICS_FILE)).unwrap();
        assert!(text.starts_with("step,epoch,loss,grad_norm,learning_rate,tokens,tokens_per_s,elapsed_s,peak_mem_mib,eval_loss\n"), "{text}");
        let rows = read(d.path()).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].loss, None);
        assert_eq!(rows[0].eval_loss, Some(3.5));
        assert_eq!(rows[1].loss, Some(0.333333));
        assert_eq!(rows[2].tokens_per_s, Some(123.5));
        assert_eq!(rows[2].learning_rate, Some(6.666667e-4));
        // resume at step 2: the step-4 row goes
        let mut log = MetricsLog::open(d.path(), Some(2)).unwrap();
        log.append(&MetricsRow {
            step: 3,
            ..Default::default()
        })
        .unwrap();
        let steps: Vec<usize> = read(d.path()).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, [0, 2, 3]);
    }
}
