//! The LoRA training loop: data, loss normalised over the accumulated batch, AdamW with a
//! schedule and clipping, evaluation, checkpoints and resume, signals, the divergence guard,
//! and the run's records (`metrics.csv` rows, `run.json`).

use super::args::{IntervalStrategy, TrainArgs};
use super::batches;
use super::checkpoint::{self, TrainerState};
use super::comm::{self, Communicator};
use super::metrics::{MetricsLog, MetricsRow};
use super::optim::{self, AdamW, AdamWConfig};
use super::run::{file_sha256, DataInfo, ModelInfo, RunRecord, RunStatus, Versions};
use super::schedule::Schedule;
use crate::data::shards::{check_tokenizer, Meta, ShardReader};
use crate::lora::{Adapter, LoraConfig};
use crate::model::{Grads, Llama, TrainCtx};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a training run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed {
        adapter_dir: PathBuf,
        final_eval_loss: Option<f64>,
        first_eval_loss: Option<f64>,
        /// The best evaluation after a training step: (step, metric).
        best: Option<(usize, f64)>,
        /// The step whose adapter was written (the best with --load-best-model-at-end).
        kept_step: usize,
        /// Why the run ended before its last step (`early_stopping`).
        reason: Option<String>,
    },
    /// Stopped by SIGINT/SIGTERM after saving this checkpoint.
    Interrupted { checkpoint: PathBuf },
    /// Stopped by the divergence guard (run.json says `diverged`); the message says why.
    Diverged { message: String },
}

impl Outcome {
    /// The exit status of a run that ended so (`cli::exit`).
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Completed { .. } => crate::cli::exit::OK,
            Outcome::Diverged { .. } => crate::cli::exit::DIVERGED,
            Outcome::Interrupted { .. } => crate::cli::exit::INTERRUPTED,
        }
    }
}

/// Messages for the user; the binary decides where they go (a bar, log lines).
pub trait Reporter {
    /// A log line.
    fn line(&mut self, s: &str);
    /// What the run is doing now: "training", "evaluating", "saving".
    fn phase(&mut self, _what: &str) {}
    /// After every optimizer step, with the time left (evaluations included) when known.
    fn step(&mut self, _state: &TrainerState, _loss: f64, _eta: Option<Duration>) {}
}

/// Time left in a run, from the measured cost of a training step and of an evaluation.
#[derive(Debug, Default)]
struct Eta {
    step_s: f64,
    steps: usize,
    eval_s: f64,
    evals: usize,
}

impl Eta {
    fn remaining(&self, steps_left: usize, evals_left: usize) -> Option<Duration> {
        if self.steps == 0 {
            return None;
        }
        let per_step = self.step_s / self.steps as f64;
        let per_eval = if self.evals > 0 {
            self.eval_s / self.evals as f64
        } else {
            0.0
        };
        Some(Duration::from_secs_f64(
            steps_left as f64 * per_step + evals_left as f64 * per_eval,
        ))
    }
}

pub struct Trainer {
    pub args: TrainArgs,
    pub model: Llama,
    pub lora_cfg: LoraConfig,
    pub train: ShardReader,
    pub val: Option<ShardReader>,
    pub meta: Meta,
    pad_id: u32,
    module_names: Vec<String>,
    opt: AdamW,
    pub state: TrainerState,
    schedule: Schedule,
    batches_per_epoch: usize,
    steps_per_epoch: usize,
    /// When this attempt started (before loading), and the wall time of earlier attempts.
    started: Instant,
    wall0: f64,
    /// Held for the trainer's life by rank 0: no second trainer writes this output directory.
    _lock: Option<OutputLock>,
    /// The ranks training this run; rank 0 writes everything.
    comm: Rc<dyn Communicator>,
}

/// A bad argument found while setting up: exit status 2 (`cli::usage`).
fn as_usage(e: anyhow::Error) -> anyhow::Error {
    crate::cli::usage(crate::cli::error_line(&e))
}

/// Batches per epoch, optimizer steps per epoch and the run's total steps, for a train split
/// of `train_len` sequences trained by `world` ranks (each step takes world x accumulation
/// micro-batches).
pub fn steps(args: &TrainArgs, world: usize, train_len: usize) -> (usize, usize, usize) {
    let batches_per_epoch = train_len.div_ceil(args.per_device_train_batch_size);
    let steps_per_epoch = batches_per_epoch
        .div_ceil(world * args.gradient_accumulation_steps)
        .max(1);
    let total_steps = if args.max_steps > 0 {
        args.max_steps as usize
    } else {
        ((args.num_train_epochs * steps_per_epoch as f64).ceil() as usize).max(1)
    };
    (batches_per_epoch, steps_per_epoch, total_steps)
}

