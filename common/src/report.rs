//! The run-comparison report (an offline SwanLab/W&B view): one self-contained HTML file that
//! opens on the results (one row per run: final train loss, eval loss first -> best -> final,
//! wall time, peak memory), then the hyper-parameters that differ between runs (the rest
//! folded away), SVG charts of every metric against step with all runs overlaid, and the
//! `infer --compare` answers when a run has them.
//!
//! It reads what the trainer writes, through the same types: `metrics.csv` rows
//! (`train::metrics`) and `run.json` (`train::run`).

use crate::infer::Comparison;
use crate::train::metrics::{self, MetricsRow};
use crate::train::run::RunRecord;
use anyhow::{bail, Context, Result};
use minijinja::{context, Environment};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One run directory's data.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub dir: PathBuf,
    pub record: Option<RunRecord>,
    pub rows: Vec<MetricsRow>,
    pub compare: Vec<Comparison>,
}

/// The charted metrics: (column, title).
pub const CHARTS: &[(&str, &str)] = &[
    ("loss", "training loss"),
    ("eval_loss", "eval loss"),
    ("grad_norm", "gradient norm"),
    ("learning_rate", "learning rate"),
    ("tokens_per_s", "tokens/s"),
];

/// Arguments that identify a run rather than configure it: never listed as differences.
const NOT_HYPERPARAMETERS: &[&str] = &[
    "output_dir",
    "run_name",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "report_to",
    "logging_dir",
];

impl Run {
    /// Reads a run directory: metrics.csv (required unless `partial`: a run that has not
    /// logged yet then has no rows), run.json and compare.jsonl (optional).
    pub fn read(dir: &Path, partial: bool) -> Result<Run> {
        let rows = if dir.join(metrics::METRICS_FILE).exists() {
            metrics::read(dir)?
        } else if partial {
            Vec::new()
        } else {
            bail!(
                "{}: not a training run directory (no {})",
                dir.display(),
                metrics::METRICS_FILE
            );
        };
        let record = RunRecord::load(dir).ok();
        let cmp_path = dir.join("compare.jsonl");
        let compare = match std::fs::read_to_string(&cmp_path) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
                .map(|(i, l)| {
                    serde_json::from_str(l)
                        .with_context(|| format!("{}:{}", cmp_path.display(), i + 1))
                })
                .collect::<Result<_>>()?,
            Err(_) => Vec::new(),
        };
        Ok(Run {
            name: record
                .as_ref()
                .map(|r| r.run_name.clone())
                .unwrap_or_else(|| {
                    dir.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default()
                }),
            dir: dir.to_path_buf(),
            record,
            rows,
            compare,
        })
    }

    /// `(step, value)` of a metrics column, where the row has it.
    pub fn series(&self, column: &str) -> Vec<(i64, f64)> {
        self.rows
            .iter()
            .filter_map(|r| {
                let v = match column {
                    "loss" => r.loss,
                    "eval_loss" => r.eval_loss,
                    "grad_norm" => r.grad_norm,
                    "learning_rate" => r.learning_rate,
                    "tokens_per_s" => r.tokens_per_s,
                    _ => None,
                }?;
                v.is_finite().then_some((r.step as i64, v))
            })
            .collect()
    }

    /// The best evaluation, (step, value): as the run recorded it (--metric-for-best-model,
    /// --greater-is-better), else the lowest eval loss.
    pub fn best_eval(&self) -> Option<(i64, f64)> {
        let recorded = self
            .record
            .as_ref()
            .and_then(|r| r.best_step.zip(r.best_metric));
        if let Some((step, m)) = recorded {
            return Some((step as i64, m));
        }
        self.series("eval_loss")
            .into_iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// How the run stands: its record's status, else `not started` (nothing logged yet) or
    /// `unknown`.
    pub fn status(&self) -> &'static str {
        match &self.record {
            Some(x) => x.status.as_str(),
            None if self.rows.is_empty() => "not started",
            None => "unknown",
        }
    }

    pub fn wall_s(&self) -> Option<f64> {
        let rec = self.record.as_ref();
        rec.map(|r| r.wall_s)
            .filter(|&s| s > 0.0)
            .or(rec.map(|r| r.elapsed_s).filter(|&s| s > 0.0))
            .or_else(|| self.rows.last().map(|r| r.elapsed_s))
    }

    pub fn peak_mem_mib(&self) -> Option<f64> {
        let from_rows = self.rows.iter().map(|r| r.peak_mem_mib).reduce(f64::max);
        self.record
            .as_ref()
            .map(|r| r.peak_mem_mib)
            .filter(|&m| m > 0.0)
            .or(from_rows)
    }

    /// The run's arguments as strings (empty without run.json).
    fn hyperparameters(&self) -> BTreeMap<String, String> {
        let Some(r) = &self.record else {
            return BTreeMap::new();
        };
        let Ok(serde_json::Value::Object(args)) = serde_json::to_value(&r.args) else {
            return BTreeMap::new();
        };
        args.into_iter()
            .filter(|(k, _)| !NOT_HYPERPARAMETERS.contains(&k.as_str()))
            .map(|(k, v)| {
                let s = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Null => "–".into(),
                    other => other.to_string(),
                };
                (k, s)
            })
            .collect()
    }
}

