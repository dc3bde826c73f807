//! The study: the article's method as one command. A study file names a baseline (trainer
//! arguments, HF names) and factors (a setting and its values); each factor varies one setting
//! around the baseline, one at a time. `plan` turns the file into training points (a value
//! equal to the baseline's, or to another point's, is trained once and shared), frozen under
//! the study's directory; `scripts/study.sh` trains them through `scripts/sweep.sh`, locally
//! or as one Slurm array. `report` then answers the same held-out questions with the base
//! model and every trained point at once through the batched engine, scores the answers, and
//! writes `study.json` and `report.html` (results first, then one section per factor).
//!
//! Layout of `runs/NAME/`: `study.toml` (the study file as planned), `plan.json`,
//! `points.tsv` (the sweep's points), `dataprep.args`, `shards/`, one directory per point,
//! `answers/` (each point's answers, reused while its adapter is unchanged), `study.json`,
//! `report.html`.

use crate::data::formats::{read_file, Conversation, Purpose};
use crate::infer::{ModelOptions, Reply, Session};
use crate::report::{self, fmt, Run};
use crate::train::args::{flags_of, parse_flags};
use crate::train::run::RunStatus;
use anyhow::{anyhow, bail, Context, Result};
use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STUDY_COPY: &str = "study.toml";
pub const PLAN_FILE: &str = "plan.json";
pub const POINTS_FILE: &str = "points.tsv";
pub const DATAPREP_ARGS: &str = "dataprep.args";
pub const RESULTS_FILE: &str = "study.json";
pub const REPORT_FILE: &str = "report.html";
pub const BASELINE: &str = "baseline";

/// Settings that say where a run goes rather than how it trains: never a factor.
const NOT_FACTORS: &[&str] = &[
    "model",
    "data",
    "output_dir",
    "run_name",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "config",
];

// ---- the study file

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyFile {
    title: Option<String>,
    description: Option<String>,
    /// Trainer arguments of the baseline (HF names, as in `trainer --config`).
    baseline: toml::Table,
    #[serde(rename = "factor", default)]
    factors: Vec<FactorSpec>,
    data: DataSpec,
    answers: Option<AnswerSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FactorSpec {
    /// A trainer argument (HF name).
    setting: String,
    values: Vec<toml::Value>,
    title: Option<String>,
    /// Why these values (shown in the report).
    note: Option<String>,
}

/// The conversations the points train on: dataprep inputs and flags (paths relative to the
/// study file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub input: Vec<PathBuf>,
    #[serde(default = "default_dataprep_args")]
    pub dataprep_args: Vec<String>,
}

fn default_dataprep_args() -> Vec<String> {
    ["--val-split", "0.15", "--max-seq-len", "256"]
        .map(String::from)
        .to_vec()
}

/// The held-out questions every run answers (greedy, multi-turn: each next question sees the
/// model's own earlier answers), and how the answers are scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerSpec {
    /// Conversations (any format infer reads); their assistant turns, where present, are the
    /// reference replies for ROUGE-L.
    pub questions: PathBuf,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// System prompt for conversations without one.
    #[serde(default)]
    pub system: Option<String>,
    /// How ROUGE-L and the repetition rate split text into tokens: `rouge-score` (Google's
    /// rouge-score, as HF evaluate uses it: lowercased ASCII words), `unicode` (Unicode words,
    /// any script that separates words with spaces) or `character` (one token per character:
    /// the usual choice for Chinese).
    #[serde(default = "default_rouge_tokenizer")]
    pub tokenizer: String,
    /// n of the repeated n-grams counted within a reply.
    #[serde(default = "default_ngram")]
    pub repeat_ngram: usize,
}

fn default_max_new_tokens() -> usize {
    64
}
fn default_rouge_tokenizer() -> String {
    "rouge-score".into()
}
fn default_ngram() -> usize {
    4
}

// ---- the plan

/// One training point: its directory name under the study and its trainer flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub name: String,
    pub flags: Vec<String>,
}

/// One value of a factor and the point that trains it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Level {
    pub value: String,
    pub point: String,
    pub baseline: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Factor {
    pub setting: String,
    pub title: String,
    pub note: Option<String>,
    pub levels: Vec<Level>,
}

/// What `plan` resolved from a study file (every path absolute): written to `plan.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub title: String,
    pub description: Option<String>,
    pub study_file: PathBuf,
    pub model: PathBuf,
    /// Trainer arguments given after `--`, applied to every point.
    pub extra: Vec<String>,
    pub baseline: BTreeMap<String, String>,
    pub points: Vec<Point>,
    pub factors: Vec<Factor>,
    pub data: DataSpec,
    pub answers: Option<AnswerSpec>,
}

/// A factor value as people write it, also used in the point's directory name.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::Float(f) => report::tick(*f),
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items.iter().map(show).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The resolved arguments of a set of flags, without what names the run: equal for two
/// points that train the same.
fn fingerprint(flags: &[String]) -> Result<serde_json::Value> {
    let args = parse_flags(flags)?;
    let mut v = serde_json::to_value(&args)?;
    if let Some(o) = v.as_object_mut() {
        for k in NOT_FACTORS {
            o.remove(*k);
        }
    }
    Ok(v)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}: cannot resolve", p.display()))
}

