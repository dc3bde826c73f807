//! trainer end to end: resume after SIGTERM and kill -9, gradient accumulation, the
//! divergence guard, argument errors, and learning on the sample data.

use common::lora::Adapter;
use common::testing::{real_model_dir, write_tiny_model};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn trainer(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.args(args).env("DIALORA_NO_BAR", "1");
    c
}

fn out(c: &mut Command) -> (i32, String) {
    let o: Output = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout),
    )
}

/// Shards of the project's sample data made with the real tokenizer.
fn shards(dir: &Path, max_len: usize) -> PathBuf {
    common::testing::sample_shards(dir, max_len, 0.15).unwrap()
}

fn adapter_values(dir: &Path) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let a = Adapter::load(dir, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    a.weights
        .iter()
        .map(|(k, (a, b))| {
            (
                k.clone(),
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

fn wait_for(path: &Path, child: &mut Child) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "trainer ended before {}",
            path.display()
        );
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "timeout waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn interrupted_runs_resume_to_the_identical_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, 64, 2, 3).unwrap();
    let data = shards(tmp.path(), 128);
    let common_args = |o: &Path| -> Vec<String> {
        [
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            o.to_str().unwrap(),
            "--max-steps",
            "12",
            "--save-steps",
            "2",
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--learning-rate",
            "1e-3",
            "--lora-r",
            "4",
            "--lora-dropout",
            "0.1",
            "--target-modules",
            "all-linear",
            "--warmup-ratio",
            "0.2",
            "--lr-scheduler-type",
            "cosine",
            "--logging-steps",
            "1",
            "--eval-steps",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let straight = tmp.path().join("straight");
    let a: Vec<String> = common_args(&straight);
    let (code, log) = out(&mut trainer(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(code, 0, "{log}");
    let want = adapter_values(&straight);

    for (sig, wait_ckpt) in [("TERM", "checkpoint-4"), ("KILL", "checkpoint-6")] {
        let o = tmp.path().join(format!("run-{sig}"));
        let a = common_args(&o);
        let mut child = trainer(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&o.join(wait_ckpt), &mut child);
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let st = child.wait().unwrap();
        if sig == "TERM" {
            assert_eq!(
                st.code(),
                Some(common::cli::exit::INTERRUPTED),
                "SIGTERM saves and exits with 75"
            );
            let run: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(o.join("run.json")).unwrap())
                    .unwrap();
            assert_eq!(run["status"], "interrupted");
        }
        assert!(
            !o.join("adapter_model.safetensors").exists(),
            "{sig}: finished before the signal; test is not testing resume"
        );
        // starting again without --resume is refused rather than clobbering the run
        let (code, log) = out(&mut trainer(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        assert_ne!(code, 0);
        assert!(log.contains("--resume-from-checkpoint latest"), "{log}");
        let mut r = a.clone();
        r.extend(["--resume-from-checkpoint".to_string(), "latest".to_string()]);
        let (code, log) = out(&mut trainer(
            &r.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("resuming at step"), "{log}");
        let got = adapter_values(&o);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                g, w,
                "{sig}: module {} differs from the uninterrupted run",
                g.0
            );
        }
        // metrics.csv has each step exactly once
        let m = std::fs::read_to_string(o.join("metrics.csv")).unwrap();
        let steps: Vec<&str> = m
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect();
        let mut dedup = steps.clone();
        dedup.dedup();
        assert_eq!(steps, dedup, "{m}");
        assert_eq!(steps.last(), Some(&"12"));
    }
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, 32, 2, 5).unwrap();
    let data = shards(tmp.path(), 96);
    let run = |name: &str, bs: &str, gas: &str, lr: &str| -> Vec<(String, Vec<f32>, Vec<f32>)> {
        let o = tmp.path().join(name);
        let (code, log) = out(&mut trainer(&[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            o.to_str().unwrap(),
            "--max-steps",
            "3",
            "--per-device-train-batch-size",
            bs,
            "--gradient-accumulation-steps",
            gas,
            "--learning-rate",
            lr,
            "--lora-r",
            "4",
            "--target-modules",
            "q_proj,v_proj,down_proj",
            "--group-by-length",
            "false",
            "--init-lora-weights",
            "false",
            "--max-grad-norm",
            "0",
        ]));
        assert_eq!(code, 0, "{log}");
        adapter_values(&o)
    };
    let big = run("b4", "4", "1", "1e-2");
    let acc = run("b2x2", "2", "2", "1e-2");
    let one = run("b1x4", "1", "4", "1e-2");
    let mut worst = 0f32;
    for ((b, a), o) in big.iter().zip(&acc).zip(&one) {
        for (x, (y, z)) in
            b.1.iter()
                .chain(&b.2)
                .zip(a.1.iter().chain(&a.2).zip(o.1.iter().chain(&o.2)))
        {
            worst = worst.max((x - y).abs()).max((x - z).abs());
        }
    }
    assert!(worst < 2e-5, "accumulated and full batch differ by {worst}");
    // the comparison is sensitive: a different learning rate gives a clearly different adapter
    let slow = run("b4-slow", "4", "1", "1e-3");
    let mut diff = 0f32;
    for (b, s) in big.iter().zip(&slow) {
        for (x, y) in b.1.iter().chain(&b.2).zip(s.1.iter().chain(&s.2)) {
            diff = diff.max((x - y).abs());
        }
    }
    assert!(diff > 1e-3, "updates too small to compare: {diff}");
}

#[test]
fn divergence_guard_stops_and_keeps_saved_results() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, 32, 2, 6).unwrap();
    let data = shards(tmp.path(), 64);
    // poison the base model: a non-finite norm weight makes every loss NaN
    let store = common::weights::SafetensorsStore::open_dir(&model).unwrap();
    let mut w = std::collections::BTreeMap::new();
    for n in store.names() {
        w.insert(
            n.clone(),
            store
                .load(n, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        );
    }
    drop(store);
    let n = w["model.norm.weight"].dims()[0];
    w.insert(
        "model.norm.weight".into(),
        candle_core::Tensor::full(f32::NAN, n, &candle_core::Device::Cpu).unwrap(),
    );
    common::weights::save(&w, &model.join("model.safetensors")).unwrap();
    let o = tmp.path().join("run");
    let (code, log) = out(&mut trainer(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        o.to_str().unwrap(),
        "--max-steps",
        "10",
        "--per-device-train-batch-size",
        "2",
        "--max-nonfinite-steps",
        "2",
        "--learning-rate",
        "1e-2",
    ]));
    assert_eq!(code, common::cli::exit::DIVERGED, "{log}");
    assert!(log.contains("step 1: non-finite loss"), "{log}");
    assert!(
        log.contains("training diverged")
            && log.contains("the last at step 2")
            && log.contains("lower --learning-rate"),
        "{log}"
    );
    assert!(
        !o.join("adapter_model.safetensors").exists(),
        "no adapter from a diverged run"
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["status"], "diverged");
}

/// A run whose loss explodes without ever going non-finite (too high a learning rate) is
/// stopped as diverged with --divergence-loss-ratio, and trains on without it.
#[test]
fn an_exploding_loss_is_divergence_when_asked() {
    // a pretrained model (a random one starts as bad as an exploded one)
    let model = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 64);
    let run = |name: &str, ratio: &str| {
        let o = tmp.path().join(name);
        let (code, log) = out(&mut trainer(&[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            o.to_str().unwrap(),
            "--max-steps",
            "5",
            "--per-device-train-batch-size",
            "1",
            "--learning-rate",
            "1",
            "--lora-r",
            "4",
            "--target-modules",
            "all-linear",
            "--logging-steps",
            "1",
            "--divergence-loss-ratio",
            ratio,
            "--max-nonfinite-steps",
            "2",
        ]));
        (code, log, o)
    };
    let (code, log, o) = run("exploding", "1.5");
    assert_eq!(code, common::cli::exit::DIVERGED, "{log}");
    assert!(
        log.contains("training diverged: the loss stayed above 1.5x the first step's")
            && log.contains("for 2 steps in a row"),
        "{log}"
    );
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("run.json")).unwrap()).unwrap();
    assert_eq!(rec["status"], "diverged");
    assert!(!o.join("adapter_model.safetensors").exists());
    // the exploded steps were logged (the report draws the explosion)
    let rows = common::train::metrics::read(&o).unwrap();
    let first = rows.iter().find_map(|r| r.loss).unwrap();
    assert!(
        rows.iter().filter_map(|r| r.loss).any(|l| l > 1.5 * first),
        "{rows:?}"
    );
    let (code, log, _) = run("off", "0");
    assert_eq!(code, 0, "without the ratio the run ends: {log}");
    let (code, log, _) = run("bad", "0.5");
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("--divergence-loss-ratio must be 0 (off) or above 1"),
        "{log}"
    );
}