/// Names every run uniquely: its run name when the names are distinct, else the shortest
/// suffix of its directory path that tells it apart from the others.
pub fn unique_names(runs: &mut [Run]) {
    let named: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    let distinct = |v: &[&str]| {
        let mut s = v.to_vec();
        s.sort();
        s.dedup();
        s.len() == v.len() && v.iter().all(|n| !n.is_empty())
    };
    if distinct(&named) {
        return;
    }
    let parts: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let p = r.dir.canonicalize().unwrap_or_else(|_| r.dir.clone());
            p.components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .filter(|c| c != "/")
                .collect()
        })
        .collect();
    let longest = parts.iter().map(Vec::len).max().unwrap_or(1);
    for k in 1..=longest {
        let names: Vec<String> = parts
            .iter()
            .map(|p| p[p.len().saturating_sub(k)..].join("/"))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        if distinct(&refs) || k == longest {
            for (r, n) in runs.iter_mut().zip(names) {
                r.name = n;
            }
            return;
        }
    }
}

/// A number as people write it: 2-3 significant digits, no trailing zeros.
pub fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { v.to_string() };
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-4..5).contains(&mag) {
        let s = format!("{v:.2e}");
        // 2.00e-4 -> 2e-4, 6.70e-4 -> 6.7e-4
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = m.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e{e}");
    }
    let decimals = (2 - mag).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// What a chart's x axis counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    /// Optimizer steps.
    Step,
    /// Wall time of the run in seconds (when batch size or accumulation change what a step
    /// is).
    Wall,
}

impl Run {
    /// `(x, value)` of a metrics column against `x`, where the row has it.
    pub fn series_on(&self, column: &str, x: XAxis) -> Vec<(f64, f64)> {
        let at: BTreeMap<i64, f64> = self
            .rows
            .iter()
            .map(|r| (r.step as i64, r.elapsed_s))
            .collect();
        self.series(column)
            .into_iter()
            .filter_map(|(step, v)| match x {
                XAxis::Step => Some((step as f64, v)),
                XAxis::Wall => at.get(&step).map(|&t| (t, v)),
            })
            .collect()
    }
}

/// One SVG chart of `column` against step for every run; `mark_best` circles each run's best
/// point.
pub fn chart_svg(runs: &[Run], column: &str, title: &str, mark_best: bool) -> Result<String> {
    chart_svg_on(runs, column, title, mark_best, XAxis::Step)
}

/// Values that span more than this ratio (all positive) are drawn on a log scale, so that a
/// spike does not flatten every other curve.
pub const LOG_SCALE_ABOVE: f64 = 50.0;