fn read_study(study_file: &Path) -> Result<String> {
    std::fs::read_to_string(study_file)
        .with_context(|| format!("{}: cannot read the study file", study_file.display()))
}

/// Reads a study file and expands it into points: the baseline first, then each factor's
/// values that differ from every point before them.
pub fn plan(study_file: &Path, model: &Path, extra: &[String]) -> Result<Plan> {
    plan_text(study_file, &read_study(study_file)?, model, extra)
}

/// `plan` of the study file `study_file` whose text is `text`.
fn plan_text(study_file: &Path, text: &str, model: &Path, extra: &[String]) -> Result<Plan> {
    let path = study_file.display().to_string();
    let spec: StudyFile = toml::from_str(text).map_err(|e| {
        anyhow!(
            "{path}: {}",
            e.to_string().lines().collect::<Vec<_>>().join(" ")
        )
    })?;
    if spec.factors.is_empty() {
        bail!("{path}: no [[factor]] tables: a study varies at least one setting");
    }
    let dir = absolute(study_file.parent().unwrap_or(Path::new(".")))?;
    let to_obj = |t: &toml::Table| -> Result<serde_json::Map<String, serde_json::Value>> {
        match serde_json::to_value(t)? {
            serde_json::Value::Object(o) => Ok(o),
            _ => unreachable!("a TOML table is an object"),
        }
    };
    // a point's flags (the trainer flags after `--` included) and what they resolve to
    let checked = |flags: Vec<String>, what: &str| -> Result<(Vec<String>, serde_json::Value)> {
        if let Some(f) = flags.iter().find(|f| f.chars().any(char::is_whitespace)) {
            bail!("{path}: {what}: '{f}' has white space, which a point's flags cannot hold");
        }
        let mut all = flags;
        all.extend(extra.iter().cloned());
        let print = fingerprint(&all).map_err(|e| anyhow!("{path}: {what}: {e}"))?;
        Ok((all, print))
    };
    for k in spec.baseline.keys() {
        if NOT_FACTORS.contains(&k.replace('-', "_").as_str()) {
            bail!("{path}: [baseline] {k}: set by the study for each point, not in the file");
        }
    }
    let base_obj = to_obj(&spec.baseline)?;
    let (base_flags, base_print) = checked(
        flags_of(&base_obj, &format!("{path} [baseline]"))?,
        "[baseline]",
    )?;
    let mut points = vec![Point {
        name: BASELINE.into(),
        flags: base_flags,
    }];
    let mut prints = vec![base_print];
    let mut factors = Vec::new();
    for (i, f) in spec.factors.iter().enumerate() {
        let what = format!("factor {} ({})", i + 1, f.setting);
        let setting = f.setting.replace('-', "_");
        if NOT_FACTORS.contains(&setting.as_str()) {
            bail!("{path}: {what}: '{}' is not a training setting", f.setting);
        }
        if f.values.is_empty() {
            bail!("{path}: {what}: no values");
        }
        let mut levels = Vec::new();
        for v in &f.values {
            // the baseline with the setting replaced, however the baseline spells it
            let mut obj = base_obj.clone();
            obj.retain(|k, _| k.replace('-', "_") != setting);
            obj.insert(setting.clone(), serde_json::to_value(v)?);
            let value = show(v);
            let (flags, print) = checked(
                flags_of(&obj, &format!("{path} {what}"))?,
                &format!("{what} value {value}"),
            )?;
            let point = match prints.iter().position(|p| *p == print) {
                Some(k) => points[k].name.clone(),
                None => {
                    let name = format!("{setting}={}", value.replace(',', "+"));
                    points.push(Point {
                        name: name.clone(),
                        flags,
                    });
                    prints.push(print);
                    name
                }
            };
            if levels.iter().any(|l: &Level| l.point == point) {
                bail!("{path}: {what}: value {value} trains the same run as an earlier value");
            }
            levels.push(Level {
                baseline: point == BASELINE,
                value,
                point,
            });
        }
        factors.push(Factor {
            title: f.title.clone().unwrap_or_else(|| setting.clone()),
            setting,
            note: f.note.clone(),
            levels,
        });
    }
    let baseline = base_obj
        .iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                other => toml::Value::try_from(other)
                    .map(|t| show(&t))
                    .unwrap_or_else(|_| other.to_string()),
            };
            (k.clone(), s)
        })
        .collect();
    let data = DataSpec {
        // relative to the study file (an absolute path stays as it is)
        input: spec.data.input.iter().map(|p| dir.join(p)).collect(),
        dataprep_args: spec.data.dataprep_args,
    };
    if data.input.is_empty() {
        bail!("{path}: [data] input: no files");
    }
    let answers = spec.answers.map(|a| AnswerSpec {
        questions: dir.join(&a.questions),
        ..a
    });
    if let Some(a) = &answers {
        scorer(&a.tokenizer).map_err(|e| anyhow!("{path}: [answers] tokenizer: {e}"))?;
        if a.repeat_ngram == 0 || a.max_new_tokens == 0 {
            bail!("{path}: [answers] repeat_ngram and max_new_tokens must be at least 1");
        }
    }
    Ok(Plan {
        title: spec.title.unwrap_or_else(|| {
            study_file
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "study".into())
        }),
        description: spec.description,
        study_file: absolute(study_file)?,
        model: absolute(model)?,
        extra: extra.to_vec(),
        baseline,
        points,
        factors,
        data,
        answers,
    })
}

