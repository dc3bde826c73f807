//! Training arguments: HF TrainingArguments / LoraConfig names and defaults. Also the
//! `--config FILE` (JSON or TOML) whose keys are the same names; flags override it.

use super::schedule::SchedulerType;
use crate::device::DtypeArg;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// When something happens during a run (HF's IntervalStrategy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IntervalStrategy {
    Steps,
    Epoch,
    No,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InitArg {
    /// PEFT default: A Kaiming-uniform, B zero.
    True,
    /// A ~ N(0, 1/r), B zero.
    Gaussian,
    /// A and B both Kaiming-uniform (the adapter is not a no-op at start).
    False,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainArgs {
    // ---- inputs and outputs
    /// Base model directory (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Shard directory written by dataprep.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the adapter, metrics.csv, run.json and checkpoints go.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Allow writing into a non-empty output directory that holds no run to resume.
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// Resume from a checkpoint directory, `latest` (the newest in --output-dir), or `auto`
    /// (the newest if there is one, else start afresh; a run that completed says so and exits
    /// 0): the one command a job system can run again after any requeue or preemption.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// A name for the run, shown in logs and reports (default: the output directory's name).
    #[arg(long)]
    pub run_name: Option<String>,

    // ---- LoRA
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha (scale alpha/r, or alpha/sqrt(r) with --use-rslora).
    #[arg(long, default_value_t = 8.0)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch input.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Comma-separated modules among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,
    /// or all-linear.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub target_modules: String,
    /// Rank-stabilised LoRA: scale alpha/sqrt(r).
    #[arg(long)]
    pub use_rslora: bool,
    /// LoRA initialisation.
    #[arg(long, value_enum, default_value = "true")]
    pub init_lora_weights: InitArg,

    // ---- optimisation
    /// Peak learning rate of AdamW (reached after warmup).
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    /// Epochs (ignored when --max-steps > 0).
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides --num-train-epochs when > 0.
    #[arg(long, default_value_t = -1)]
    pub max_steps: i64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    /// Sequences per evaluation batch.
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimizer step (the loss is normalised over all their label tokens).
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value = "linear")]
    pub lr_scheduler_type: SchedulerType,
    /// Warmup as a fraction of the total steps.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Warmup steps (overrides --warmup-ratio when > 0).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Decoupled (AdamW) weight decay on the LoRA matrices.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed of LoRA initialisation, data order and dropout (a run is reproducible from it).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Group sequences of similar length into batches (less padding, so faster on CPU; the
    /// batches are still drawn in a random order). Off by default, as in HF
    /// TrainingArguments, so a run's batch order is that of a plain shuffle; `make pipeline`
    /// turns it on.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub group_by_length: bool,

    // ---- logging, evaluation, checkpoints
    /// Log a metrics.csv row every N optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    /// Where else every logged row goes, as HF's report_to: `none`, or `tensorboard` (event
    /// files in --logging-dir, which TensorBoard reads, and from it `swanlab convert -t
    /// tensorboard` and `wandb sync --sync-tensorboard`); `all` is `tensorboard`.
    #[arg(long, default_value = "none")]
    pub report_to: String,
    /// TensorBoard log directory [default: OUTPUT_DIR/runs, one directory for every attempt
    /// of the run].
    #[arg(long)]
    pub logging_dir: Option<PathBuf>,
    /// When to evaluate on the validation split: steps (every --eval-steps), epoch (at the end
    /// of every epoch) or no. With steps or epoch the run also evaluates before training and
    /// after its last step.
    #[arg(long, value_enum, default_value_t = IntervalStrategy::Steps, alias = "evaluation-strategy")]
    pub eval_strategy: IntervalStrategy,
    /// With --eval-strategy steps: evaluate every N steps (0 = only before training and at the
    /// end).
    #[arg(long, default_value_t = 0)]
    pub eval_steps: usize,
    /// When to save a checkpoint: steps (every --save-steps), epoch (at the end of every epoch)
    /// or no (only on interruption).
    #[arg(long, value_enum, default_value_t = IntervalStrategy::Steps)]
    pub save_strategy: IntervalStrategy,
    /// With --save-strategy steps: save a checkpoint every N steps (0 = never, except on
    /// interruption).
    #[arg(long, default_value_t = 500)]
    pub save_steps: usize,
    /// Also save a checkpoint whenever this many minutes have passed since the last one (0 =
    /// off): what a job that may be preempted at any time needs.
    #[arg(long, default_value_t = 0.0)]
    pub save_every_minutes: f64,
    /// Keep at most N checkpoints (0 = keep all); the best one is always kept.
    #[arg(long, default_value_t = 0)]
    pub save_total_limit: usize,
    /// Write the best evaluated adapter (by --metric-for-best-model) as the run's adapter at
    /// the end, instead of the last one. Needs --save-strategy equal to --eval-strategy (and
    /// --save-steps a multiple of --eval-steps), so that every evaluation has its checkpoint.
    #[arg(long)]
    pub load_best_model_at_end: bool,
    /// The metric that decides the best adapter and early stopping: eval_loss (`loss` is
    /// taken as eval_loss, as in HF).
    #[arg(long, default_value = "eval_loss")]
    pub metric_for_best_model: String,
    /// A higher --metric-for-best-model is better (not for losses).
    #[arg(long)]
    pub greater_is_better: bool,
    /// Stop after this many evaluations in a row without an improvement of the metric (0 = do
    /// not stop early). HF's EarlyStoppingCallback.
    #[arg(long, default_value_t = 0)]
    pub early_stopping_patience: usize,
    /// The least change of the metric that counts as an improvement for early stopping.
    #[arg(long, default_value_t = 0.0)]
    pub early_stopping_threshold: f64,
    /// NEFTune: uniform noise of magnitude alpha/sqrt(sequence length x hidden size) added to the
    /// input embeddings during training only (not evaluation or inference); 5 is the paper's
    /// usual value. Off when unset.
    #[arg(long)]
    pub neftune_noise_alpha: Option<f64>,
    /// Stop after this many optimizer steps in a row skipped for non-finite loss or gradient
    /// (or, with --divergence-loss-ratio, with an exploded loss).
    #[arg(long, default_value_t = 3)]
    pub max_nonfinite_steps: usize,
    /// Also stop as diverged (exit 65) when the training loss stays above this multiple of
    /// the first step's loss for --max-nonfinite-steps steps in a row: a run that explodes
    /// (too high a learning rate) without ever reaching a non-finite value. 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub divergence_loss_ratio: f64,

    // ---- compute
    /// Compute dtype of the frozen model and the activations (LoRA master weights, their
    /// gradients and the optimizer state stay f32; softmax, norms and the loss accumulate in
    /// f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Mixed precision as HF's `bf16=True`: the same as `--dtype bf16`.
    #[arg(long, conflicts_with = "dtype")]
    pub bf16: bool,
    /// Recompute each block's activations in the backward: less memory, ~1/3 more compute.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[arg(long, default_value = "cpu", help = crate::device::DEVICE_HELP)]
    pub device: String,
    /// Under MPI (the `make mpi` trainer, launched by mpirun or srun --mpi=pmix): seconds a
    /// rank waits for the others in a collective before it fails the run. A rank on the same
    /// node that has exited fails it at once, naming the rank.
    #[arg(long, default_value_t = 1800.0)]
    pub ddp_timeout: f64,
}

