//! `--report-to tensorboard`: every row the trainer logs, as TensorBoard scalars under HF
//! Trainer's tags (`train/loss`, `train/grad_norm`, `train/learning_rate`, `train/epoch`,
//! `eval/loss`, plus `train/tokens_per_second` and `train/peak_memory_mib`), and the run's
//! arguments as a text summary (`args`, as HF writes them), in TensorBoard event files.
//!
//! The format: TFRecord framing (length, masked CRC32C of it, the record, its masked CRC32C;
//! the checksum from the `crc32c` crate) of `tensorflow.Event` protobuf messages, encoded by
//! `prost` from the message definitions below (the fields dialora writes, with TensorFlow's
//! field numbers). Each attempt of a run writes a new file in the log directory and flushes
//! it at every row, so a live TensorBoard follows the run; a resumed attempt starts with a
//! `SessionLog START` at the step after its checkpoint, by which TensorBoard's reader drops
//! what the interrupted attempt logged past it: each step appears once.

use super::metrics::MetricsRow;
use anyhow::{Context, Result};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `SessionLog.status`: START (a run (re)starts here).
const SESSION_START: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Kind", tags = "2, 8")]
    kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

/// `DataType.DT_STRING`.
const DT_STRING: i32 = 7;

#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    /// A scalar: an empty shape.
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShape {}

/// The CRC32C that TFRecord stores, masked as it specifies.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The default log directory of a run: `OUTPUT_DIR/runs` (HF: `OUTPUT_DIR/runs/DATE_HOST`,
/// one per attempt; dialora keeps a run's attempts in one directory, so a resumed run is one
/// line in TensorBoard).
pub fn default_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("runs")
}

/// An event file being written.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// A new event file in `dir` (created if needed). `resumed_at`: the step the attempt
    /// resumes from; what an earlier attempt logged after it is superseded.
    pub fn create(dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the log directory", dir.display()))?;
        let host = super::hostname().unwrap_or_else(|| "localhost".into());
        let secs = now() as u64;
        let path = dir.join(format!(
            "events.out.tfevents.{secs}.{host}.{}.0",
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = EventWriter { path, file };
        w.write(0, What::FileVersion("brain.Event:2".into()))?;
        if let Some(step) = resumed_at {
            w.write(
                step as i64 + 1,
                What::SessionLog(SessionLog {
                    status: SESSION_START,
                }),
            )?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, step: i64, what: What) -> Result<()> {
        let data = Event {
            wall_time: now(),
            step,
            what: Some(what),
        }
        .encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// Scalars at `step`, one event.
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| Value {
                tag: tag.to_string(),
                metadata: None,
                kind: Some(Kind::SimpleValue(*v as f32)),
            })
            .collect::<Vec<_>>();
        if value.is_empty() {
            return Ok(());
        }
        self.write(step as i64, What::Summary(Summary { value }))
    }

    /// A text summary (TensorBoard's text plugin: a string tensor, shown as Markdown).
    pub fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        let value = Value {
            tag: tag.to_string(),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".into(),
                    content: Vec::new(),
                }),
            }),
            kind: Some(Kind::Tensor(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShape {}),
                string_val: vec![text.as_bytes().to_vec()],
            })),
        };
        self.write(step as i64, What::Summary(Summary { value: vec![value] }))
    }

    /// A row of metrics.csv under HF Trainer's tags: a training row's values as `train/...`,
    /// an evaluation as `eval/loss`.
    pub fn row(&mut self, r: &MetricsRow) -> Result<()> {
        let mut v: Vec<(&str, f64)> = Vec::new();
        if let Some(l) = r.loss {
            v.push(("train/loss", l));
            v.extend(r.grad_norm.map(|g| ("train/grad_norm", g)));
            v.extend(r.learning_rate.map(|x| ("train/learning_rate", x)));
            v.push(("train/epoch", r.epoch));
            v.extend(r.tokens_per_s.map(|x| ("train/tokens_per_second", x)));
            v.push(("train/peak_memory_mib", r.peak_mem_mib));
        }
        v.extend(r.eval_loss.map(|e| ("eval/loss", e)));
        self.scalars(r.step, &v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_masked_crc32c() {
        // the CRC32C check value, and the mask on the empty record
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        let d = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(d.path(), Some(4)).unwrap();
        w.scalars(5, &[("train/loss", 1.5), ("skipped", f64::NAN)])
            .unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // walk the records: each length and payload checks out, three events
        let (mut at, mut events) = (0, Vec::new());
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        assert_eq!(
            (events[1].step, &events[1].what),
            (5, &Some(What::SessionLog(SessionLog { status: 1 })))
        );
        match &events[2].what {
            Some(What::Summary(s)) => {
                assert_eq!(s.value.len(), 1, "the NaN is left out");
                assert_eq!(s.value[0].tag, "train/loss");
                assert_eq!(s.value[0].kind, Some(Kind::SimpleValue(1.5)));
            }
            other => panic!("{other:?}"),
        }
    }
}