/// Plans a study into `out` (runs/NAME): a study under an existing name is the same study
/// file with the same model and trainer arguments, or it is refused. Writes the study file's
/// copy, `plan.json`, `points.tsv` (one `name<TAB>flags` line per point) and `dataprep.args`
/// (the inputs, `--`, the dataprep flags: one per line).
pub fn write_plan(study_file: &Path, model: &Path, extra: &[String], out: &Path) -> Result<Plan> {
    let text = read_study(study_file)?;
    let plan = plan_text(study_file, &text, model, extra)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let copy = out.join(STUDY_COPY);
    if let Ok(old) = std::fs::read_to_string(&copy) {
        if old != text {
            return Err(crate::cli::usage(format!(
                "study '{name}' already exists with another study file ({}); choose another --name, or remove {}",
                copy.display(),
                out.display()
            )));
        }
        if let Ok(old) = load_plan(out) {
            if old.points != plan.points || old.model != plan.model {
                return Err(crate::cli::usage(format!(
                    "study '{name}' already exists with other trainer arguments or another model (it has --model {} -- {}); choose another --name, or remove {}",
                    old.model.display(),
                    old.extra.join(" "),
                    out.display()
                )));
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    crate::atomic::write_file(&copy, text.as_bytes())?;
    crate::atomic::write_json(&out.join(PLAN_FILE), &plan)?;
    let tsv: String = plan
        .points
        .iter()
        .map(|p| format!("{}\t{}\n", p.name, p.flags.join(" ")))
        .collect();
    crate::atomic::write_file(&out.join(POINTS_FILE), tsv.as_bytes())?;
    let mut args: Vec<String> = plan
        .data
        .input
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    args.push("--".into());
    args.extend(plan.data.dataprep_args.iter().cloned());
    crate::atomic::write_file(
        &out.join(DATAPREP_ARGS),
        (args.join("\n") + "\n").as_bytes(),
    )?;
    Ok(plan)
}

pub fn load_plan(out: &Path) -> Result<Plan> {
    let p = out.join(PLAN_FILE);
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{}: not a study directory (no {PLAN_FILE})", out.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid plan", p.display()))
}

// ---- answers and their scores

fn scorer(tokenizer: &str) -> Result<rougers::RougeScorer> {
    let t = match tokenizer {
        "rouge-score" => rougers::Tokenizer::new(false),
        "unicode" => rougers::Tokenizer::unicode(),
        "character" => rougers::Tokenizer::character(),
        other => bail!("'{other}' is not one of rouge-score, unicode, character"),
    };
    Ok(rougers::RougeScorer::with_tokenizer(
        vec![rougers::RougeType::L],
        t,
    )?)
}

/// The answer scores of one run over every question.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub replies: usize,
    /// Share of replies that ended on the end-of-turn token (not cut by max_new_tokens).
    pub ended_with_eot: f64,
    /// Mean over replies of the share of its n-grams that repeat an earlier n-gram of the
    /// same reply.
    pub repeated_ngrams: f64,
    /// Share of second and later replies that repeat the reply before them in the same
    /// conversation (ROUGE-L F1 >= 0.8 between the two).
    pub repeats_previous: f64,
    /// Mean ROUGE-L F1 against the reference replies, over the replies that have one.
    pub rouge_l: Option<f64>,
}

/// The threshold of ROUGE-L F1 above which a reply repeats the previous one.
pub const REPEAT_PREVIOUS_F1: f64 = 0.8;