impl Default for TrainArgs {
    /// The command line's defaults (the clap attributes are the one source), with empty paths.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: TrainArgs,
        }
        let required = [
            "trainer",
            "--model",
            "-",
            "--data",
            "-",
            "--output-dir",
            "-",
        ];
        let mut a = <Defaults as clap::Parser>::try_parse_from(required)
            .expect("the defaults parse")
            .args;
        (a.model, a.data, a.output_dir) = Default::default();
        a
    }
}

impl TrainArgs {
    /// The metric --metric-for-best-model names (`loss` is eval_loss, as in HF); only the
    /// evaluation loss is computed.
    pub fn best_metric(&self) -> Result<&'static str> {
        match self.metric_for_best_model.trim_start_matches("eval_") {
            "loss" => Ok("eval_loss"),
            other => bail!("--metric-for-best-model {other}: the trainer computes eval_loss only"),
        }
    }

    pub fn lora_config(&self) -> Result<crate::lora::LoraConfig> {
        let targets = if self.target_modules.trim() == "all-linear" {
            crate::lora::TargetModules::One("all-linear".into())
        } else {
            crate::lora::TargetModules::List(
                self.target_modules
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            )
        };
        let mut c =
            crate::lora::LoraConfig::new(self.lora_r, self.lora_alpha, self.lora_dropout, vec![]);
        c.target_modules = targets;
        c.use_rslora = self.use_rslora;
        c.init_lora_weights = match self.init_lora_weights {
            InitArg::True => crate::lora::InitLoraWeights::Bool(true),
            InitArg::False => crate::lora::InitLoraWeights::Bool(false),
            InitArg::Gaussian => crate::lora::InitLoraWeights::Name("gaussian".into()),
        };
        c.base_model_name_or_path = Some(self.model.display().to_string());
        c.validate()
            .map_err(|e| anyhow!("invalid LoRA arguments: {e}"))?;
        Ok(c)
    }

    /// Whether the run writes TensorBoard event files (`--report-to`).
    pub fn reports_to_tensorboard(&self) -> Result<bool> {
        let mut tb = false;
        for t in self
            .report_to
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            match t {
                "none" => {}
                "tensorboard" | "all" => tb = true,
                "wandb" | "swanlab" | "mlflow" | "comet_ml" | "clearml" | "neptune" => bail!(
                    "--report-to {t}: dialora writes TensorBoard logs (--report-to tensorboard), which {t} imports (swanlab convert -t tensorboard --tb-log-dir DIR; wandb sync --sync-tensorboard DIR up to wandb 0.29)"
                ),
                other => bail!("--report-to {other}: expected none, tensorboard or all"),
            }
        }
        Ok(tb)
    }

    /// The TensorBoard log directory (`--logging-dir`, else `OUTPUT_DIR/runs`).
    pub fn tensorboard_dir(&self) -> PathBuf {
        self.logging_dir
            .clone()
            .unwrap_or_else(|| super::tensorboard::default_dir(&self.output_dir))
    }

    pub fn validate(&self) -> Result<()> {
        self.lora_config()?;
        self.reports_to_tensorboard()?;
        let pos = |v: f64, name: &str| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(anyhow!("--{name} must be > 0, got {v}"))
            }
        };
        pos(self.learning_rate, "learning-rate")?;
        if self.per_device_train_batch_size == 0 {
            bail!("--per-device-train-batch-size must be >= 1");
        }
        if self.per_device_eval_batch_size == 0 {
            bail!("--per-device-eval-batch-size must be >= 1");
        }
        if self.gradient_accumulation_steps == 0 {
            bail!("--gradient-accumulation-steps must be >= 1");
        }
        if self.max_steps <= 0 {
            pos(self.num_train_epochs, "num-train-epochs")?;
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!(
                "--warmup-ratio must be in [0, 1], got {}",
                self.warmup_ratio
            );
        }
        for (v, n) in [
            (self.adam_beta1, "adam-beta1"),
            (self.adam_beta2, "adam-beta2"),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("--{n} must be in [0, 1), got {v}");
            }
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 || self.adam_epsilon <= 0.0 {
            bail!("--weight-decay and --max-grad-norm must be >= 0 and --adam-epsilon > 0");
        }
        if self.logging_steps == 0 {
            bail!("--logging-steps must be >= 1");
        }
        if !(self.divergence_loss_ratio == 0.0 || self.divergence_loss_ratio > 1.0) {
            bail!(
                "--divergence-loss-ratio must be 0 (off) or above 1, got {}",
                self.divergence_loss_ratio
            );
        }
        if self.max_nonfinite_steps == 0 {
            bail!("--max-nonfinite-steps must be >= 1");
        }
        self.best_metric()?;
        if self.load_best_model_at_end {
            if self.eval_strategy == IntervalStrategy::No {
                bail!("--load-best-model-at-end needs evaluations: --eval-strategy steps or epoch");
            }
            if self.save_strategy != self.eval_strategy {
                bail!(
                    "--load-best-model-at-end needs --save-strategy to match --eval-strategy (save {:?}, eval {:?}), so that every evaluated adapter has a checkpoint",
                    self.save_strategy,
                    self.eval_strategy
                );
            }
            if self.eval_strategy == IntervalStrategy::Steps
                && (self.eval_steps == 0
                    || self.save_steps == 0
                    || !self.save_steps.is_multiple_of(self.eval_steps))
            {
                bail!(
                    "--load-best-model-at-end needs --save-steps ({}) to be a round multiple of --eval-steps ({}), both > 0",
                    self.save_steps,
                    self.eval_steps
                );
            }
        }
        if self.early_stopping_patience > 0 && self.eval_strategy == IntervalStrategy::No {
            bail!("--early-stopping-patience needs evaluations: --eval-strategy steps or epoch");
        }
        if self.early_stopping_threshold.is_nan() || self.early_stopping_threshold < 0.0 {
            bail!("--early-stopping-threshold must be >= 0");
        }
        if self.ddp_timeout.is_nan() || self.ddp_timeout <= 0.0 {
            bail!("--ddp-timeout must be > 0 seconds");
        }
        if self.save_every_minutes.is_nan() || self.save_every_minutes < 0.0 {
            bail!("--save-every-minutes must be >= 0");
        }
        if let Some(a) = self.neftune_noise_alpha {
            pos(a, "neftune-noise-alpha")?;
        }
        if self.bf16 && self.dtype != DtypeArg::F32 && self.dtype != DtypeArg::Bf16 {
            bail!("--bf16 and --dtype {:?} disagree: give one", self.dtype);
        }
        crate::device::parse(&self.device)?;
        Ok(())
    }

    /// The compute dtype: `--dtype`, or bf16 with `--bf16`.
    pub fn compute_dtype(&self) -> DtypeArg {
        if self.bf16 {
            DtypeArg::Bf16
        } else {
            self.dtype
        }
    }
}