/// The lock file in an output directory (ignored when judging whether it is empty).
pub const LOCK_FILE: &str = ".dialora-trainer.lock";

/// An exclusive lock on an output directory (an OS file lock on `LOCK_FILE`, which names the
/// holder). The OS releases it when the process ends however it ends, so a lock left by a
/// crashed trainer is simply taken by the next one; the file itself stays.
pub struct OutputLock {
    dir: PathBuf,
    _file: std::fs::File,
}

impl OutputLock {
    pub fn acquire(dir: &std::path::Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open the lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                file.read_to_string(&mut holder).ok();
                let holder = holder.trim();
                bail!(
                    "{}: another trainer is writing this output directory ({}); wait for it to end or stop it (its lock is released when it exits, crashed or not)",
                    dir.display(),
                    if holder.is_empty() { "holder unknown".to_string() } else { holder.to_string() }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock", path.display()))
            }
        }
        let host = super::hostname().unwrap_or_else(|| "unknown host".into());
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "pid {} on {host}", std::process::id())?;
        file.flush()?;
        Ok(OutputLock {
            dir: dir.to_path_buf(),
            _file: file,
        })
    }

    /// Whether the directory holds nothing but the lock file.
    pub fn dir_is_empty(&self) -> Result<bool> {
        Ok(std::fs::read_dir(&self.dir)
            .with_context(|| format!("{}: cannot read", self.dir.display()))?
            .filter_map(|e| e.ok())
            .all(|e| e.file_name() == LOCK_FILE))
    }
}

impl Trainer {
    /// Loads model and data, attaches LoRA (fresh or from a checkpoint) and validates the run
    /// (one process).
    pub fn new(args: TrainArgs) -> Result<Self> {
        Self::with_comm(args, Rc::new(comm::Single))
    }

    /// `new` for one rank of a run trained by the ranks of `comm`: every rank loads, rank 0
    /// alone takes the output directory; a failure on any rank fails all (`comm::agree`).
    pub fn with_comm(args: TrainArgs, comm: Rc<dyn Communicator>) -> Result<Self> {
        let r = Self::load(args, comm.clone());
        comm::agree(&*comm, r, "loading")
    }