#[test]
fn bad_arguments_are_clear_errors() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 64);
    let base = |extra: &[&str]| -> (i32, String) {
        let o = tmp.path().join("o");
        let mut a = vec![
            "--model",
            real.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            o.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        out(&mut trainer(&a))
    };
    for (extra, want) in [
        (vec!["--lora-r", "0"], "r (--lora-r) must be at least 1"),
        (
            vec!["--target-modules", "q_proj,qkv_proj"],
            "unknown target module 'qkv_proj'",
        ),
        (vec!["--learning-rate", "-1"], "--learning-rate must be > 0"),
        (vec!["--learning-rate", "0"], "--learning-rate must be > 0"),
        (
            vec!["--report-to", "wandb"],
            "swanlab convert -t tensorboard",
        ),
        (
            vec!["--report-to", "tensorbord"],
            "expected none, tensorboard or all",
        ),
        (
            vec!["--num-train-epochs", "0"],
            "--num-train-epochs must be > 0",
        ),
        (
            vec!["--target-modules", "q_prj,v_proj"],
            "unknown target module 'q_prj'",
        ),
        (
            vec!["--lora-dropout", "1.5"],
            "lora_dropout must be in [0, 1)",
        ),
        (vec!["--device", "tpu"], "--device must be cpu or cuda:N"),
        // the default build has no CUDA, and says how to get it
        #[cfg(not(feature = "cuda"))]
        (
            vec!["--device", "cuda:0"],
            "this build has no CUDA support; build one with `make cuda`",
        ),
        (vec!["--bf16", "--dtype", "f16"], "cannot be used with"),
        (
            vec!["--gradient-accumulation-steps", "0"],
            "--gradient-accumulation-steps must be >= 1",
        ),
        (
            vec!["--resume-from-checkpoint", "latest"],
            "no checkpoint in",
        ),
    ] {
        let (code, log) = base(&extra);
        // bad arguments exit 2, as clap's own errors do
        assert_eq!(code, 2, "{extra:?}: {log}");
        assert!(log.contains(want), "{extra:?}: want '{want}' in {log}");
        assert_eq!(
            log.lines().filter(|l| l.contains("error")).count(),
            1,
            "one error line: {log}"
        );
    }
    // shards made with another tokenizer
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "chat_template.jinja",
        "tokenizer_config.json",
    ] {
        std::os::unix::fs::symlink(real.join(f), other.join(f)).unwrap();
    }
    let mut tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(real.join("tokenizer.json")).unwrap())
            .unwrap();
    tj["pre_tokenizer"] = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    std::fs::write(other.join("tokenizer.json"), tj.to_string()).unwrap();
    let o = tmp.path().join("o2");
    let (code, log) = out(&mut trainer(&[
        "--model",
        other.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        o.to_str().unwrap(),
    ]));
    assert_ne!(code, 0);
    assert!(log.contains("another tokenizer"), "{log}");
    // a --config file supplies arguments; flags override it
    let cfg = tmp.path().join("cfg.toml");
    std::fs::write(&cfg, "lora_r = 0\nlearning_rate = 1e-3\n").unwrap();
    let (code, log) = base(&["--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(log.contains("--lora-r"), "{log}");
    let (code, log) = base(&[
        "--config",
        cfg.to_str().unwrap(),
        "--lora-r",
        "2",
        "--max-steps",
        "1",
        "--per-device-train-batch-size",
        "1",
    ]);
    assert_eq!(code, 0, "{log}");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("o/run.json")).unwrap())
            .unwrap();
    assert_eq!(run["args"]["lora_r"], 2);
    assert_eq!(run["args"]["learning_rate"], 1e-3);
}

