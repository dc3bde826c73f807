//! The run-comparison report (an offline SwanLab/W&B view): one self-contained HTML file with
//! SVG charts of every metric against step for all runs overlaid, a table of hyperparameters
//! and results, and the `infer --compare` answers when a run has them.

use anyhow::{Context, Result};
use minijinja::{context, Environment};
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One run directory's data.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub name: String,
    pub dir: String,
    /// (column, values by step) for the charted columns
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    pub params: Vec<(String, String)>,
    pub final_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub first_eval_loss: Option<f64>,
    pub wall_s: Option<f64>,
    pub peak_mem_mib: Option<f64>,
    pub status: String,
    pub compare: Vec<serde_json::Value>,
}

pub const CHARTS: &[(&str, &str)] = &[
    ("loss", "training loss"),
    ("eval_loss", "eval loss"),
    ("grad_norm", "gradient norm"),
    ("learning_rate", "learning rate"),
    ("tokens_per_s", "tokens/s"),
];

const PARAMS: &[&str] = &[
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_ratio",
    "seed",
    "dtype",
];

/// Reads a run directory: metrics.csv (required), run.json and compare.jsonl (optional).
pub fn read_run(dir: &Path) -> Result<Run> {
    let path = dir.join("metrics.csv");
    let mut rdr = csv::Reader::from_path(&path)
        .with_context(|| format!("{}: cannot read metrics", path.display()))?;
    let headers = rdr
        .headers()
        .with_context(|| format!("{}: no header", path.display()))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let step_i = col("step").with_context(|| format!("{}: no 'step' column", path.display()))?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = CHARTS
        .iter()
        .map(|(c, _)| (c.to_string(), vec![]))
        .collect();
    let mut last_wall = None;
    let mut last_mem = None;
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        let step: f64 = rec
            .get(step_i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN);
        for (name, pts) in series.iter_mut() {
            if let Some(v) = col(name)
                .and_then(|j| rec.get(j))
                .and_then(|s| s.parse::<f64>().ok())
            {
                if v.is_finite() {
                    pts.push((step, v));
                }
            }
        }
        last_wall = col("elapsed_s")
            .and_then(|j| rec.get(j))
            .and_then(|s| s.parse().ok())
            .or(last_wall);
        last_mem = col("peak_mem_mib")
            .and_then(|j| rec.get(j))
            .and_then(|s| s.parse().ok())
            .or(last_mem);
    }
    let run_json: serde_json::Value = std::fs::read_to_string(dir.join("run.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let args = &run_json["args"];
    let params = PARAMS
        .iter()
        .filter_map(|k| {
            let v = args.get(*k)?;
            Some((
                k.to_string(),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            ))
        })
        .collect();
    let get = |name: &str| {
        series
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_default()
    };
    let evals = get("eval_loss");
    let compare = std::fs::read_to_string(dir.join("compare.jsonl"))
        .map(|s| {
            s.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default();
    Ok(Run {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| dir.display().to_string()),
        dir: dir.display().to_string(),
        final_loss: get("loss").last().map(|p| p.1),
        best_eval_loss: evals.iter().map(|p| p.1).reduce(f64::min),
        final_eval_loss: evals.last().map(|p| p.1),
        first_eval_loss: evals.first().map(|p| p.1),
        wall_s: run_json["elapsed_s"].as_f64().or(last_wall),
        peak_mem_mib: run_json["peak_mem_mib"].as_f64().or(last_mem),
        status: run_json["status"].as_str().unwrap_or("unknown").to_string(),
        params,
        series,
        compare,
    })
}

/// One SVG chart of `column` for every run.
pub fn chart_svg(runs: &[Run], column: &str, title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let all: Vec<(f64, f64)> = runs
            .iter()
            .flat_map(|r| {
                r.series
                    .iter()
                    .filter(|(n, _)| n == column)
                    .flat_map(|(_, p)| p.iter().copied())
            })
            .collect();
        let (mut x0, mut x1, mut y0, mut y1) = (0f64, 1f64, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in &all {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if !y0.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.08).max(1e-12);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .light_line_style(RGBColor(235, 235, 235))
            .y_label_formatter(&|v| {
                if *v == 0.0 || (v.abs() >= 1e-2 && v.abs() < 1e5) {
                    format!("{v:.3}")
                } else {
                    format!("{v:.1e}")
                }
            })
            .draw()?;
        for (i, r) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = r
                .series
                .iter()
                .filter(|(n, _)| n == column)
                .flat_map(|(_, p)| p.clone())
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
<html lang="en"><head><meta charset="utf-8"><title>dialora runs: {{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(640px,1fr));gap:12px}
.chart{border:1px solid #ddd;border-radius:6px;padding:4px;background:#fff}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} .num{text-align:right;font-variant-numeric:tabular-nums}
details{margin:8px 0} summary{cursor:pointer;font-weight:600}
</style></head><body>
<h1>dialora run comparison: {{ title }}</h1>
<p>{{ runs|length }} run(s), generated by dialora {{ version }}.</p>
<h2>Metrics</h2>
<div class="charts">{% for c in charts %}<div class="chart" id="chart-{{ c.column }}">{{ c.svg|safe }}</div>{% endfor %}</div>
<h2>Runs</h2>
<table><tr><th>run</th><th>status</th>{% for p in param_names %}<th>{{ p }}</th>{% endfor %}<th>final loss</th><th>eval loss (first &rarr; final)</th><th>best eval loss</th><th>wall time</th><th>peak memory</th></tr>
{% for r in runs %}<tr><td>{{ r.name }}</td><td>{{ r.status }}</td>{% for p in param_names %}<td>{{ r.params_map[p] }}</td>{% endfor %}
<td class="num">{{ r.final_loss }}</td><td class="num">{{ r.first_eval_loss }} &rarr; {{ r.final_eval_loss }}</td><td class="num">{{ r.best_eval_loss }}</td><td class="num">{{ r.wall }}</td><td class="num">{{ r.mem }}</td></tr>
{% endfor %}</table>
{% for r in runs %}{% if r.compare %}
<h2>Answers: {{ r.name }} (base vs fine-tuned)</h2>
{% for c in r.compare %}<details{% if loop.first %} open{% endif %}><summary>conversation {{ c.id }}</summary>
<table><tr><th>user</th><th>base</th><th>fine-tuned</th></tr>
{% for t in c.turns %}<tr><td>{{ t.user }}</td><td>{{ t.base.text }}{% if not t.base.stopped %} <em>(hit max tokens)</em>{% endif %}</td><td>{{ t.adapter.text }}{% if not t.adapter.stopped %} <em>(hit max tokens)</em>{% endif %}</td></tr>{% endfor %}
</table></details>{% endfor %}
{% endif %}{% endfor %}
</body></html>
"#;

fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "–".into())
}

/// Writes the report for `dirs` to `out` (atomically).
pub fn write_report(dirs: &[PathBuf], out: &Path, title: &str) -> Result<Vec<Run>> {
    let runs: Vec<Run> = dirs.iter().map(|d| read_run(d)).collect::<Result<_>>()?;
    let mut charts = Vec::new();
    for (col, t) in CHARTS {
        charts.push(context! { column => col, svg => chart_svg(&runs, col, t)? });
    }
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.add_template("report.html", TEMPLATE)?;
    let rows: Vec<_> = runs
        .iter()
        .map(|r| {
            let params_map: std::collections::BTreeMap<String, String> = r.params.iter().cloned().collect();
            context! {
                name => r.name, status => r.status, params_map => params_map,
                final_loss => fmt(r.final_loss, 4), first_eval_loss => fmt(r.first_eval_loss, 4),
                final_eval_loss => fmt(r.final_eval_loss, 4), best_eval_loss => fmt(r.best_eval_loss, 4),
                wall => r.wall_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "–".into()),
                mem => r.peak_mem_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "–".into()),
                compare => r.compare,
            }
        })
        .collect();
    let html = env.get_template("report.html")?.render(context! {
        title => title, runs => rows, charts => charts, param_names => PARAMS, version => env!("CARGO_PKG_VERSION"),
    })?;
    if let Some(p) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p)?;
    }
    crate::weights::write_atomic(out, html.as_bytes())?;
    Ok(runs)
}