    fn load(args: TrainArgs, comm: Rc<dyn Communicator>) -> Result<Self> {
        let started = Instant::now();
        let writes = comm.rank() == 0;
        let world = comm.size();
        args.validate().map_err(as_usage)?;
        let device = crate::device::parse(&args.device).map_err(as_usage)?;
        let lora_cfg = args.lora_config().map_err(as_usage)?;
        let meta = Meta::load(&args.data)?;
        let tok = crate::tokenizer::load(&args.model)?;
        check_tokenizer(
            &meta,
            &args.data,
            &crate::tokenizer::fingerprint(&tok)?,
            &args.model,
        )?;
        let train = ShardReader::open(&args.data, &meta, "train")?;
        if train.is_empty() {
            bail!("{}: the train split is empty", args.data.display());
        }
        let val = if meta.val.sequences > 0 {
            Some(ShardReader::open(&args.data, &meta, "val")?)
        } else {
            None
        };
        if val.is_none() && (args.load_best_model_at_end || args.early_stopping_patience > 0) {
            return Err(crate::cli::usage(format!(
                "{}: --load-best-model-at-end and --early-stopping-patience need a validation split (dataprep --val-split)",
                args.data.display()
            )));
        }
        // evaluations asked for (an interval, or per epoch) need something to evaluate on, as
        // HF Trainer says; the default (steps, at the start and the end) just has none
        if val.is_none()
            && (args.eval_strategy == IntervalStrategy::Epoch
                || (args.eval_strategy == IntervalStrategy::Steps && args.eval_steps > 0))
        {
            return Err(crate::cli::usage(format!(
                "{}: --eval-strategy {} asks for evaluations, but the shards have no validation sequences (make them with dataprep --val-split, or pass --eval-strategy no)",
                args.data.display(),
                match args.eval_strategy {
                    IntervalStrategy::Epoch => "epoch".to_string(),
                    _ => format!("steps --eval-steps {}", args.eval_steps),
                }
            )));
        }
        if writes && val.is_none() && args.eval_strategy != IntervalStrategy::No {
            eprintln!(
                "trainer: warning: {} has no validation sequences: this run is not evaluated (no eval_loss)",
                args.data.display()
            );
        }
        let mut model = Llama::from_dir(&args.model, args.compute_dtype().dtype(), &device)?;
        for split in std::iter::once(&train).chain(&val) {
            split.check_vocab(model.config.vocab_size)?;
        }
        let max_pos = model.config.max_position_embeddings;
        if meta.max_seq_len > max_pos {
            bail!(
                "shards allow sequences of {} tokens but the model's context is {max_pos}",
                meta.max_seq_len
            );
        }
        let pad_id = model
            .config
            .pad_token_id
            .as_ref()
            .and_then(|p| p.to_vec().first().copied())
            .or_else(|| model.config.eos_token_ids().first().copied())
            .unwrap_or(0);

        // output directory policy, under the directory's lock
        let out = &args.output_dir;
        let lock = writes.then(|| OutputLock::acquire(out)).transpose()?;
        let resume = match args.resume_from_checkpoint.as_deref() {
            Some(spec) => checkpoint::resolve(out, spec).map_err(as_usage)?,
            None => None,
        };
        // `auto` with no checkpoint yet starts afresh over what an attempt stopped before its
        // first checkpoint left behind (run.json, metrics.csv)
        let auto = args.resume_from_checkpoint.as_deref() == Some("auto");
        let not_empty = match &lock {
            Some(l) => !l.dir_is_empty()?,
            None => false,
        };
        if resume.is_none() && !auto && not_empty && !args.overwrite_output_dir {
            bail!(
                "{}: output directory is not empty; resume with --resume-from-checkpoint latest, or pass --overwrite-output-dir",
                out.display()
            );
        }
        let n = model.attach_lora(
            &lora_cfg,
            crate::lora::initializer(&lora_cfg.init_lora_weights, args.seed, &device),
        )?;
        if n == 0 {
            return Err(crate::cli::usage(format!(
                "no module of the model matches --target-modules {}",
                args.target_modules
            )));
        }
        let module_names: Vec<String> = model.loras().iter().map(|(n, _)| n.to_string()).collect();
        let opt_cfg = AdamWConfig {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        };
        let mut opt = AdamW::new(opt_cfg, 2 * n);

        let (batches_per_epoch, steps_per_epoch, total_steps) = steps(&args, world, train.len());
        let warmup = if args.warmup_steps > 0 {
            args.warmup_steps
        } else {
            (args.warmup_ratio * total_steps as f64).ceil() as usize
        };
        let schedule = Schedule {
            kind: args.lr_scheduler_type,
            lr: args.learning_rate,
            warmup_steps: warmup,
            total_steps,
        };

        let identity = checkpoint::identity(
            &args,
            world,
            &lora_cfg,
            &file_sha256(&args.model.join("config.json")),
            &file_sha256(&args.data.join("meta.json")),
        )?;
        let mut state = TrainerState {
            total_steps,
            identity: identity.clone(),
            ..Default::default()
        };
        if let Some(dir) = &resume {
            // a damaged checkpoint ends this attempt: run.json says so (under the lock)
            let (st, adapter) = checkpoint::load(dir, &mut opt, &module_names, &device)
                .inspect_err(|e| {
                    if writes {
                        super::record_failed_start(out, e)
                    }
                })?;
            checkpoint::check_identity(dir, &st.identity, &identity).map_err(as_usage)?;
            if st.total_steps != total_steps {
                return Err(crate::cli::usage(format!(
                    "{}: checkpoint was made for {} total steps but these arguments give {total_steps}; resume with the same arguments",
                    dir.display(),
                    st.total_steps
                )));
            }
            // the checkpoint's adapter is exactly this run's LoRA modules, shape for shape
            let lora_shapes: BTreeMap<&str, (Vec<usize>, Vec<usize>)> = model
                .loras()
                .into_iter()
                .map(|(n, l)| (n, (l.a.dims().to_vec(), l.b.dims().to_vec())))
                .collect();
            for (name, (a, b)) in &adapter.weights {
                let want = lora_shapes.get(name.as_str());
                if want != Some(&(a.dims().to_vec(), b.dims().to_vec())) {
                    bail!(
                        "{}: checkpoint module '{name}' (lora_A {:?}, lora_B {:?}) does not match this run's {}",
                        dir.display(),
                        a.dims(),
                        b.dims(),
                        match want {
                            Some((wa, wb)) => format!("lora_A {wa:?}, lora_B {wb:?}"),
                            None => "LoRA modules (it has no such module)".into(),
                        }
                    );
                }
            }
            if let Some(missing) = lora_shapes
                .keys()
                .find(|n| !adapter.weights.contains_key(**n))
            {
                bail!(
                    "{}: checkpoint has no weights for this run's LoRA module '{missing}'",
                    dir.display()
                );
            }
            for l in model.linears_mut() {
                if let (Some(lo), Some((a, b))) = (l.lora.as_mut(), adapter.weights.get(&l.name)) {
                    lo.a = a.clone();
                    lo.b = b.clone();
                }
            }
            state = TrainerState { identity, ..st };
        }
        let state_wall0 = state.wall_s;
        Ok(Trainer {
            args,
            model,
            lora_cfg,
            train,
            val,
            meta,
            pad_id,
            module_names,
            opt,
            state,
            schedule,
            batches_per_epoch,
            steps_per_epoch,
            started,
            wall0: state_wall0,
            _lock: lock,
            comm,
        })
    }