/// One SVG chart of `column` for every run against `x`. The y range covers every finite value
/// (a spike is drawn, not cut off), on a log scale when they span more than
/// `LOG_SCALE_ABOVE`.
pub fn chart_svg_on(
    runs: &[Run],
    column: &str,
    title: &str,
    mark_best: bool,
    x: XAxis,
) -> Result<String> {
    let all: Vec<(f64, f64)> = runs.iter().flat_map(|r| r.series_on(column, x)).collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let log = lo > 0.0 && hi / lo > LOG_SCALE_ABOVE;
    let y = |v: f64| if log { v.log10() } else { v };
    let title = if log {
        format!("{title} (log scale)")
    } else {
        title.to_string()
    };
    let x_desc = match x {
        XAxis::Step => "step",
        XAxis::Wall => "wall time (s)",
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 340)).into_drawing_area();
        root.fill(&WHITE)?;
        let (mut x0, mut x1) = (0f64, 1f64);
        let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
        for &(px, py) in &all {
            x0 = x0.min(px);
            x1 = x1.max(px);
            y0 = y0.min(y(py));
            y1 = y1.max(y(py));
        }
        if !y0.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.08).max(y1.abs() * 0.01).max(1e-12);
        let mut chart = ChartBuilder::on(&root)
            .caption(&title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
        let x_label = |v: &f64| match x {
            // whole steps only
            XAxis::Step if v.fract().abs() > 1e-9 => String::new(),
            XAxis::Step => format!("{v:.0}"),
            XAxis::Wall => tick(*v),
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .x_labels(8)
            .y_labels(6)
            .light_line_style(RGBColor(235, 235, 235))
            .x_label_formatter(&x_label)
            .y_label_formatter(&|v| tick(if log { 10f64.powf(*v) } else { *v }))
            .draw()?;
        for (i, r) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = r
                .series_on(column, x)
                .into_iter()
                .map(|(a, b)| (a, y(b)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(r.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled())))?;
            if mark_best {
                let best = r.best_eval().and_then(|(step, v)| match x {
                    XAxis::Step => Some((step as f64, y(v))),
                    XAxis::Wall => r
                        .rows
                        .iter()
                        .find(|row| row.step as i64 == step)
                        .map(|row| (row.elapsed_s, y(v))),
                });
                if let Some(best) = best {
                    chart.draw_series(std::iter::once(Circle::new(
                        best,
                        7,
                        color.stroke_width(2),
                    )))?;
                }
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

const TEMPLATE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="dialora report"><title>dialora runs: {{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:20px 24px;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 8px} .sub{color:#666;font-size:13px;margin:0 0 14px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(640px,1fr));gap:12px}
.chart{border:1px solid #ddd;border-radius:6px;padding:4px;background:#fff}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} .num{text-align:right;font-variant-numeric:tabular-nums}
table.results td,table.results th{font-size:14px;padding:6px 10px}
.best{font-weight:600} .status-completed{color:#1a7f37} .status-failed,.status-diverged{color:#c62828} .status-interrupted,.status-running{color:#b26a00}
details{margin:8px 0} summary{cursor:pointer;font-weight:600}
td.answer{white-space:pre-wrap;max-width:420px}
</style></head><body>
<h1>dialora runs: {{ title }}</h1>
<p class="sub">{{ runs|length }} run(s), report by dialora {{ version }}.</p>
<table class="results"><tr><th>run</th><th>status</th><th>final train loss</th><th>eval loss: first &rarr; best (step) &rarr; final</th><th>wall time</th><th>peak memory</th></tr>
{% for r in runs %}<tr><td><b>{{ r.name }}</b></td><td class="status-{{ r.status }}">{{ r.status }}{% if r.reason %} ({{ r.reason }}){% endif %}</td>
<td class="num">{{ r.final_loss }}</td><td class="num">{{ r.first_eval }} &rarr; <span class="best">{{ r.best_eval }}</span>{% if r.best_step %} ({{ r.best_step }}){% endif %} &rarr; {{ r.final_eval }}</td>
<td class="num">{{ r.wall }}</td><td class="num">{{ r.mem }}</td></tr>
{% endfor %}</table>
{% if differing %}<h2>Hyper-parameters that differ</h2>
<table><tr><th>run</th>{% for p in differing %}<th>{{ p }}</th>{% endfor %}</tr>
{% for r in runs %}<tr><td>{{ r.name }}</td>{% for p in differing %}<td>{{ r.params[p] }}</td>{% endfor %}</tr>{% endfor %}
</table>{% endif %}
{% if common %}<details><summary>Hyper-parameters shared by {% if runs|length > 1 %}all runs{% else %}the run{% endif %} ({{ common|length }})</summary>
<table>{% for p in common %}<tr><th>{{ p[0] }}</th><td>{{ p[1] }}</td></tr>{% endfor %}</table></details>{% endif %}
<h2>Metrics</h2>
<div class="charts">{% for c in charts %}<div class="chart" id="chart-{{ c.column }}">{{ c.svg|safe }}</div>{% endfor %}</div>
{% for r in runs %}{% if r.compare %}
<h2>Answers: {{ r.name }} (base vs fine-tuned)</h2>
{% for c in r.compare %}<details{% if loop.first %} open{% endif %}><summary>conversation {{ c.id }}</summary>
<table><tr><th>user</th><th>base</th><th>fine-tuned</th></tr>
{% for t in c.turns %}<tr><td class="answer">{{ t.user }}</td><td class="answer">{{ t.base.text }}{% if not t.base.stopped %} <em>(hit max tokens)</em>{% endif %}</td><td class="answer">{{ t.adapter.text }}{% if not t.adapter.stopped %} <em>(hit max tokens)</em>{% endif %}</td></tr>{% endfor %}
</table></details>{% endfor %}
{% endif %}{% endfor %}
</body></html>
"#;

/// A value with `prec` decimals, or a dash when there is none.
pub fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "–".into())
}

/// A duration as people read it: 42.1 s, 3 min 05 s, 2 h 03 min.
pub fn duration(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{} h {:02} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// Reads the run directories and writes the report to `out` (atomically). With `partial`, a
/// directory without metrics yet (a sweep point not started, or stopped before it logged) is
/// listed as such instead of failing the report.
/// The mark every report carries, by which `--overwrite` knows a file it may replace inside a
/// run directory.
const GENERATOR: &str = r#"<meta name="generator" content="dialora report">"#;

/// Checks that `out` may be written: a file that does not exist, or (with `overwrite`) one
/// that does; and never a file inside one of the run directories, the report's inputs, unless
/// it is an earlier report.
pub fn check_output(out: &Path, dirs: &[PathBuf], overwrite: bool) -> Result<()> {
    if out.is_dir() {
        bail!(
            "{}: output is a directory; name the HTML file to write",
            out.display()
        );
    }
    if !out.exists() {
        return Ok(());
    }
    let earlier_report = std::fs::read(out)
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(4096)]).contains(GENERATOR))
        .unwrap_or(false);
    for d in dirs {
        if !earlier_report && crate::atomic::refuse_inside(out, d, "run directory").is_err() {
            bail!(
                "{}: output is a file of the run directory {} that the report reads; write the report elsewhere",
                out.display(),
                d.display()
            );
        }
    }
    if !overwrite {
        bail!(
            "{}: output exists (use --overwrite to replace it)",
            out.display()
        );
    }
    if !earlier_report {
        bail!(
            "{}: output exists and is not a dialora report; refusing to replace it even with --overwrite",
            out.display()
        );
    }
    Ok(())
}

pub fn write_report(
    dirs: &[PathBuf],
    out: &Path,
    title: &str,
    partial: bool,
    overwrite: bool,
) -> Result<Vec<Run>> {
    check_output(out, dirs, overwrite)?;
    let mut runs: Vec<Run> = dirs
        .iter()
        .map(|d| Run::read(d, partial))
        .collect::<Result<_>>()?;
    unique_names(&mut runs);
    let params: Vec<BTreeMap<String, String>> = runs.iter().map(Run::hyperparameters).collect();
    let keys: std::collections::BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
    let (mut differing, mut common) = (Vec::new(), Vec::new());
    for k in keys {
        let vals: Vec<Option<&String>> = params.iter().map(|p| p.get(k)).collect();
        if runs.len() > 1 && vals.iter().any(|v| *v != vals[0]) {
            differing.push(k.clone());
        } else if let Some(Some(v)) = vals.first() {
            common.push((k.clone(), (*v).clone()));
        }
    }
    let mut charts = Vec::new();
    for (col, t) in CHARTS {
        let svg = chart_svg(&runs, col, t, *col == "eval_loss")?;
        charts.push(context! { column => col, svg => svg });
    }
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.add_template("report.html", TEMPLATE)?;
    let rows: Vec<_> = runs
        .iter()
        .zip(&params)
        .map(|(r, p)| {
            let evals = r.series("eval_loss");
            let best = r.best_eval();
            let rec = r.record.as_ref();
            context! {
                name => r.name,
                status => r.status(),
                reason => rec.and_then(|x| x.reason.clone()),
                params => p,
                final_loss => fmt(r.series("loss").last().map(|p| p.1), 4),
                first_eval => fmt(evals.first().map(|p| p.1), 4),
                best_eval => fmt(best.map(|p| p.1), 4),
                best_step => best.map(|p| p.0),
                final_eval => fmt(evals.last().map(|p| p.1), 4),
                wall => r.wall_s().map(duration).unwrap_or_else(|| "–".into()),
                mem => r.peak_mem_mib().map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "–".into()),
                compare => r.compare,
            }
        })
        .collect();
    let html = env.get_template("report.html")?.render(context! {
        title => title, runs => rows, charts => charts, differing => differing, common => common,
        version => env!("CARGO_PKG_VERSION"),
    })?;
    crate::atomic::write_file(out, html.as_bytes())?;
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_read_like_people_write_them() {
        for (v, want) in [
            (0.0, "0"),
            (3.6427, "3.64"),
            (1.05, "1.05"),
            (12.5, "12.5"),
            (123.4, "123"),
            (2000.0, "2000"),
            (0.002, "0.002"),
            (0.00067, "0.00067"),
            (0.0005, "0.0005"),
            (2e-5, "2e-5"),
            (6.7e-6, "6.7e-6"),
            (-0.25, "-0.25"),
        ] {
            assert_eq!(tick(v), want, "{v}");
        }
        assert_eq!(duration(42.13), "42.1 s");
        assert_eq!(duration(185.0), "3 min 05 s");
        assert_eq!(duration(7380.0), "2 h 03 min");
    }

    /// A run directory as the trainer leaves it: metrics.csv and run.json.
    fn fake_run(dir: &Path, lr: f64, evals: &[(usize, f64)]) {
        std::fs::create_dir_all(dir).unwrap();
        let mut log = crate::train::metrics::MetricsLog::open(dir, None).unwrap();
        for &(step, e) in evals {
            log.append(&MetricsRow {
                step,
                loss: (step > 0).then_some(e + 0.1),
                learning_rate: Some(lr),
                eval_loss: Some(e),
                elapsed_s: step as f64,
                peak_mem_mib: 500.0,
                ..Default::default()
            })
            .unwrap();
        }
        let args = crate::train::args::TrainArgs {
            learning_rate: lr,
            output_dir: dir.to_path_buf(),
            ..Default::default()
        };
        RunRecord {
            status: crate::train::run::RunStatus::Completed,
            run_name: "adapter".into(),
            args,
            elapsed_s: 60.0,
            wall_s: 65.0,
            ..Default::default()
        }
        .save(dir)
        .unwrap();
    }

    #[test]
    fn report_never_replaces_a_run_file_and_asks_before_replacing_a_report() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a/adapter");
        fake_run(&a, 1e-3, &[(0, 3.6), (10, 2.0)]);
        let runs = [a.clone()];
        std::fs::write(a.join("adapter_model.safetensors"), b"weights").unwrap();
        // the run's own files: refused, with or without --overwrite, and left as they were
        for f in ["adapter_model.safetensors", "metrics.csv", "run.json"] {
            let target = a.join(f);
            let before = std::fs::read(&target).unwrap();
            for overwrite in [false, true] {
                let e = write_report(&runs, &target, "t", false, overwrite).unwrap_err();
                assert!(e.to_string().contains("that the report reads"), "{e}");
                assert_eq!(std::fs::read(&target).unwrap(), before, "{f}");
            }
        }
        // the run can still be reported; a new file inside the run directory is fine
        write_report(&runs, &a.join("report.html"), "t", false, false).unwrap();
        // any existing output needs --overwrite; an earlier report may then be replaced
        let out = d.path().join("r.html");
        write_report(&runs, &out, "t", false, false).unwrap();
        let e = write_report(&runs, &out, "t", false, false).unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e}");
        write_report(&runs, &out, "t", false, true).unwrap();
        write_report(&runs, &a.join("report.html"), "t", false, true).unwrap();
        // but not a file that is not a report
        let notes = d.path().join("notes.txt");
        std::fs::write(&notes, "mine").unwrap();
        let e = write_report(&runs, &notes, "t", false, true).unwrap_err();
        assert!(e.to_string().contains("not a dialora report"), "{e}");
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "mine");
        assert!(write_report(&runs, d.path(), "t", false, true).is_err());
    }

    #[test]
    fn report_opens_on_results_then_differences_then_charts() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a/adapter"), d.path().join("b/adapter"));
        fake_run(&a, 1e-3, &[(0, 3.6), (10, 2.0), (20, 2.2)]);
        fake_run(&b, 2e-4, &[(0, 3.6), (10, 3.0), (20, 2.9)]);
        let out = d.path().join("r.html");
        let runs = write_report(&[a.clone(), b], &out, "t", false, false).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a/adapter", "b/adapter"]);
        let html = std::fs::read_to_string(&out).unwrap();
        let at = |s: &str| html.find(s).unwrap_or_else(|| panic!("{s} missing"));
        // results first, with first -> best (step) -> final, wall time
        assert!(at("class=\"results\"") < at("Hyper-parameters that differ"));
        assert!(at("Hyper-parameters that differ") < at("<svg"));
        assert!(
            html.contains("3.6000 &rarr; <span class=\"best\">2.0000</span> (10) &rarr; 2.2000")
        );
        assert!(html.contains("1 min 05 s"));
        // only the learning rate differs; the rest is folded away
        let diff = &html[at("Hyper-parameters that differ")..at("<details>")];
        assert!(
            diff.contains("learning_rate") && !diff.contains("lora_r"),
            "{diff}"
        );
        assert!(html[at("<details>")..].contains("lora_r"));
        // x ticks are whole steps
        assert!(!html[at("<svg")..].contains(">2.5<"));
        // a sweep point without metrics: an error, or with `partial` a row that says so
        let pending = d.path().join("c/adapter");
        std::fs::create_dir_all(&pending).unwrap();
        assert!(write_report(&[a.clone(), pending.clone()], &out, "t", false, true).is_err());
        write_report(&[a, pending], &out, "t", true, true).unwrap();
        let html = std::fs::read_to_string(&out).unwrap();
        assert!(
            html.contains("c&#x2f;adapter") && html.contains("not started"),
            "{html}"
        );
    }

    #[test]
    fn runs_get_distinct_names() {
        let run = |name: &str, dir: &str| Run {
            name: name.into(),
            dir: PathBuf::from(dir),
            record: None,
            rows: vec![],
            compare: vec![],
        };
        let mut v = vec![
            run("adapter", "/x/a/adapter"),
            run("adapter", "/x/b/adapter"),
        ];
        unique_names(&mut v);
        assert_eq!(
            (v[0].name.as_str(), v[1].name.as_str()),
            ("a/adapter", "b/adapter")
        );
        let mut v = vec![
            run("lr-1e-3", "/x/a/adapter"),
            run("lr-2e-4", "/x/b/adapter"),
        ];
        unique_names(&mut v);
        assert_eq!(v[0].name, "lr-1e-3");
        let mut v = vec![run("", "/x/p1"), run("", "/x/p2")];
        unique_names(&mut v);
        assert_eq!((v[0].name.as_str(), v[1].name.as_str()), ("p1", "p2"));
    }
}