#[test]
fn training_on_the_sample_dialogues_lowers_eval_loss() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 256);
    let o = tmp.path().join("run");
    let (code, log) = out(&mut trainer(&[
        "--model",
        real.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        o.to_str().unwrap(),
        "--max-steps",
        "6",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--target-modules",
        "all-linear",
        "--logging-steps",
        "2",
    ]));
    assert_eq!(code, 0, "{log}");
    // off a terminal: a log line with the ETA every --logging-steps, the whole run's wall time
    let step2 = log
        .lines()
        .find(|l| l.contains("step 2/6:"))
        .unwrap_or_default();
    assert!(step2.contains(" eta "), "{log}");
    assert!(log.contains("trainer: done in "), "{log}");
    let rows = common::train::metrics::read(&o).unwrap();
    let evals: Vec<f64> = rows.iter().filter_map(|r| r.eval_loss).collect();
    assert!(evals.len() >= 2, "{rows:?}");
    let (first, last) = (evals[0], *evals.last().unwrap());
    eprintln!("eval loss {first:.4} -> {last:.4}");
    assert!(last < 0.9 * first, "eval loss {first} -> {last}");
    // the record says how it ended, with the versions that ran
    let rec = common::train::run::RunRecord::load(&o).unwrap();
    assert_eq!(rec.status, common::train::run::RunStatus::Completed);
    let best = evals.iter().copied().reduce(f64::min).unwrap();
    assert!((rec.best_eval_loss.unwrap() - best).abs() < 1e-6, "{rec:?}");
    assert!(rec.versions.candle.starts_with("0."), "{:?}", rec.versions);
}

/// The trainer's arguments for a short run of the tiny model.
fn short_run(model: &Path, data: &Path, o: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        o.to_str().unwrap(),
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--lora-r",
        "4",
        "--learning-rate",
        "1e-3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The tiny model of the short runs (hidden 32, one layer) and the sample shards, in `dir`.
fn tiny_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("tiny");
    write_tiny_model(&model, 32, 1, 3).unwrap();
    (model, shards(dir, 96))
}