    /// The sequences of one optimizer step over all ranks.
    pub fn global_batch_size(&self) -> usize {
        self.comm.size()
            * self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
    }

    /// Whether this process writes the run's files (rank 0).
    fn writes(&self) -> bool {
        self.comm.rank() == 0
    }

    fn lora_weights(&self) -> BTreeMap<String, (Tensor, Tensor)> {
        self.model
            .loras()
            .iter()
            .map(|(n, l)| (n.to_string(), (l.a.clone(), l.b.clone())))
            .collect()
    }

    /// Whether the run evaluates after optimizer step `step` (`epoch_end`: an epoch ended in
    /// it): by --eval-strategy, and after the last step unless evaluation is off.
    fn evaluates_at(&self, step: usize, epoch_end: bool) -> bool {
        let a = &self.args;
        self.val.is_some()
            && a.eval_strategy != IntervalStrategy::No
            && (step == self.state.total_steps
                || due(a.eval_strategy, a.eval_steps, step, epoch_end))
    }

    /// Evaluations still to come after step `step` (epochs taken as whole steps).
    fn evals_after(&self, step: usize) -> usize {
        let per_epoch = self.steps_per_epoch.max(1);
        (step + 1..=self.state.total_steps)
            .filter(|&s| self.evaluates_at(s, s.is_multiple_of(per_epoch)))
            .count()
    }

    /// Records an evaluation after a training step for the best adapter and early stopping.
    /// Returns whether early stopping ends the run here.
    fn judge(&mut self, step: usize, metric: f64) -> bool {
        let a = &self.args;
        let st = &mut self.state;
        let better = |x: f64, than: f64| {
            if a.greater_is_better {
                x > than
            } else {
                x < than
            }
        };
        // as HF's EarlyStoppingCallback: against the best before this evaluation
        let significant = st
            .best_metric
            .is_none_or(|b| better(metric, b) && (metric - b).abs() > a.early_stopping_threshold);
        if st.best_metric.is_none_or(|b| better(metric, b)) {
            st.best_metric = Some(metric);
            st.best_step = Some(step);
        }
        if significant {
            st.evals_without_improvement = 0;
        } else {
            st.evals_without_improvement += 1;
        }
        a.early_stopping_patience > 0 && st.evals_without_improvement >= a.early_stopping_patience
    }

    /// `evaluate`, timed for the ETA and shown as a phase.
    fn timed_eval(&self, rep: &mut dyn Reporter, eta: &mut Eta) -> Result<Option<f64>> {
        rep.phase("evaluating");
        let t = Instant::now();
        let e = self.evaluate()?;
        eta.eval_s += t.elapsed().as_secs_f64();
        eta.evals += 1;
        rep.phase("training");
        Ok(e)
    }