/// Scores the replies of one run: `replies[c][t]` answers user turn `t` of conversation `c`,
/// `references[c][t]` is the reference reply when the question file has one.
pub fn score(
    replies: &[Vec<Reply>],
    references: &[Vec<Option<String>>],
    spec: &AnswerSpec,
) -> Result<Scores> {
    let rs = scorer(&spec.tokenizer)?;
    let f1 = |a: &str, b: &str| {
        rs.score(a, b)
            .get(rougers::RougeType::L)
            .map(|s| s.fmeasure)
            .unwrap_or(0.0)
    };
    let (mut n, mut eot, mut rep) = (0usize, 0usize, 0.0f64);
    let (mut later, mut repeats) = (0usize, 0usize);
    let (mut rouge_sum, mut rouge_n) = (0.0f64, 0usize);
    for (c, conv) in replies.iter().enumerate() {
        for (t, r) in conv.iter().enumerate() {
            n += 1;
            eot += r.stopped as usize;
            let toks = rs.tokenizer().tokenize(&r.text);
            let k = spec.repeat_ngram;
            if toks.len() >= k {
                let grams: Vec<&[String]> = toks.windows(k).collect();
                let distinct: std::collections::HashSet<&[String]> =
                    grams.iter().copied().collect();
                rep += 1.0 - distinct.len() as f64 / grams.len() as f64;
            }
            if t > 0 {
                later += 1;
                repeats += (f1(&conv[t - 1].text, &r.text) >= REPEAT_PREVIOUS_F1) as usize;
            }
            if let Some(Some(reference)) = references.get(c).and_then(|x| x.get(t)) {
                rouge_sum += f1(reference, &r.text);
                rouge_n += 1;
            }
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(Scores {
        replies: n,
        ended_with_eot: share(eot, n),
        repeated_ngrams: if n == 0 { 0.0 } else { rep / n as f64 },
        repeats_previous: share(repeats, later),
        rouge_l: (rouge_n > 0).then(|| rouge_sum / rouge_n as f64),
    })
}

/// The reference reply of each user turn: the assistant message right after it, when the
/// file has a non-empty one.
pub fn references(c: &Conversation) -> Vec<Option<String>> {
    let m = &c.messages;
    (0..m.len())
        .filter(|&i| m[i].role == "user")
        .map(|i| {
            m.get(i + 1)
                .filter(|r| r.role == "assistant" && !r.content.trim().is_empty())
                .map(|r| r.content.clone())
        })
        .collect()
}

/// One run's answers as kept in `answers/NAME.json`, with what they were made from.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answers {
    made_from: String,
    replies: Vec<Vec<Reply>>,
}

/// A file as far as answers made from it go: its path, size and modification time.
fn stamp(p: &Path) -> String {
    std::fs::metadata(p)
        .map(|m| {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{}:{}:{t}", p.display(), m.len())
        })
        .unwrap_or_default()
}

/// `answers/NAME.json` of a run (`None`: the base model).
fn answers_file(dir: &Path, name: Option<&str>) -> PathBuf {
    dir.join(format!("{}.json", name.unwrap_or("base-model")))
}

// ---- the report

/// What a point's run came to, as study.json and the report show it.
#[derive(Debug, Clone, Serialize)]
pub struct PointResult {
    pub name: String,
    pub dir: PathBuf,
    pub flags: Vec<String>,
    pub status: String,
    /// Why it ended early or failed (a diverged run's message).
    pub message: Option<String>,
    pub step: Option<usize>,
    pub final_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<i64>,
    pub wall_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub peak_mem_mib: Option<f64>,
    pub scores: Option<Scores>,
}

/// The whole study as `study.json` holds it.
#[derive(Debug, Clone, Serialize)]
pub struct StudyResults {
    pub title: String,
    pub study_file: PathBuf,
    pub model: PathBuf,
    pub factors: Vec<FactorResult>,
    pub points: Vec<PointResult>,
    pub base_scores: Option<Scores>,
    pub answers: Option<AnswerSpec>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FactorResult {
    #[serde(flatten)]
    pub factor: Factor,
    /// The value whose run reached the lowest best eval loss (completed runs only).
    pub best: Option<String>,
}

fn point_result(p: &Point, run: &Run, scores: Option<Scores>) -> PointResult {
    let rec = run.record.as_ref();
    // the best evaluation after training (the one before it is every point's start)
    let best = run.best_eval().filter(|b| b.0 > 0);
    let tokens = run.rows.last().map(|r| r.tokens).unwrap_or(0);
    let elapsed = rec
        .map(|r| r.elapsed_s)
        .filter(|&s| s > 0.0)
        .or(run.rows.last().map(|r| r.elapsed_s));
    PointResult {
        name: p.name.clone(),
        dir: run.dir.clone(),
        flags: p.flags.clone(),
        status: run.status().to_string(),
        message: rec.and_then(|r| r.reason.clone().or(r.error.clone())),
        step: rec.map(|r| r.global_step),
        final_loss: run.series("loss").last().map(|x| x.1),
        best_eval_loss: best.map(|b| b.1),
        best_step: best.map(|b| b.0),
        wall_s: run.wall_s(),
        tokens_per_s: elapsed
            .filter(|&s| s > 0.0 && tokens > 0)
            .map(|s| tokens as f64 / s),
        peak_mem_mib: run.peak_mem_mib(),
        scores,
    }
}

/// Answers the questions with the base model and every completed point that has no answers
/// yet (or whose adapter changed since), all at once through the engine; returns each run's
/// replies by name (`None`: the base model).
fn answer(
    plan: &Plan,
    spec: &AnswerSpec,
    out: &Path,
    runs: &[Run],
    convs: &[Conversation],
    log: &mut dyn FnMut(&str),
) -> Result<BTreeMap<Option<String>, Vec<Vec<Reply>>>> {
    let dir = out.join("answers");
    std::fs::create_dir_all(&dir)?;
    let mut have = BTreeMap::new();
    let mut todo: Vec<(Option<String>, String)> = Vec::new();
    // what every run's answers depend on (the model, the questions, the decoding), then its
    // adapter file
    let common = format!(
        "model {} | questions {} | max_new_tokens {} | system {:?} | greedy",
        stamp(&plan.model.join("config.json")),
        crate::train::run::file_sha256(&spec.questions),
        spec.max_new_tokens,
        spec.system
    );
    let answerable = std::iter::once(None).chain(
        runs.iter()
            .filter(|r| r.record.as_ref().map(|x| x.status) == Some(RunStatus::Completed))
            .filter(|r| r.dir.join("adapter_model.safetensors").exists())
            .map(|r| Some(r.dir.file_name().unwrap().to_string_lossy().to_string())),
    );
    for name in answerable {
        let file = answers_file(&dir, name.as_deref());
        let adapter = name
            .as_ref()
            .map(|n| stamp(&out.join(n).join("adapter_model.safetensors")));
        let from = format!(
            "{common} | adapter {}",
            adapter.as_deref().unwrap_or("none")
        );
        let cached: Option<Answers> = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .filter(|a: &Answers| a.made_from == from);
        match cached {
            Some(a) => {
                have.insert(name, a.replies);
            }
            None => todo.push((name, from)),
        }
    }
    if todo.is_empty() {
        return Ok(have);
    }
    log(&format!(
        "study: answering {} question(s) with {} run(s) at once (the base model{})",
        convs.len(),
        todo.len(),
        if todo.iter().any(|t| t.0.is_some()) {
            " and the trained points"
        } else {
            ""
        }
    ));
    let adapters: Vec<(String, PathBuf)> = todo
        .iter()
        .filter_map(|(n, _)| n.clone())
        .map(|n| (n.clone(), out.join(&n)))
        .collect();
    let mut options = ModelOptions::default();
    options.engine.max_batch = 32;
    options.engine.max_queue = 256;
    let params = crate::generate::SamplingParams {
        max_new_tokens: spec.max_new_tokens,
        ..Default::default()
    };
    let session = Session::open(&plan.model, &adapters, None, None, &options, params)?;
    let t0 = std::time::Instant::now();
    let which: Vec<Option<String>> = todo.iter().map(|t| t.0.clone()).collect();
    let refs: Vec<&Conversation> = convs.iter().collect();
    let results = session.answer_all(&refs, spec.system.as_deref(), &which, |_, _| {});
    let mut per_run: Vec<Vec<Vec<Reply>>> = vec![Vec::new(); which.len()];
    for (c, conv) in results.into_iter().enumerate() {
        for (k, r) in conv.into_iter().enumerate() {
            let replies = r.with_context(|| {
                format!(
                    "{}: conversation {}: answering with {}",
                    spec.questions.display(),
                    c + 1,
                    which[k].as_deref().unwrap_or("the base model")
                )
            })?;
            per_run[k].push(replies);
        }
    }
    let tokens: usize = per_run.iter().flatten().flatten().map(|r| r.tokens).sum();
    log(&format!(
        "study: {} replies, {tokens} tokens in {:.1} s",
        per_run.iter().flatten().flatten().count(),
        t0.elapsed().as_secs_f64()
    ));
    for ((name, from), replies) in todo.into_iter().zip(per_run) {
        crate::atomic::write_json(
            &answers_file(&dir, name.as_deref()),
            &Answers {
                made_from: from,
                replies: replies.clone(),
            },
        )?;
        have.insert(name, replies);
    }
    Ok(have)
}

/// Reads every point of the study in `out`, answers the questions (reusing earlier answers),
/// scores them, and writes `study.json` and `report.html`. Points not finished are listed with
/// their status; a diverged one with its step and message.
pub fn write_report(out: &Path, log: &mut dyn FnMut(&str)) -> Result<StudyResults> {
    let plan = load_plan(out)?;
    let mut runs: Vec<Run> = plan
        .points
        .iter()
        .map(|p| Run::read(&out.join(&p.name), true))
        .collect::<Result<_>>()?;
    for (r, p) in runs.iter_mut().zip(&plan.points) {
        r.name = p.name.clone();
    }
    // the questions, their references, the answers and their scores
    let mut answers = BTreeMap::new();
    let mut convs = Vec::new();
    let mut refs = Vec::new();
    if let Some(spec) = &plan.answers {
        for rec in read_file(&spec.questions, Purpose::Prompting)? {
            convs.push(rec.map_err(|b| anyhow!("{b}"))?);
        }
        refs = convs.iter().map(references).collect();
        answers = answer(&plan, spec, out, &runs, &convs, log)?;
    }
    let scores_of = |name: Option<String>| -> Result<Option<Scores>> {
        match (&plan.answers, answers.get(&name)) {
            (Some(spec), Some(r)) => Ok(Some(score(r, &refs, spec)?)),
            _ => Ok(None),
        }
    };
    let mut points = Vec::new();
    for (p, r) in plan.points.iter().zip(&runs) {
        points.push(point_result(p, r, scores_of(Some(p.name.clone()))?));
    }
    let by_name: BTreeMap<&str, &PointResult> =
        points.iter().map(|p| (p.name.as_str(), p)).collect();
    let factors: Vec<FactorResult> = plan
        .factors
        .iter()
        .map(|f| {
            let best = f
                .levels
                .iter()
                .filter_map(|l| {
                    let p = by_name[l.point.as_str()];
                    (p.status == "completed")
                        .then_some(p.best_eval_loss)
                        .flatten()
                        .map(|e| (l, e))
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(l, _)| l.value.clone());
            FactorResult {
                factor: f.clone(),
                best,
            }
        })
        .collect();
    let results = StudyResults {
        title: plan.title.clone(),
        study_file: plan.study_file.clone(),
        model: plan.model.clone(),
        base_scores: scores_of(None)?,
        factors,
        points,
        answers: plan.answers.clone(),
    };
    crate::atomic::write_json(&out.join(RESULTS_FILE), &results)?;
    let html = render(&plan, &results, &runs, &convs, &refs, &answers)?;
    crate::atomic::write_file(&out.join(REPORT_FILE), html.as_bytes())?;
    Ok(results)
}

const TEMPLATE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="dialora study"><title>dialora study: {{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:20px 24px;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:26px 0 8px;border-top:1px solid #ddd;padding-top:14px} h3{font-size:15px;margin:16px 0 6px}
.sub{color:#555;font-size:13px;margin:0 0 12px} .note{color:#555;font-size:13px;margin:4px 0 10px;max-width:1000px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:10px}
.chart{border:1px solid #ddd;border-radius:6px;padding:2px;background:#fff} .chart svg{width:100%;height:auto}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3} .num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#eef7ee} .star{color:#1a7f37;font-weight:700}
.status-completed{color:#1a7f37} .status-failed,.status-diverged,.status-aborted{color:#c62828;font-weight:600} .status-interrupted,.status-running,.status-not.started{color:#b26a00}
td.answer{white-space:pre-wrap;min-width:160px;max-width:320px;font-size:12.5px} td.ref{color:#555}
.cut{color:#b26a00;font-style:italic} .scroll{overflow-x:auto}
</style></head><body>
<h1>dialora study: {{ title }}</h1>
<p class="sub">{{ points|length }} training runs for {{ factors|length }} factors, one setting changed at a time around the baseline; base model {{ model }}; report by dialora {{ version }}.</p>
{% if description %}<p class="note">{{ description }}</p>{% endif %}
<p class="note">Baseline: {% for k, v in baseline|items %}<code>{{ k }}={{ v }}</code>{% if not loop.last %}, {% endif %}{% endfor %}{% if extra %}; every run also: <code>{{ extra }}</code>{% endif %}.
<span class="star">&#9733;</span> marks the value of each factor with the lowest best eval loss among completed runs.{% if scored %} Answer scores over {{ replies }} replies to {{ questions }} held-out questions (greedy, at most {{ max_new_tokens }} new tokens): <i>EOT</i> the share of replies ending on the end-of-turn token, <i>rep. {{ ngram }}-grams</i> the share of a reply's {{ ngram }}-grams that repeat, <i>repeats prev.</i> the share of later replies that repeat the reply before them (ROUGE-L F1 &ge; {{ repeat_f1 }}), <i>ROUGE-L</i> F1 against the reference replies ({{ tokenizer }} tokens).{% endif %}</p>
<table class="results"><tr><th>factor</th><th>value</th><th>status</th><th>final train loss</th><th>best eval loss (step)</th><th>wall time</th><th>tokens/s</th><th>peak memory</th>{% if scored %}<th>EOT</th><th>rep. {{ ngram }}-grams</th><th>repeats prev.</th><th>ROUGE-L</th>{% endif %}</tr>
{% if base %}<tr><td><b>base model</b></td><td>(not trained)</td><td>–</td><td class="num">–</td><td class="num">–</td><td class="num">–</td><td class="num">–</td><td class="num">–</td>{{ base|safe }}</tr>{% endif %}
{% for f in factors %}{% for l in f.rows %}<tr{% if l.best %} class="best"{% endif %}>{% if loop.first %}<td rowspan="{{ f.rows|length }}"><a href="#factor-{{ f.setting }}"><b>{{ f.title }}</b></a></td>{% endif %}
<td>{% if l.best %}<span class="star">&#9733;</span> {% endif %}{{ l.value }}{% if l.baseline %} <i>(baseline)</i>{% endif %}</td>
<td class="status-{{ l.status }}">{{ l.status }}{% if l.status != "completed" and l.step is not none %} at step {{ l.step }}{% endif %}</td>
<td class="num">{{ l.final_loss }}</td><td class="num">{{ l.best_eval }}</td><td class="num">{{ l.wall }}</td><td class="num">{{ l.tps }}</td><td class="num">{{ l.mem }}</td>{{ l.scores|safe }}</tr>
{% endfor %}{% endfor %}</table>
{% for f in factors %}
<h2 id="factor-{{ f.setting }}">{{ f.title }}: {% for l in f.rows %}{{ l.value }}{% if not loop.last %} / {% endif %}{% endfor %}</h2>
{% if f.note %}<p class="note">{{ f.note }}</p>{% endif %}
{% for l in f.rows %}{% if l.message %}<p class="note"><span class="status-{{ l.status }}">{{ f.setting }}={{ l.value }}: {{ l.status }}{% if l.step is not none %} at step {{ l.step }}{% endif %}</span>: {{ l.message }}</p>{% endif %}{% endfor %}
<div class="charts">{% for c in f.charts %}<div class="chart">{{ c|safe }}</div>{% endfor %}</div>
{% if f.answers %}<h3>Answers to the same questions</h3>
{% for q in f.answers %}<div class="scroll"><table><tr><th>question {{ q.n }}</th>{% if q.has_ref %}<th>reference</th>{% endif %}<th>base model</th>{% for l in f.rows %}<th>{{ f.setting }}={{ l.value }}{% if l.baseline %} (baseline){% endif %}</th>{% endfor %}</tr>
{% for t in q.turns %}<tr><td class="answer"><b>{{ t.user }}</b></td>{% if q.has_ref %}<td class="answer ref">{{ t.reference }}</td>{% endif %}{% for a in t.cells %}<td class="answer">{% if a.missing %}<span class="cut">({{ a.missing }})</span>{% else %}{{ a.text }}{% if not a.stopped %} <span class="cut">(cut at max tokens)</span>{% endif %}{% endif %}</td>{% endfor %}</tr>{% endfor %}
</table></div>{% endfor %}{% endif %}
{% endfor %}
</body></html>
"##;

fn score_cells(s: Option<&Scores>) -> String {
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    match s {
        Some(s) => format!(
            r#"<td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td>"#,
            pct(s.ended_with_eot),
            pct(s.repeated_ngrams),
            pct(s.repeats_previous),
            fmt(s.rouge_l, 3)
        ),
        None => r#"<td class="num">–</td>"#.repeat(4),
    }
}

fn render(
    plan: &Plan,
    results: &StudyResults,
    runs: &[Run],
    convs: &[Conversation],
    refs: &[Vec<Option<String>>],
    answers: &BTreeMap<Option<String>, Vec<Vec<Reply>>>,
) -> Result<String> {
    let index: BTreeMap<&str, usize> = plan
        .points
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let scored = plan.answers.is_some();
    let mut factors = Vec::new();
    for fr in &results.factors {
        let f = &fr.factor;
        let mine: Vec<Run> = f
            .levels
            .iter()
            .map(|l| {
                let mut r = runs[index[l.point.as_str()]].clone();
                r.name = format!("{}={}", f.setting, l.value);
                r
            })
            .collect();
        let mut charts = Vec::new();
        let shown = ["loss", "eval_loss", "grad_norm"];
        for (col, title) in report::CHARTS.iter().filter(|c| shown.contains(&c.0)) {
            for x in [report::XAxis::Step, report::XAxis::Wall] {
                charts.push(report::chart_svg_on(
                    &mine,
                    col,
                    title,
                    *col == "eval_loss",
                    x,
                )?);
            }
        }
        let rows: Vec<_> = f
            .levels
            .iter()
            .map(|l| {
                let p = &results.points[index[l.point.as_str()]];
                context! {
                    value => l.value, baseline => l.baseline, status => p.status,
                    best => fr.best.as_deref() == Some(l.value.as_str()),
                    step => p.step, message => p.message,
                    final_loss => fmt(p.final_loss, 4),
                    best_eval => match (p.best_eval_loss, p.best_step) {
                        (Some(e), Some(s)) => format!("{e:.4} ({s})"),
                        _ => "–".into(),
                    },
                    wall => p.wall_s.map(report::duration).unwrap_or_else(|| "–".into()),
                    tps => fmt(p.tokens_per_s, 0),
                    mem => p.peak_mem_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "–".into()),
                    scores => if scored { score_cells(p.scores.as_ref()) } else { String::new() },
                }
            })
            .collect();
        let mut qs = Vec::new();
        if scored {
            for (c, conv) in convs.iter().enumerate() {
                let users = conv.user_turns();
                let turns: Vec<_> = users
                    .iter()
                    .enumerate()
                    .map(|(t, u)| {
                        let cell = |name: Option<String>, status: &str| match answers
                            .get(&name)
                            .and_then(|a| a.get(c))
                            .and_then(|a| a.get(t))
                        {
                            Some(r) => context! { text => r.text, stopped => r.stopped },
                            None => context! { missing => format!("no answer: {status}") },
                        };
                        let mut cells = vec![cell(None, "")];
                        for l in &f.levels {
                            let p = &results.points[index[l.point.as_str()]];
                            cells.push(cell(Some(l.point.clone()), &p.status));
                        }
                        context! {
                            user => u,
                            reference => refs[c].get(t).cloned().flatten().unwrap_or_default(),
                            cells => cells,
                        }
                    })
                    .collect();
                qs.push(context! {
                    n => c + 1,
                    has_ref => refs[c].iter().any(Option::is_some),
                    turns => turns,
                });
            }
        }
        factors.push(context! {
            setting => f.setting, title => f.title, note => f.note,
            rows => rows, charts => charts, answers => qs,
        });
    }
    let spec = plan.answers.as_ref();
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.add_template("study.html", TEMPLATE)?;
    Ok(env.get_template("study.html")?.render(context! {
        title => plan.title,
        description => plan.description,
        model => plan.model.display().to_string(),
        baseline => plan.baseline,
        extra => plan.extra.join(" "),
        points => plan.points,
        factors => factors,
        scored => scored,
        base => results.base_scores.as_ref().map(|s| score_cells(Some(s))),
        replies => results.base_scores.as_ref().map(|s| s.replies).unwrap_or(0),
        questions => convs.len(),
        max_new_tokens => spec.map(|s| s.max_new_tokens),
        ngram => spec.map(|s| s.repeat_ngram),
        tokenizer => spec.map(|s| s.tokenizer.clone()),
        repeat_f1 => REPEAT_PREVIOUS_F1,
        version => env!("CARGO_PKG_VERSION"),
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str, stopped: bool) -> Reply {
        Reply {
            text: text.into(),
            tokens: 1,
            stopped,
            tokens_per_s: 0.0,
        }
    }

    fn spec() -> AnswerSpec {
        AnswerSpec {
            questions: PathBuf::new(),
            max_new_tokens: 8,
            system: None,
            tokenizer: "rouge-score".into(),
            repeat_ngram: 2,
        }
    }

    #[test]
    fn scores_count_what_they_say() {
        let replies = vec![
            vec![
                // 2-grams: a b, b a, a b, b a: 2 of 4 repeat an earlier one
                reply("a b a b a", true),
                // the same as the previous reply: a repeat
                reply("a b a b a", false),
            ],
            vec![reply("the cat sat", true)],
        ];
        let refs = vec![
            vec![None, None],
            vec![Some("the cat sat on the mat".to_string())],
        ];
        let s = score(&replies, &refs, &spec()).unwrap();
        assert_eq!(s.replies, 3);
        assert!((s.ended_with_eot - 2.0 / 3.0).abs() < 1e-12);
        // (0.5 + 0.5 + 0) / 3
        assert!((s.repeated_ngrams - 1.0 / 3.0).abs() < 1e-12, "{s:?}");
        assert_eq!(s.repeats_previous, 1.0);
        // LCS 3 of 3 predicted and 6 reference words: P 1, R 0.5, F1 2/3
        assert!((s.rouge_l.unwrap() - 2.0 / 3.0).abs() < 1e-12, "{s:?}");
        // no references: no ROUGE-L
        let s = score(&replies[..1], &[vec![None, None]], &spec()).unwrap();
        assert_eq!(s.rouge_l, None);
    }

    fn write(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("s.toml");
        std::fs::write(&p, format!("[data]\ninput = [\"train.jsonl\"]\n{body}")).unwrap();
        p
    }

    #[test]
    fn a_value_that_trains_the_baseline_is_the_baseline() {
        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "[baseline]\nlearning_rate = 1e-3\nlora_r = 8\n\
             [[factor]]\nsetting = \"learning_rate\"\nvalues = [0.001, 2e-4]\n\
             [[factor]]\nsetting = \"lora_r\"\nvalues = [8, 16]\n\
             [[factor]]\nsetting = \"lora_alpha\"\nvalues = [8, 16]\n",
        );
        let p = plan(&f, d.path(), &["--max-steps".into(), "2".into()]).unwrap();
        let names: Vec<&str> = p.points.iter().map(|x| x.name.as_str()).collect();
        // lora_alpha's default is 8: its first value is the baseline too
        assert_eq!(
            names,
            [
                "baseline",
                "learning_rate=0.0002",
                "lora_r=16",
                "lora_alpha=16"
            ]
        );
        for f in &p.factors {
            assert_eq!(f.levels[0].point, BASELINE, "{f:?}");
            assert!(f.levels[0].baseline && !f.levels[1].baseline);
        }
        assert!(p
            .points
            .iter()
            .all(|x| x.flags.ends_with(&["--max-steps".into(), "2".into()])));
        assert_eq!(p.data.input, [d.path().join("train.jsonl")]);
        // a factor replaces its setting however the baseline spells it
        let f = write(
            d.path(),
            "[baseline]\nlora-r = 8\n[[factor]]\nsetting = \"lora_r\"\nvalues = [16]\n",
        );
        let p = plan(&f, d.path(), &[]).unwrap();
        let flags = &p.points[1].flags;
        assert_eq!(
            flags.iter().filter(|f| *f == "--lora-r").count(),
            1,
            "{flags:?}"
        );
        assert!(flags.contains(&"16".to_string()), "{flags:?}");
    }

    #[test]
    fn bad_study_files_say_where() {
        let d = tempfile::tempdir().unwrap();
        for (body, want) in [
            (
                "[baseline]\nlearning_rat = 1e-3\n[[factor]]\nsetting = \"lora_r\"\nvalues = [8]\n",
                "key 'learning_rat' is not a trainer argument",
            ),
            (
                "[baseline]\n[[factor]]\nsetting = \"lora_r\"\nvalues = [\"eight\"]\n",
                "factor 1 (lora_r) value eight",
            ),
            ("[baseline]\n", "no [[factor]] tables"),
            (
                "[baseline]\n[[factor]]\nsetting = \"output_dir\"\nvalues = [\"x\"]\n",
                "'output_dir' is not a training setting",
            ),
            (
                "[baseline]\n[[factor]]\nsetting = \"lora_r\"\nvalues = [8, 8]\n",
                "value 8 trains the same run as an earlier value",
            ),
            (
                "[baseline]\n[[factor]]\nsetting = \"lora_r\"\nvalues = []\n",
                "factor 1 (lora_r): no values",
            ),
            (
                "[baseline]\n[[factor]]\nsetting = \"lora_r\"\nvalues = [4]\n[answers]\nquestions = \"q.jsonl\"\ntokenizer = \"words\"\n",
                "[answers] tokenizer: 'words' is not one of",
            ),
        ] {
            let f = write(d.path(), body);
            let e = plan(&f, d.path(), &[]).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("s.toml"), "{body}: {e}");
        }
    }
}