fn run_trainer(a: &[String]) -> (i32, String) {
    out(&mut trainer(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
}

#[test]
fn resume_refuses_another_run_and_a_completed_run_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_inputs(tmp.path());
    let o = tmp.path().join("run");
    let (code, log) = run_trainer(&short_run(&model, &data, &o, &[]));
    assert_eq!(code, 0, "{log}");
    // resuming a run that completed: said so, status 0, nothing redone
    let before = std::fs::read(o.join("adapter_model.safetensors")).unwrap();
    let (code, log) = run_trainer(&short_run(
        &model,
        &data,
        &o,
        &["--resume-from-checkpoint", "latest"],
    ));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("already completed at step 4 with these arguments; nothing to resume"),
        "{log}"
    );
    // asking a completed run for more steps, or other settings, is refused (exit 2), never a
    // silent no-op, and changes nothing
    for extra in [
        &["--max-steps", "6"][..],
        &["--num-train-epochs", "3", "--max-steps", "-1"][..],
        &["--learning-rate", "1e-3", "--lora-r", "8"][..],
    ] {
        for spec in ["latest", "auto", "checkpoint-2"] {
            let mut a = short_run(&model, &data, &o, &["--resume-from-checkpoint", spec]);
            a.extend(extra.iter().map(|s| s.to_string()));
            let (code, log) = run_trainer(&a);
            assert_eq!(code, 2, "{extra:?} {spec}: {log}");
            assert!(log.contains("a completed run is not continued"), "{log}");
            assert_eq!(
                std::fs::read(o.join("adapter_model.safetensors")).unwrap(),
                before
            );
        }
    }
    assert_eq!(
        std::fs::read(o.join("adapter_model.safetensors")).unwrap(),
        before
    );
    // an unfinished run (adapter not written yet) resumed with other settings: each is named
    std::fs::remove_file(o.join("adapter_model.safetensors")).unwrap();
    let other = tmp.path().join("other");
    let other_data = common::testing::sample_shards(&other, 64, 0.15).unwrap();
    let (code, log) = run_trainer(&short_run(
        &model,
        &other_data,
        &o,
        &[
            "--resume-from-checkpoint",
            "latest",
            "--lora-r",
            "8",
            "--seed",
            "7",
        ],
    ));
    assert_eq!(code, 2, "{log}");
    for want in [
        "--lora-r: checkpoint 4, now 8",
        "--seed: checkpoint 42, now 7",
        "--data: checkpoint ",
    ] {
        assert!(log.contains(want), "want '{want}' in {log}");
    }
    // the same settings resume
    let (code, log) = run_trainer(&short_run(
        &model,
        &data,
        &o,
        &["--resume-from-checkpoint", "latest"],
    ));
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        std::fs::read(o.join("adapter_model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn every_end_is_recorded_and_foreign_token_ids_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_inputs(tmp.path());
    // a run that fails mid-way leaves run.json `failed` with the error, not `running`
    let args = common::train::args::TrainArgs {
        model: model.clone(),
        data: data.clone(),
        output_dir: tmp.path().join("failing"),
        max_steps: 3,
        save_steps: 0,
        ..Default::default()
    };
    let mut t = common::train::Trainer::new(args).unwrap();
    t.model.take_loras(); // the step then has no LoRA gradients to apply
    struct Quiet;
    impl common::train::Reporter for Quiet {
        fn line(&mut self, _: &str) {}
    }
    let e = t
        .run(std::sync::Arc::new(false.into()), &mut Quiet)
        .unwrap_err();
    let rec = common::train::run::RunRecord::load(&tmp.path().join("failing")).unwrap();
    assert_eq!(rec.status, common::train::run::RunStatus::Failed);
    assert_eq!(
        rec.error.as_deref(),
        Some(common::cli::error_line(&e).as_str())
    );
    // token ids past the model's vocabulary: an error naming the shard, no panic
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = 1000.into();
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let small: common::ModelConfig = serde_json::from_value(cfg).unwrap();
    let w: std::collections::BTreeMap<_, _> =
        common::model::init::random_weights(&small, 1, candle_core::DType::F32)
            .into_iter()
            .collect();
    common::weights::save(&w, &model.join("model.safetensors")).unwrap();
    let (code, log) = run_trainer(&short_run(&model, &data, &tmp.path().join("oov"), &[]));
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("train-00000.tokens.u32")
            && log.contains("outside the model's vocabulary of 1000"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// Eval losses after training steps, by step.
fn evals(o: &Path) -> Vec<(usize, f64)> {
    common::train::metrics::read(o)
        .unwrap()
        .iter()
        .filter(|r| r.step > 0)
        .filter_map(|r| Some((r.step, r.eval_loss?)))
        .collect()
}

/// HF EarlyStoppingCallback's rule over a series of eval losses: the step it stops at.
fn early_stop_step(series: &[(usize, f64)], patience: usize, threshold: f64) -> Option<usize> {
    let (mut best, mut bad) = (None::<f64>, 0);
    for &(step, e) in series {
        let significant = best.is_none_or(|b| e < b && (e - b).abs() > threshold);
        if best.is_none_or(|b| e < b) {
            best = Some(e);
        }
        bad = if significant { 0 } else { bad + 1 };
        if bad >= patience {
            return Some(step);
        }
    }
    None
}

#[test]
fn the_best_adapter_is_kept_and_early_stopping_stops_where_hf_would() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // the sample data's first 12 conversations (8 train, 4 held out) at a constant 5e-3: the
    // model learns them by heart within a few epochs and the eval loss climbs again
    let small = tmp.path().join("small.jsonl");
    let text =
        std::fs::read_to_string(common::testing::repo_root().join("data/counsel_train.jsonl"))
            .unwrap();
    std::fs::write(
        &small,
        text.lines().take(12).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    let data = tmp.path().join("shards");
    common::data::prepare(
        &common::data::PrepOptions {
            inputs: vec![small],
            model_dir: real.clone(),
            output: data.clone(),
            max_seq_len: 128,
            val_split: 0.34,
            seed: 1,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    let base = |o: &Path, extra: &[&str]| {
        let mut a = short_run(
            &real,
            &data,
            o,
            &[
                "--learning-rate",
                "5e-3",
                "--lr-scheduler-type",
                "constant",
                "--lora-r",
                "16",
                "--lora-alpha",
                "32",
                "--target-modules",
                "all-linear",
                "--per-device-train-batch-size",
                "4",
                "--eval-steps",
                "1",
                "--save-steps",
                "1",
                "--max-steps",
                "12",
            ],
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let full = tmp.path().join("full");
    let (code, log) = run_trainer(&base(&full, &["--load-best-model-at-end"]));
    assert_eq!(code, 0, "{log}");
    let series = evals(&full);
    assert_eq!(series.len(), 12);
    let (best_step, best) = series
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert!(best_step < 12, "the run does not overfit: {series:?}");
    // the adapter written is the best checkpoint's, byte for byte, and run.json says so
    let ckpt = full.join(format!("checkpoint-{best_step}"));
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(full.join(f)).unwrap(),
            std::fs::read(ckpt.join(f)).unwrap(),
            "{f}"
        );
    }
    let rec = common::train::run::RunRecord::load(&full).unwrap();
    assert_eq!(
        (rec.best_step, rec.kept_step),
        (Some(best_step), Some(best_step))
    );
    assert!((rec.best_metric.unwrap() - best).abs() < 1e-6);
    assert!(
        log.contains(&format!("kept step {best_step}, the best")),
        "{log}"
    );
    // early stopping: stops where HF's rule says on this series, saying why
    let (patience, threshold) = (2, 0.01);
    let want = early_stop_step(&series, patience, threshold).expect("the series has a plateau");
    let early = tmp.path().join("early");
    let (code, log) = run_trainer(&base(
        &early,
        &[
            "--load-best-model-at-end",
            "--early-stopping-patience",
            "2",
            "--early-stopping-threshold",
            "0.01",
            "--save-total-limit",
            "1",
        ],
    ));
    assert_eq!(code, 0, "{log}");
    assert_eq!(evals(&early).last().unwrap().0, want, "{log}");
    let rec = common::train::run::RunRecord::load(&early).unwrap();
    assert_eq!(rec.status, common::train::run::RunStatus::Completed);
    assert_eq!(rec.reason.as_deref(), Some("early_stopping"));
    assert_eq!(rec.global_step, want);
    assert!(log.contains("stopped early"), "{log}");
    // --save-total-limit 1 kept the best checkpoint, and the adapter is the best one
    let ckpts = common::train::checkpoint::list(&early);
    assert!(
        ckpts.iter().any(|(s, _)| *s == best_step.min(want)),
        "{ckpts:?}"
    );
    let kept = rec.kept_step.unwrap();
    assert_eq!(
        std::fs::read(early.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(full.join(format!("checkpoint-{kept}/adapter_model.safetensors"))).unwrap()
    );
    // resume from a checkpoint after the best step (what an interruption there leaves):
    // the same best adapter, the same stop
    let k = (best_step + 1..want)
        .next()
        .unwrap_or(want - 1)
        .max(best_step);
    let resumed = tmp.path().join("resumed");
    std::fs::create_dir(&resumed).unwrap();
    // an interrupted run's directory holds its checkpoints: the best one and the last (the
    // full run's are the same files: both runs are identical up to the stop)
    for step in [best_step, k] {
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(full.join(format!("checkpoint-{step}")))
            .arg(&resumed)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let (code, log) = run_trainer(&base(
        &resumed,
        &[
            "--load-best-model-at-end",
            "--early-stopping-patience",
            "2",
            "--early-stopping-threshold",
            "0.01",
            "--resume-from-checkpoint",
            "latest",
        ],
    ));
    assert_eq!(code, 0, "{log}");
    let rec = common::train::run::RunRecord::load(&resumed).unwrap();
    assert_eq!((rec.global_step, rec.kept_step), (want, Some(kept)));
    assert_eq!(
        std::fs::read(resumed.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(early.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn epoch_strategies_evaluate_and_save_at_epoch_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_inputs(tmp.path());
    let o = tmp.path().join("run");
    let mut a = short_run(
        &model,
        &data,
        &o,
        &[
            "--eval-strategy",
            "epoch",
            "--save-strategy",
            "epoch",
            "--num-train-epochs",
            "3",
        ],
    );
    // epochs, not --max-steps, set the length
    let i = a.iter().position(|x| x == "--max-steps").unwrap();
    a.drain(i..i + 2);
    let (code, log) = run_trainer(&a);
    assert_eq!(code, 0, "{log}");
    let rec = common::train::run::RunRecord::load(&o).unwrap();
    let per_epoch = rec.batches_per_epoch; // one micro-batch per step
    assert_eq!(rec.total_steps, 3 * per_epoch);
    let steps: Vec<usize> = evals(&o).iter().map(|e| e.0).collect();
    assert_eq!(steps, [per_epoch, 2 * per_epoch, 3 * per_epoch]);
    let saved: Vec<usize> = common::train::checkpoint::list(&o)
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(
        saved,
        [per_epoch, 2 * per_epoch],
        "the last step writes the adapter, not a checkpoint"
    );
    // and --eval-strategy no evaluates nothing, not even before training
    let o2 = tmp.path().join("noeval");
    let (code, log) = run_trainer(&short_run(&model, &data, &o2, &["--eval-strategy", "no"]));
    assert_eq!(code, 0, "{log}");
    assert!(common::train::metrics::read(&o2)
        .unwrap()
        .iter()
        .all(|r| r.eval_loss.is_none()));
    // --load-best-model-at-end with mismatched strategies is refused, as in HF
    let (code, log) = run_trainer(&short_run(
        &model,
        &data,
        &tmp.path().join("bad"),
        &[
            "--load-best-model-at-end",
            "--eval-steps",
            "3",
            "--save-steps",
            "2",
        ],
    ));
    assert_eq!(code, 2, "bad arguments: {log}");
    assert!(log.contains("round multiple of --eval-steps"), "{log}");
}

#[test]
fn neftune_changes_training_and_not_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_inputs(tmp.path());
    let (plain, noisy) = (tmp.path().join("plain"), tmp.path().join("noisy"));
    let (code, log) = run_trainer(&short_run(&model, &data, &plain, &["--eval-steps", "2"]));
    assert_eq!(code, 0, "{log}");
    let (code, log) = run_trainer(&short_run(
        &model,
        &data,
        &noisy,
        &["--eval-steps", "2", "--neftune-noise-alpha", "5"],
    ));
    assert_eq!(code, 0, "{log}");
    let rows = |o: &Path| common::train::metrics::read(o).unwrap();
    let (p, n) = (rows(&plain), rows(&noisy));
    // evaluation before training sees the same model: the noise is not in evaluation
    assert_eq!(p[0].eval_loss, n[0].eval_loss);
    // training does see it: other losses, another adapter
    assert_ne!(p[1].loss, n[1].loss);
    assert_ne!(adapter_values(&plain), adapter_values(&noisy));
    // and it is reproducible: the same noise for the same seed
    let again = tmp.path().join("again");
    let (code, log) = run_trainer(&short_run(
        &model,
        &data,
        &again,
        &["--eval-steps", "2", "--neftune-noise-alpha", "5"],
    ));
    assert_eq!(code, 0, "{log}");
    assert_eq!(adapter_values(&again), adapter_values(&noisy));
}

#[test]
fn auto_resume_serves_a_job_system_and_threads_follow_the_cpu_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_inputs(tmp.path());
    let o = tmp.path().join("run");
    let auto = short_run(&model, &data, &o, &["--resume-from-checkpoint", "auto"]);
    // an attempt stopped before its first checkpoint left run.json and metrics.csv: start afresh
    std::fs::create_dir_all(&o).unwrap();
    std::fs::write(o.join("metrics.csv"), "step,epoch\n").unwrap();
    std::fs::write(o.join("run.json"), r#"{"status": "running"}"#).unwrap();
    // on one CPU (as a --cpus-per-task=1 job), with one thread
    let mut c = Command::new("taskset");
    c.args(["-c", "0", env!("CARGO_BIN_EXE_trainer")])
        .args(&auto)
        .env("DIALORA_NO_BAR", "1")
        .env_remove("RAYON_NUM_THREADS");
    let (code, log) = out(&mut c);
    assert_eq!(code, 0, "{log}");
    let rec = common::train::run::RunRecord::load(&o).unwrap();
    assert_eq!(
        (rec.status, rec.threads),
        (common::train::run::RunStatus::Completed, 1)
    );
    let done = std::fs::read(o.join("adapter_model.safetensors")).unwrap();
    // completed: the same command says so and exits 0
    let (code, log) = run_trainer(&auto);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("already completed"), "{log}");
    // a checkpoint and no adapter: the same command resumes it to the same adapter
    std::fs::remove_file(o.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_dir_all(o.join("checkpoint-4")).ok();
    let (code, log) = run_trainer(&auto);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("resuming at step 2"), "{log}");
    assert_eq!(
        std::fs::read(o.join("adapter_model.safetensors")).unwrap(),
        done
    );
}

#[test]
fn bf16_mixed_precision_trains_with_f32_lora_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_inputs(tmp.path());
    let (full, mixed) = (tmp.path().join("f32"), tmp.path().join("bf16"));
    let (code, log) = run_trainer(&short_run(&model, &data, &full, &["--eval-steps", "4"]));
    assert_eq!(code, 0, "{log}");
    let (code, log) = run_trainer(&short_run(
        &model,
        &data,
        &mixed,
        &["--eval-steps", "4", "--bf16"],
    ));
    assert_eq!(code, 0, "{log}");
    let rec = common::train::run::RunRecord::load(&mixed).unwrap();
    assert!(rec.args.bf16);
    assert_eq!(rec.args.compute_dtype(), common::device::DtypeArg::Bf16);
    // the adapter's master weights are f32, whatever the compute dtype
    let st = std::fs::read(mixed.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, v)| v.dtype() == safetensors::Dtype::F32));
    // the same training in bf16 compute: close to f32's, not equal to it
    let rows = |o: &Path| common::train::metrics::read(o).unwrap();
    let (f, m) = (rows(&full), rows(&mixed));
    let (ef, em) = (
        f.last().unwrap().eval_loss.unwrap(),
        m.last().unwrap().eval_loss.unwrap(),
    );
    assert!(
        (ef - em).abs() < 0.02 * ef,
        "eval loss f32 {ef} vs bf16 {em}"
    );
    assert_ne!(adapter_values(&full), adapter_values(&mixed));
}

/// The trainer started with `a`, its output discarded.
fn spawn_quiet(a: &[String]) -> Child {
    trainer(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn run_json(o: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(o.join("run.json")).unwrap()).unwrap()
}

fn signal(child: &Child, sig: &str) {
    let s = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

/// A second SIGINT 0.2 s after the first aborts without saving and run.json says `aborted` at
/// the step reached (it said `running`, step 0); a resume that cannot load its checkpoint says
/// `failed` with the reason (it said `running`).
#[test]
fn a_second_signal_and_a_failed_resume_are_recorded() {
    let real = real_model_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = shards(tmp.path(), 64);
    let o = tmp.path().join("run");
    let a = short_run(
        &real,
        &data,
        &o,
        &[
            "--max-steps",
            "400",
            "--save-steps",
            "1",
            "--eval-strategy",
            "no",
        ],
    );
    let mut child = spawn_quiet(&a);
    wait_for(&o.join("checkpoint-1"), &mut child);
    signal(&child, "INT");
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, "INT");
    let code = child.wait().unwrap().code();
    let rec = run_json(&o);
    assert_eq!(code, Some(1), "{rec}");
    assert_eq!(rec["status"], "aborted", "{rec}");
    assert!(rec["global_step"].as_u64().unwrap() >= 1, "{rec}");
    assert!(
        rec["error"].as_str().unwrap().contains("second interrupt"),
        "{rec}"
    );
    // the latest checkpoint's optimizer file cut short: the resume fails and says why
    let latest = common::train::checkpoint::list(&o)
        .last()
        .unwrap()
        .1
        .clone();
    let opt = latest.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let mut resume = a.clone();
    resume.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    let (code, log) = run_trainer(&resume);
    assert_eq!(code, 1, "{log}");
    let rec = run_json(&o);
    assert_eq!(rec["status"], "failed", "{rec}");
    assert!(
        rec["error"].as_str().unwrap().contains("could not resume")
            && rec["error"]
                .as_str()
                .unwrap()
                .contains("optimizer.safetensors"),
        "{rec}"
    );
}

/// Evaluations asked for on shards with no validation sequences are refused (exit 2); the
/// default strategy trains and warns that nothing is evaluated.
#[test]
fn evaluation_without_validation_data_is_refused_or_warned() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, 32, 1, 3).unwrap();
    let data = common::testing::sample_shards(tmp.path(), 96, 0.0).unwrap();
    for extra in [
        &["--eval-strategy", "steps", "--eval-steps", "1"][..],
        &["--eval-strategy", "epoch"][..],
    ] {
        let o = tmp.path().join("refused");
        let (code, log) = run_trainer(&short_run(&model, &data, &o, extra));
        assert_eq!(code, 2, "{extra:?}: {log}");
        assert!(log.contains("no validation sequences"), "{log}");
        assert!(!o.join("metrics.csv").exists());
    }
    let o = tmp.path().join("default");
    let (code, log) = run_trainer(&short_run(&model, &data, &o, &[]));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("warning") && log.contains("not evaluated"),
        "{log}"
    );
}

/// Two trainers on one output directory: the second is refused with the holder's PID and host
/// while the first trains; a holder killed with SIGKILL leaves a lock the next one takes.
#[test]
fn one_trainer_per_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_inputs(tmp.path());
    let o = tmp.path().join("run");
    let a = short_run(
        &model,
        &data,
        &o,
        &[
            "--max-steps",
            "3000",
            "--save-steps",
            "100000",
            "--resume-from-checkpoint",
            "auto",
        ],
    );
    let mut first = spawn_quiet(&a);
    wait_for(&o.join("metrics.csv"), &mut first);
    let (code, log) = run_trainer(&a);
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("another trainer is writing this output directory")
            && log.contains(&format!("pid {}", first.id())),
        "{log}"
    );
    assert!(first.try_wait().unwrap().is_none(), "the first one runs on");
    signal(&first, "KILL");
    first.wait().unwrap();
    // the lock went with the process: the next attempt resumes and completes
    let short = short_run(
        &model,
        &data,
        &o,
        &["--max-steps", "40", "--resume-from-checkpoint", "auto"],
    );
    let (code, log) = run_trainer(&short);
    assert_eq!(code, 0, "{log}");
    assert_eq!(run_json(&o)["status"], "completed");
}

/// An output directory that cannot be created (its parent is read-only to the user): one line
/// naming it, status 1, nothing written (run unprivileged: root would write anyway).
#[test]
fn an_unwritable_output_directory_is_a_one_line_error() {
    use common::testing::{read_only_dir, unprivileged};
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_inputs(tmp.path());
    let ro = read_only_dir(tmp.path());
    let o = ro.join("run");
    let a = short_run(&model, &data, &o, &[]);
    let out = unprivileged(Path::new(env!("CARGO_BIN_EXE_trainer")), tmp.path())
        .args(&a)
        .env("DIALORA_NO_BAR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(o.to_str().unwrap()), "{err}");
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
}

/// A Python with TensorBoard (scripts/tb-env.sh), or None when pip cannot reach PyPI (said).
fn tensorboard_python() -> Option<String> {
    let o = Command::new("bash")
        .arg(common::testing::repo_root().join("scripts/tb-env.sh"))
        .output()
        .unwrap();
    match o.status.code() {
        Some(0) => Some(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Some(3) => {
            // written past the test harness's capture, so `make test` shows why
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (TensorBoard test): no TensorBoard to read the event files with: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        _ => panic!("tb-env.sh: {}", String::from_utf8_lossy(&o.stderr)),
    }
}

/// `--report-to tensorboard`: TensorBoard's own reader (EventAccumulator) reads back every
/// logged value of metrics.csv under HF's tags and the arguments as text; a run interrupted
/// after its checkpoint and resumed has each step once, with the values of metrics.csv.
#[test]
fn tensorboard_reads_back_every_logged_value_once_across_a_resume() {
    let Some(py) = tensorboard_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, 64, 2, 3).unwrap();
    let data = shards(tmp.path(), 128);
    let o = tmp.path().join("run");
    let a = short_run(
        &model,
        &data,
        &o,
        &[
            "--max-steps",
            "400",
            "--save-steps",
            "3",
            "--logging-steps",
            "1",
            "--eval-steps",
            "5",
            "--report-to",
            "tensorboard",
        ],
    );
    let mut child = spawn_quiet(&a);
    wait_for(&o.join("checkpoint-6"), &mut child);
    // a few steps past the checkpoint, logged by this attempt and then superseded
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "KILL");
    child.wait().unwrap();
    let checkpoint = common::train::checkpoint::list(&o).last().unwrap().0;
    let mut resume = a.clone();
    resume.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    // the second attempt: stopped by SIGTERM (a checkpoint, status 75) six steps on
    let mut child = spawn_quiet(&resume);
    wait_for(
        &o.join(format!("checkpoint-{}", checkpoint + 6)),
        &mut child,
    );
    signal(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(75));
    let rows = common::train::metrics::read(&o).unwrap();
    let events = Command::new(&py)
        .arg(common::testing::repo_root().join("scripts/read-tensorboard.py"))
        .arg(o.join("runs"))
        .output()
        .unwrap();
    assert!(
        events.status.success(),
        "{}",
        String::from_utf8_lossy(&events.stderr)
    );
    let tb: serde_json::Value = serde_json::from_slice(&events.stdout).unwrap();
    assert_eq!(
        std::fs::read_dir(o.join("runs")).unwrap().count(),
        2,
        "one event file per attempt"
    );
    let series = |tag: &str| -> Vec<(usize, f64)> {
        tb["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {tb}"))
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap()))
            .collect()
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-3);
    for (tag, col) in [
        (
            "train/loss",
            (|r: &common::train::metrics::MetricsRow| r.loss) as fn(&_) -> _,
        ),
        ("train/grad_norm", |r| r.grad_norm),
        ("train/learning_rate", |r| r.learning_rate),
        ("eval/loss", |r| r.eval_loss),
    ] {
        let want: Vec<(usize, f64)> = rows
            .iter()
            .filter_map(|r| col(r).map(|v| (r.step, v)))
            .collect();
        let got = series(tag);
        assert_eq!(
            got.iter().map(|p| p.0).collect::<Vec<_>>(),
            want.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{tag}: each step once, as in metrics.csv"
        );
        for ((s, g), (_, w)) in got.iter().zip(&want) {
            assert!(close(*g, *w), "{tag} at step {s}: {g} vs {w}");
        }
    }
    assert!(series("train/epoch").len() == rows.iter().filter(|r| r.loss.is_some()).count());
    // how: the resumed attempt's file starts a session after the checkpoint, which tells every
    // reader (not only TensorBoard's, which also drops steps that go backwards) to drop what
    // the killed attempt logged past it
    assert_eq!(
        tb["session_starts"],
        serde_json::json!([[], [checkpoint + 1]]),
        "{}",
        tb["session_starts"]
    );
    let args = tb["text"]["args"][0].as_str().unwrap();
    assert!(args.contains("\"lora_r\": 4"), "{args}");
}