    /// Mean token loss over the validation split.
    pub fn evaluate(&self) -> Result<Option<f64>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        // the ranks take the batches in turn; the sums are reduced token-weighted
        let (rank, world) = (self.comm.rank(), self.comm.size());
        let mut sums = [0f64; 2];
        let idx: Vec<usize> = (0..val.len()).collect();
        for (i, chunk) in idx.chunks(self.args.per_device_eval_batch_size).enumerate() {
            if i % world != rank {
                continue;
            }
            let b = batches::make_batch(val, chunk, self.pad_id, &self.model.device)?;
            let s = self.model.eval_loss(&b)?;
            sums[0] += s.loss_sum;
            sums[1] += s.tokens as f64;
        }
        self.comm.sum_f64(&mut sums, "the evaluation losses");
        let [sum, n] = sums;
        Ok((n > 0.0).then(|| sum / n))
    }

    /// Saves a checkpoint (rank 0; the others return where it goes).
    fn save_checkpoint(&self) -> Result<PathBuf> {
        if !self.writes() {
            return Ok(checkpoint::checkpoint_dir(
                &self.args.output_dir,
                self.state.global_step,
            ));
        }
        let protect = self.state.best_step;
        let mut st = self.state.clone();
        st.adam_t = self.opt.t;
        checkpoint::save(
            &self.args.output_dir,
            &st,
            &self.lora_cfg,
            &self.lora_weights(),
            &self.opt,
            &self.module_names,
            checkpoint::Retention {
                keep: self.args.save_total_limit,
                protect,
            },
        )
    }

    /// The run record as of now.
    fn record(&self, status: RunStatus) -> RunRecord {
        let a = &self.args;
        RunRecord {
            status,
            run_name: a.run_name.clone().unwrap_or_else(|| {
                a.output_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default()
            }),
            args: a.clone(),
            lora_config: Some(self.lora_cfg.clone()),
            total_steps: self.state.total_steps,
            warmup_steps: self.schedule.warmup_steps,
            batches_per_epoch: self.batches_per_epoch,
            trainable_parameters: self.model.trainable_parameters(),
            model: ModelInfo {
                dir: a.model.display().to_string(),
                config_sha256: file_sha256(&a.model.join("config.json")),
                tokenizer_fingerprint: self.meta.tokenizer_fingerprint.clone(),
                architecture: self.model.config.architecture(),
            },
            data: DataInfo {
                dir: a.data.display().to_string(),
                meta_sha256: file_sha256(&a.data.join("meta.json")),
                train_sequences: self.meta.train.sequences,
                val_sequences: self.meta.val.sequences,
                label_mode: self.meta.label_mode.as_str().into(),
            },
            versions: Versions::default(),
            device: a.device.clone(),
            threads: crate::device::threads(),
            world_size: self.comm.size(),
            global_batch_size: self.global_batch_size(),
            collective_s: self.comm.collective_s().0,
            collective_wait_s: self.comm.collective_s().1,
            global_step: self.state.global_step,
            elapsed_s: self.state.elapsed_s,
            wall_s: self.wall0 + self.started.elapsed().as_secs_f64(),
            peak_mem_mib: crate::device::peak_mem_mib(&self.model.device),
            peak_mem_of: crate::device::mem_kind(&self.model.device).into(),
            best_eval_loss: self.state.best_eval_loss,
            metric_for_best_model: a.best_metric().unwrap_or("eval_loss").to_string(),
            best_step: self.state.best_step,
            best_metric: self.state.best_metric,
            ..Default::default()
        }
    }

    fn write_run_json(&self, status: RunStatus) -> Result<()> {
        self.save_record(self.record(status))
    }

    /// Writes run.json. While the run is `running` its record is also what a second signal
    /// records as `aborted`; any other status ends that first, so an abort never overwrites
    /// how the run really ended.
    fn save_record(&self, r: RunRecord) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let mut last = ABORT_RECORD.lock().unwrap_or_else(|p| p.into_inner());
        *last = (r.status == RunStatus::Running).then(|| (self.args.output_dir.clone(), r.clone()));
        r.save(&self.args.output_dir)
    }

    /// Keeps the abort snapshot at the current step.
    fn note_progress(&self) {
        let mut last = ABORT_RECORD.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, r)) = last.as_mut() {
            r.global_step = self.state.global_step;
            r.elapsed_s = self.state.elapsed_s;
            r.wall_s = self.state.wall_s;
        }
    }

    /// Runs to completion, interruption (flag set by a signal handler) or divergence. Every
    /// end is recorded in run.json: an error as `failed` with its message.
    pub fn run(&mut self, stop: Arc<AtomicBool>, rep: &mut dyn Reporter) -> Result<Outcome> {
        let outcome = self.run_steps(stop, rep);
        if let Err(e) = &outcome {
            let mut r = self.record(RunStatus::Failed);
            r.error = Some(crate::cli::error_line(e));
            self.save_record(r).ok();
        }
        outcome
    }

    fn run_steps(&mut self, stop: Arc<AtomicBool>, rep: &mut dyn Reporter) -> Result<Outcome> {
        let resumed = self.state.global_step;
        // rank 0 writes the metrics
        let mut metrics = self
            .writes()
            .then(|| MetricsLog::open(&self.args.output_dir, (resumed > 0).then_some(resumed)))
            .transpose()?;
        let tensorboard = self.args.reports_to_tensorboard()?;
        if let Some(metrics) = metrics.as_mut().filter(|_| tensorboard) {
            let args = serde_json::to_string_pretty(&serde_json::json!({
                "args": &self.args, "lora_config": &self.lora_cfg,
            }))?;
            metrics.report_to_tensorboard(
                &self.args.tensorboard_dir(),
                (resumed > 0).then_some(resumed),
                &args,
            )?;
        }
        self.write_run_json(RunStatus::Running)?;
        let bs = self.args.per_device_train_batch_size;
        let gas = self.args.gradient_accumulation_steps;
        let (rank, world) = (self.comm.rank(), self.comm.size());
        let mut first_eval = None;
        let mut eta = Eta::default();
        if self.state.global_step == 0 && self.args.eval_strategy != IntervalStrategy::No {
            first_eval = self.timed_eval(rep, &mut eta)?;
            if let Some(e) = first_eval {
                self.state.best_eval_loss = Some(e);
                if let Some(m) = metrics.as_mut() {
                    m.append(&MetricsRow {
                        peak_mem_mib: crate::device::peak_mem_mib(&self.model.device),
                        eval_loss: Some(e),
                        ..Default::default()
                    })?;
                }
                rep.line(&format!("step 0: eval_loss {e:.4}"));
            }
        }
        let mut epoch_batches = batches::epoch_batches(
            &self.train,
            bs,
            self.args.seed,
            self.state.epoch,
            self.args.group_by_length,
        );
        let t_start = Instant::now();
        let elapsed0 = self.state.elapsed_s;
        let (mut win_loss, mut win_tokens, mut win_labels) = (0f64, 0usize, 0usize);
        let mut win_t = Instant::now();
        rep.phase("training");
        let mut last_norm = f64::NAN;
        let mut final_eval = None;
        let mut stopped_early = false;
        let mut last_save = Instant::now();
        while self.state.global_step < self.state.total_steps {
            let t_step = Instant::now();
            // gather the step's batch (world x accumulation micro-batches, what one process
            // would take with accumulation world x gas); note whether an epoch ends in it
            let mut micro = Vec::with_capacity(world * gas);
            let mut epoch_end = false;
            for _ in 0..world * gas {
                if self.state.batch_in_epoch >= epoch_batches.len() {
                    epoch_end |= !micro.is_empty();
                    self.state.epoch += 1;
                    self.state.batch_in_epoch = 0;
                    epoch_batches = batches::epoch_batches(
                        &self.train,
                        bs,
                        self.args.seed,
                        self.state.epoch,
                        self.args.group_by_length,
                    );
                }
                micro.push(epoch_batches[self.state.batch_in_epoch].clone());
                self.state.batch_in_epoch += 1;
            }
            epoch_end |= self.state.batch_in_epoch >= epoch_batches.len();
            let labels: usize = micro
                .iter()
                .map(|m| batches::label_count(&self.train, m))
                .sum();
            let toks: usize = micro.iter().flatten().map(|&i| self.train.seq_len(i)).sum();
            // the loss is normalised by the labels of the whole step's batch, all ranks'
            let scale = 1.0 / labels.max(1) as f64;
            let mut grads = Grads::new(self.module_names.len());
            let mut loss_sum = [0f64];
            // this rank's share: its run of micro-batches, each with the dropout masks of its
            // place in the step (the global micro-step)
            for (j, m) in micro.iter().enumerate().skip(rank * gas).take(gas) {
                let batch = batches::make_batch(&self.train, m, self.pad_id, &self.model.device)?;
                let ctx = TrainCtx {
                    seed: self.args.seed,
                    micro_step: self.state.micro_step + j as u64,
                    gradient_checkpointing: self.args.gradient_checkpointing,
                    neftune_noise_alpha: self.args.neftune_noise_alpha,
                };
                loss_sum[0] += self
                    .model
                    .forward_backward(&batch, &ctx, scale, &mut grads)?
                    .loss_sum;
            }
            self.state.micro_step += micro.len() as u64;
            self.state.tokens_seen += toks;
            win_tokens += toks;
            let mut gs = grads.into_flat()?;
            // summed over the ranks before clipping, so the norm is the global one
            comm::sum_tensors(&*self.comm, &mut gs)?;
            self.comm.sum_f64(&mut loss_sum, "the training loss");
            let loss = loss_sum[0] / labels.max(1) as f64;
            let step = self.state.global_step;
            let lr = self.schedule.lr_at(step);
            let norm = {
                let mut refs: Vec<&mut Tensor> = gs.iter_mut().collect();
                optim::clip_grad_norm(&mut refs, self.args.max_grad_norm)?
            };
            if !loss.is_finite() || !norm.is_finite() {
                self.state.nonfinite_in_a_row += 1;
                rep.line(&format!(
                    "step {}: non-finite loss ({loss}) or gradient norm ({norm}); update skipped",
                    step + 1
                ));
                if self.state.nonfinite_in_a_row >= self.args.max_nonfinite_steps {
                    let message = format!(
                        "training diverged: {} steps in a row with a non-finite loss or gradient, the last at step {} (learning rate {lr:.3e}); lower --learning-rate (LoRA runs on 7B models are known to explode at 1e-2; 1e-4 to 2e-4 is typical) or set --max-grad-norm. Checkpoints already saved are intact.",
                        self.state.nonfinite_in_a_row,
                        step + 1
                    );
                    let mut r = self.record(RunStatus::Diverged);
                    r.reason = Some(message.clone());
                    self.save_record(r)?;
                    return Ok(Outcome::Diverged { message });
                }
            } else {
                self.state.nonfinite_in_a_row = 0;
                let first = *self.state.first_loss.get_or_insert(loss);
                let ratio = self.args.divergence_loss_ratio;
                if ratio > 0.0 && loss > ratio * first {
                    self.state.exploded_in_a_row += 1;
                } else {
                    self.state.exploded_in_a_row = 0;
                }
                self.opt.step_loras(&mut self.model, &gs, lr)?;
                win_loss += loss;
                win_labels += 1;
                last_norm = norm;
            }
            self.state.global_step += 1;
            self.state.adam_t = self.opt.t;
            self.state.elapsed_s = elapsed0 + t_start.elapsed().as_secs_f64();
            self.state.wall_s = self.wall0 + self.started.elapsed().as_secs_f64();
            self.note_progress();
            eta.step_s += t_step.elapsed().as_secs_f64();
            eta.steps += 1;
            let step = self.state.global_step;
            let time_left =
                eta.remaining(self.state.total_steps - step, self.evals_after(step - 1));
            rep.step(&self.state, loss, time_left);
            let win_secs = win_t.elapsed().as_secs_f64();
            let eval = if self.evaluates_at(step, epoch_end) {
                self.timed_eval(rep, &mut eta)?
            } else {
                None
            };
            if let Some(e) = eval {
                if self.state.best_eval_loss.is_none_or(|b| e < b) {
                    self.state.best_eval_loss = Some(e);
                }
                stopped_early = self.judge(step, e);
            }
            let last = step == self.state.total_steps || stopped_early;
            if last {
                final_eval = eval;
            }
            if step.is_multiple_of(self.args.logging_steps) || last || eval.is_some() {
                let secs = win_secs;
                let mean_loss = if win_labels > 0 {
                    win_loss / win_labels as f64
                } else {
                    f64::NAN
                };
                let epoch = self.state.epoch as f64
                    + self.state.batch_in_epoch as f64 / self.batches_per_epoch as f64;
                let tps = win_tokens as f64 / secs.max(1e-9);
                let row = MetricsRow {
                    step,
                    epoch,
                    loss: Some(mean_loss),
                    grad_norm: Some(last_norm),
                    learning_rate: Some(lr),
                    tokens: self.state.tokens_seen,
                    tokens_per_s: Some(tps),
                    elapsed_s: self.state.elapsed_s,
                    peak_mem_mib: crate::device::peak_mem_mib(&self.model.device),
                    eval_loss: eval,
                };
                if let Some(m) = metrics.as_mut() {
                    m.append(&row)?;
                }
                let left = eta.remaining(self.state.total_steps - step, self.evals_after(step));
                rep.line(&format!(
                    "step {step}/{}: loss {mean_loss:.4} grad_norm {last_norm:.3} lr {lr:.2e} {tps:.0} tok/s{}{}",
                    self.state.total_steps,
                    eval.map(|e| format!(" eval_loss {e:.4}")).unwrap_or_default(),
                    match left {
                        Some(d) if !last => format!(" eta {}", crate::progress::eta(d)),
                        _ => String::new(),
                    }
                ));
                (win_loss, win_tokens, win_labels) = (0.0, 0, 0);
                win_t = Instant::now();
            } else if eval.is_some() {
                win_t = Instant::now();
            }
            let a = &self.args;
            let timed = a.save_every_minutes > 0.0
                && last_save.elapsed().as_secs_f64() >= 60.0 * a.save_every_minutes;
            let saved = if !last && (timed || due(a.save_strategy, a.save_steps, step, epoch_end)) {
                last_save = Instant::now();
                rep.phase("saving");
                let d = self.save_checkpoint()?;
                rep.phase("training");
                rep.line(&format!("saved {}", d.display()));
                Some(d)
            } else {
                None
            };
            if self.state.exploded_in_a_row >= self.args.max_nonfinite_steps {
                let message = format!(
                    "training diverged: the loss stayed above {}x the first step's ({:.4}) for {} steps in a row, the last at step {step} with {loss:.4} (learning rate {lr:.3e}); lower --learning-rate (LoRA runs on 7B models are known to explode at 1e-2; 1e-4 to 2e-4 is typical). Checkpoints already saved are intact.",
                    self.args.divergence_loss_ratio,
                    self.state.first_loss.unwrap_or(f64::NAN),
                    self.state.exploded_in_a_row,
                );
                let mut r = self.record(RunStatus::Diverged);
                r.reason = Some(message.clone());
                self.save_record(r)?;
                return Ok(Outcome::Diverged { message });
            }
            if stopped_early {
                rep.line(&format!(
                    "stopping early: no improvement of {} by more than {} in {} evaluations",
                    self.args.best_metric()?,
                    self.args.early_stopping_threshold,
                    self.state.evals_without_improvement
                ));
                break;
            }
            // a signal on any rank stops them all, after the same step
            if comm::any(&*self.comm, stop.load(Ordering::SeqCst), "the stop flag") && !last {
                let d = match saved {
                    Some(d) => d,
                    None => self.save_checkpoint()?,
                };
                self.write_run_json(RunStatus::Interrupted)?;
                return Ok(Outcome::Interrupted { checkpoint: d });
            }
        }
        let kept_step = self.write_final_adapter(rep)?;
        let mut r = self.record(RunStatus::Completed);
        r.reason = stopped_early.then(|| "early_stopping".to_string());
        r.kept_step = Some(kept_step);
        self.save_record(r.clone())?;
        Ok(Outcome::Completed {
            adapter_dir: self.args.output_dir.clone(),
            final_eval_loss: final_eval,
            first_eval_loss: first_eval,
            best: self.state.best_step.zip(self.state.best_metric),
            kept_step,
            reason: r.reason,
        })
    }

    /// Writes the run's adapter: the best checkpoint's, byte for byte, with
    /// --load-best-model-at-end when the best came before the last step; else the current
    /// weights. Returns the step whose adapter was written.
    fn write_final_adapter(&self, rep: &mut dyn Reporter) -> Result<usize> {
        let out = &self.args.output_dir;
        let now = self.state.global_step;
        let best = self
            .state
            .best_step
            .filter(|&b| self.args.load_best_model_at_end && b != now);
        if !self.writes() {
            return Ok(best.unwrap_or(now));
        }
        if let Some(best) = best {
            let dir = checkpoint::checkpoint_dir(out, best);
            for f in [crate::lora::ADAPTER_WEIGHTS, crate::lora::ADAPTER_CONFIG] {
                let bytes = std::fs::read(dir.join(f)).with_context(|| {
                    format!(
                        "{}: the best checkpoint (step {best}) is missing",
                        dir.join(f).display()
                    )
                })?;
                crate::atomic::write_file(&out.join(f), &bytes)?;
            }
            rep.line(&format!(
                "kept the best adapter: step {best} ({} {:.4}), from {}",
                self.args.best_metric()?,
                self.state.best_metric.unwrap_or(f64::NAN),
                dir.display()
            ));
            return Ok(best);
        }
        let mut cfg = self.lora_cfg.clone();
        cfg.inference_mode = true;
        Adapter::save(&cfg, &self.lora_weights(), out)?;
        Ok(now)
    }
}

