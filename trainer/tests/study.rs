//! scripts/study.sh: a tiny study (2 factors x 2 values on a tiny random model) trains its
//! shared baseline once, reports one row per factor value with the answers side by side and a
//! diverged point as such, resumes when interrupted, reuses its answers, and refuses another
//! study file under its name.

use common::testing::{repo_root, write_tiny_model};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn study_cmd(runs: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(repo_root().join("scripts/study.sh"))
        .args(args)
        .env("RUNS", runs)
        .env(
            "DIALORA_BIN",
            Path::new(env!("CARGO_BIN_EXE_trainer")).parent().unwrap(),
        )
        .env("DIALORA_NO_BAR", "1");
    c
}

fn study(runs: &Path, args: &[&str]) -> (i32, String) {
    let o = study_cmd(runs, args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn study_file(dir: &Path, lr_values: &str) -> std::path::PathBuf {
    let root = repo_root();
    let text = format!(
        r#"title = "tiny"
[baseline]
lora_r = 2
lora_alpha = 4
learning_rate = 1e-3
per_device_train_batch_size = 2
logging_steps = 1
eval_steps = 3
max_nonfinite_steps = 1
save_steps = 1000

[data]
input = ["{train}"]
dataprep_args = ["--val-split", "0.15", "--max-seq-len", "64"]

[answers]
questions = "{questions}"
max_new_tokens = 6

[[factor]]
setting = "learning_rate"
values = [{lr_values}]
note = "1e30 diverges"

[[factor]]
setting = "lora_r"
title = "rank"
values = [2, 4]
"#,
        train = root.join("data/counsel_train.jsonl").display(),
        questions = root.join("data/counsel_study.jsonl").display(),
    );
    let p = dir.join("tiny.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The last step logged in a run's metrics.csv.
fn last_step(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_tiny_study_shares_its_baseline_reports_every_value_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny-model");
    write_tiny_model(&model, 32, 2, 5).unwrap();
    let file = study_file(tmp.path(), "1e-3, 1e30");
    let runs = tmp.path().join("runs");
    let out = runs.join("t");
    let args = [
        file.to_str().unwrap(),
        "--name",
        "t",
        "--model",
        model.to_str().unwrap(),
        "--",
        "--max-steps",
        "400",
    ];

    // --dry-run: the points, and nothing written
    let (code, log) = study(&runs, &[&args[..5], &["--dry-run"], &args[5..]].concat());
    assert_eq!(code, 0, "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains('\t')).collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(lines[1].starts_with("learning_rate=1e30\t") && lines[1].ends_with("--max-steps 400"));
    assert!(!out.exists(), "a dry run writes nothing");

    // interrupted while the baseline trains: SIGTERM to the whole job, as Slurm sends it
    let first_log = tmp.path().join("interrupted.log");
    let mut child = study_cmd(&runs, &args)
        .stdout(std::fs::File::create(&first_log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(&first_log)
                .unwrap(),
        ))
        .process_group(0)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while last_step(&out.join("baseline")) < 5 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the study ended before the interruption"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "baseline never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pgid = child.id() as i32;
    Command::new("kill")
        .args(["-TERM", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    let st = child.wait().unwrap();
    assert!(!st.success(), "an interrupted study does not end as done");
    // the shell is gone at once; the trainer finishes its step and saves, then says so
    let status = |d: &Path| -> String {
        std::fs::read_to_string(d.join("run.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["status"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let t0 = Instant::now();
    while status(&out.join("baseline")) != "interrupted" {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the trainer never saved"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped_at = last_step(&out.join("baseline"));
    assert!(stopped_at < 400, "interrupted at {stopped_at}");
    assert!(
        out.join("baseline").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("checkpoint-")),
        "the interrupted point saved a checkpoint: {}",
        std::fs::read_to_string(&first_log).unwrap()
    );

    // the same command again resumes the study: 3 points, the baseline shared
    let (code, log) = study(&runs, &args);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("3 training points"), "{log}");
    assert_eq!(log.matches("== sweep point").count(), 3, "{log}");
    assert!(log.contains("resum"), "the baseline resumed: {log}");
    assert!(
        !out.join("learning_rate=0.001").exists(),
        "1e-3 is the baseline"
    );
    assert_eq!(last_step(&out.join("baseline")), 400);
    assert!(log.contains("learning_rate=1e30 diverged"), "{log}");

    // study.json: factors, values, statuses, metrics, scores
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("study.json")).unwrap()).unwrap();
    let points = j["points"].as_array().unwrap();
    let names: Vec<&str> = points.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "learning_rate=1e30", "lora_r=4"]);
    let by = |n: &str| points.iter().find(|p| p["name"] == n).unwrap();
    assert_eq!(by("baseline")["status"], "completed");
    assert_eq!(by("lora_r=4")["status"], "completed");
    let div = by("learning_rate=1e30");
    assert_eq!(div["status"], "diverged");
    assert!(
        div["message"].as_str().unwrap().contains("diverged"),
        "{div}"
    );
    assert!(div["step"].as_u64().is_some(), "{div}");
    assert!(div["scores"].is_null(), "a diverged point has no answers");
    let lr = &j["factors"][0];
    assert_eq!(lr["levels"][0]["point"], "baseline");
    assert_eq!(lr["levels"][0]["baseline"], true);
    assert_eq!(lr["best"], "0.001");
    assert_eq!(j["factors"][1]["levels"][0]["point"], "baseline");
    for p in ["baseline", "lora_r=4"] {
        let s = &by(p)["scores"];
        assert_eq!(s["replies"], 12, "6 two-turn questions: {s}");
        assert!(s["rouge_l"].as_f64().is_some(), "{s}");
        assert!(by(p)["final_loss"].as_f64().is_some());
        assert!(by(p)["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(j["base_scores"]["replies"], 12);

    // the report: one row per factor value (and the base model), the diverged one as such,
    // then per factor the curves and the answers side by side
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let table = &html[html.find("class=\"results\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    assert_eq!(table.matches("<tr").count(), 1 + 1 + 4, "{table}");
    assert!(table.contains("diverged at step"), "{table}");
    assert_eq!(table.matches("(baseline)").count(), 2, "{table}");
    for section in ["id=\"factor-learning_rate\"", "id=\"factor-lora_r\""] {
        let s = &html[html.find(section).unwrap()..];
        let s = &s[..s[1..].find("<h2").map(|i| i + 1).unwrap_or(s.len())];
        assert_eq!(
            s.matches("<svg").count(),
            6,
            "3 metrics x (step, wall time)"
        );
        assert!(s.contains("wall time (s)"));
        // 6 questions, each a table of its 2 turns: user, reference, base, the 2 values
        assert_eq!(s.matches("<th>question ").count(), 6);
        assert_eq!(s.matches("<td class=\"answer\"><b>").count(), 12);
        assert_eq!(s.matches("<td class=\"answer ref\">").count(), 12);
        assert_eq!(s.matches("<td class=\"answer\">").count(), 12 * 4);
    }
    let lr_section = &html[html.find("id=\"factor-learning_rate\"").unwrap()..];
    assert!(lr_section.contains("no answer: diverged"));
    // the base model's first answer is in both sections, as answers/base-model.json has it
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("answers/base-model.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(base["replies"].as_array().unwrap().len(), 6);

    // once more: nothing trains, nothing is answered again
    let (code, log) = study(&runs, &args);
    assert_eq!(code, 0, "{log}");
    assert_eq!(log.matches("already completed").count(), 2, "{log}");
    assert!(!log.contains("study: answering"), "answers reused: {log}");

    // another study file (or other trainer flags) under the same name is refused
    let elsewhere = tmp.path().join("other");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let other = study_file(&elsewhere, "1e-3, 1e-2");
    let (code, log) = study(
        &runs,
        &[
            other.to_str().unwrap(),
            "--name",
            "t",
            "--model",
            model.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("already exists with another study file"),
        "{log}"
    );
    let (code, log) = study(&runs, &args[..5]);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("already exists with other trainer arguments"),
        "{log}"
    );

    // as a Slurm array: one task per point, the report job runs the study's report
    let (code, log) = study(&runs, &[&args[..5], &["--slurm"], &args[5..]].concat());
    assert_eq!(code, 0, "{log}");
    let sbatch = std::fs::read_to_string(out.join("sweep.sbatch")).unwrap();
    assert!(sbatch.contains("#SBATCH --array=0-2"), "{sbatch}");
    let o = Command::new("bash")
        .arg(out.join("sweep.sbatch"))
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("DIALORA_DRY_RUN", "1")
        .output()
        .unwrap();
    let cmd = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        cmd.contains("--learning-rate 1e+30") && cmd.contains("--max-steps 400"),
        "{cmd}"
    );
    let report = std::fs::read_to_string(out.join("report.sbatch")).unwrap();
    assert!(report.contains("--report t"), "{report}");
}