/// Expands `--config FILE` (JSON or TOML; keys are the flag names with `_` or `-`) into flags
/// placed before the command line's own, so that explicit flags win.
pub fn expand_config_file(argv: Vec<String>) -> Result<Vec<String>> {
    let Some(pos) = argv
        .iter()
        .position(|a| a == "--config" || a.starts_with("--config="))
    else {
        return Ok(argv);
    };
    let (path, skip) = match argv[pos].strip_prefix("--config=") {
        Some(p) => (p.to_string(), 1),
        None => (
            argv.get(pos + 1)
                .cloned()
                .ok_or_else(|| anyhow!("--config needs a file"))?,
            2,
        ),
    };
    let file_args = config_to_args(Path::new(&path))?;
    let mut out = vec![argv[0].clone()];
    out.extend(file_args);
    out.extend(argv[1..pos].iter().cloned());
    out.extend(argv[pos + skip..].iter().cloned());
    Ok(out)
}

/// The flags a config file stands for (`flags_of` its table).
fn config_to_args(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read config", path.display()))?;
    let v: serde_json::Value = if path.extension().is_some_and(|e| e == "toml") {
        let t: toml::Value =
            toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
        serde_json::to_value(t)?
    } else {
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?
    };
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("{}: must be a table/object of arguments", path.display()))?;
    flags_of(obj, &path.display().to_string())
}