/// Whether an interval strategy acts after `step` (`every` for `steps`; `epoch_end`: an epoch
/// ended in this step).
fn due(strategy: IntervalStrategy, every: usize, step: usize, epoch_end: bool) -> bool {
    match strategy {
        IntervalStrategy::Steps => every > 0 && step.is_multiple_of(every),
        IntervalStrategy::Epoch => epoch_end,
        IntervalStrategy::No => false,
    }
}

/// Installs SIGINT/SIGTERM handlers that set the returned flag (the loop saves and exits).
/// The record of the run in its loop, as of its last optimizer step: what a second signal
/// writes as `aborted` before the process exits.
static ABORT_RECORD: std::sync::Mutex<Option<(PathBuf, RunRecord)>> = std::sync::Mutex::new(None);

/// Records in run.json that a second signal ended the run without saving (when a run is in its
/// loop).
fn record_abort() {
    let mut last = ABORT_RECORD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((dir, mut r)) = last.take() {
        r.status = RunStatus::Aborted;
        r.error = Some(format!(
            "aborted by a second interrupt after step {}: nothing saved since the last checkpoint (resume continues from it)",
            r.global_step
        ));
        if let Err(e) = r.save(&dir) {
            eprintln!("trainer: cannot record the abort in run.json: {e:#}");
        }
    }
}

/// Records in run.json that the run failed with `message` outside the loop's own error
/// handling (a rank of the run has gone and the collectives cannot go on), when a run is in
/// its loop in this process.
pub fn record_failure(message: &str) {
    let mut last = ABORT_RECORD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((dir, mut r)) = last.take() {
        r.status = RunStatus::Failed;
        r.error = Some(message.to_string());
        if let Err(e) = r.save(&dir) {
            eprintln!("trainer: cannot record the failure in run.json: {e:#}");
        }
    }
}

/// `who`: how the messages name this process ("" alone, "rank 1: " among several).
pub fn stop_flag(who: &str) -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let who = who.to_string();
    ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!("{who}second interrupt: exiting without saving");
            record_abort();
            std::process::exit(crate::cli::exit::ERROR);
        }
        eprintln!("{who}interrupt received: finishing this step and saving a checkpoint (interrupt again to abort)");
    })
    .map_err(|e| anyhow!("cannot install signal handler: {e}"))?;
    Ok(flag)
}