/// The trainer flags a table of arguments stands for (`source` names it in errors: a file, or
/// a file and its table). Every key must be a trainer flag (`_` or `-`); how its value becomes
/// flags follows clap's own description of the argument: a switch (`--gradient-checkpointing`)
/// is given for `true` and left out for `false`; an argument that takes a value
/// (`--group-by-length false`, `--learning-rate 1e-4`, `--lr-scheduler-type cosine`) gets it,
/// lists joined with commas.
pub fn flags_of(
    obj: &serde_json::Map<String, serde_json::Value>,
    source: &str,
) -> Result<Vec<String>> {
    let cmd = <TrainArgs as clap::Args>::augment_args(clap::Command::new("trainer"));
    let mut args = Vec::new();
    for (k, v) in obj {
        let long = k.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .ok_or_else(|| {
                anyhow!("{source}: key '{k}' is not a trainer argument (see trainer --help)")
            })?;
        let flag = format!("--{long}");
        let scalar = |x: &serde_json::Value| match x {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Bool(_) | serde_json::Value::Number(_) => Ok(x.to_string()),
            other => Err(anyhow!(
                "{source}: key '{k}': {other} is not a value for --{long}"
            )),
        };
        match (arg.get_action(), v) {
            (clap::ArgAction::SetTrue, serde_json::Value::Bool(b)) => {
                if *b {
                    args.push(flag)
                }
            }
            (clap::ArgAction::SetTrue, other) => {
                bail!("{source}: key '{k}' is a switch: give true or false, not {other}")
            }
            (_, serde_json::Value::Null) => {}
            (_, serde_json::Value::Array(items)) => {
                let items: Vec<String> = items.iter().map(scalar).collect::<Result<_>>()?;
                args.extend([flag, items.join(",")]);
            }
            (_, x) => args.extend([flag, scalar(x)?]),
        }
    }
    Ok(args)
}

/// The arguments trainer flags resolve to, as the trainer would parse them (its defaults
/// filled in; model, data and output directory `.` unless given): what tells two
/// spellings of one setting (`1e-3`, `0.001`) apart from two settings.
pub fn parse_flags(flags: &[String]) -> Result<TrainArgs> {
    #[derive(clap::Parser)]
    #[command(allow_negative_numbers = true, args_override_self = true)]
    struct Flags {
        #[command(flatten)]
        args: TrainArgs,
    }
    let placeholders = ["--model", ".", "--data", ".", "--output-dir", "."];
    let argv = std::iter::once("trainer")
        .chain(placeholders)
        .chain(flags.iter().map(String::as_str));
    let f = <Flags as clap::Parser>::try_parse_from(argv).map_err(|e| {
        anyhow!(
            "{}",
            e.render().to_string().lines().next().unwrap_or_default()
        )
    })?;
    Ok(f.args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    #[command(allow_negative_numbers = true, args_override_self = true)]
    struct Cli {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(file: &Path, extra: &[&str]) -> Result<TrainArgs> {
        let mut argv: Vec<String> = [
            "trainer",
            "--model",
            "m",
            "--data",
            "d",
            "--output-dir",
            "o",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(["--config".to_string(), file.display().to_string()]);
        argv.extend(extra.iter().map(|s| s.to_string()));
        let argv = expand_config_file(argv)?;
        Ok(<Cli as clap::Parser>::try_parse_from(argv)?.args)
    }

    #[test]
    fn every_kind_of_flag_round_trips_through_a_config_file() {
        let d = tempfile::tempdir().unwrap();
        let toml = d.path().join("c.toml");
        std::fs::write(
            &toml,
            "group_by_length = true\ngradient_checkpointing = true\nlearning_rate = 1e-4\nlora_r = 64\n\
             target_modules = [\"q_proj\", \"v_proj\"]\nlr_scheduler_type = \"cosine\"\nuse_rslora = false\n",
        )
        .unwrap();
        let a = parse(&toml, &[]).unwrap();
        // bool with a value, switch, number, list, choice
        assert!(a.group_by_length);
        assert!(a.gradient_checkpointing);
        assert_eq!((a.learning_rate, a.lora_r), (1e-4, 64));
        assert_eq!(a.target_modules, "q_proj,v_proj");
        assert_eq!(a.lr_scheduler_type, SchedulerType::Cosine);
        assert!(!a.use_rslora);
        // the same in JSON, with `-` names; true for a valued bool; flags on the command line win
        let json = d.path().join("c.json");
        std::fs::write(
            &json,
            r#"{"group-by-length": true, "gradient_checkpointing": false, "lora-r": 8, "warmup_ratio": 0.1}"#,
        )
        .unwrap();
        assert!(parse(&json, &[]).unwrap().group_by_length);
        let a = parse(&json, &["--lora-r", "16", "--group-by-length", "false"]).unwrap();
        assert!(!a.group_by_length && !a.gradient_checkpointing);
        assert_eq!((a.lora_r, a.warmup_ratio), (16, 0.1));
        // unknown keys and switch values that are not booleans are named
        std::fs::write(&toml, "lora_rank = 8\n").unwrap();
        let e = parse(&toml, &[]).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("'lora_rank'"), "{e}");
        std::fs::write(&toml, "use_rslora = \"yes\"\n").unwrap();
        let e = parse(&toml, &[]).unwrap_err().to_string();
        assert!(e.contains("'use_rslora' is a switch"), "{e}");
    }
}
