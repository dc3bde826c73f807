//! Data-parallel training over MPI, run with the real Open MPI (`make mpi-test`: builds the MPI
//! trainer of `make mpi` and runs these with `mpirun`). Two ranks must train exactly what one
//! process does with twice the accumulation, stop together on a signal that reaches one of
//! them, resume (under another world size too, when the step's micro-batches stay the same),
//! and fail, not hang, when a rank dies. The plain trainer refuses to be one of several tasks.

use common::lora::Adapter;
use common::testing::{real_model_dir, repo_root, sample_shards, write_tiny_model};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The trainer built with MPI (`make mpi`; DIALORA_MPI_BIN names another directory).
fn mpi_trainer() -> PathBuf {
    let dir = std::env::var_os("DIALORA_MPI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/mpi/release"));
    let bin = dir.join("trainer");
    assert!(
        bin.exists(),
        "{} is missing: build it with make mpi (or run make mpi-test)",
        bin.display()
    );
    bin
}

fn plain_trainer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trainer"))
}

/// `mpirun -n N BIN ARGS` as root may run it.
fn mpirun(n: usize, bin: &Path, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-n", &n.to_string()])
        .arg(bin)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("DIALORA_NO_BAR", "1");
    c
}

fn single(bin: &Path, args: &[String]) -> Command {
    let mut c = Command::new(bin);
    c.args(args).env("DIALORA_NO_BAR", "1");
    c
}

/// Runs `c` to its end: its exit status and what it printed.
fn run(c: Command) -> (i32, String) {
    finish(spawn(c))
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn with(base: &[String], out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = base.to_vec();
    a.extend(["--output-dir".into(), out.display().to_string()]);
    a.extend(strs(extra));
    a
}

/// A metrics.csv row: step, loss, grad_norm, eval_loss.
type Row = (usize, Option<f64>, Option<f64>, Option<f64>);

fn metrics(dir: &Path) -> Vec<Row> {
    let mut r = csv::Reader::from_path(dir.join("metrics.csv")).unwrap();
    r.deserialize::<std::collections::HashMap<String, String>>()
        .map(|row| {
            let row = row.unwrap();
            let f = |k: &str| row.get(k).and_then(|v| v.parse::<f64>().ok());
            (
                row["step"].parse().unwrap(),
                f("loss"),
                f("grad_norm"),
                f("eval_loss"),
            )
        })
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

/// The largest difference between two runs' logged values, relative to the values.
fn metrics_diff(a: &Path, b: &Path) -> f64 {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(
        ma.iter().map(|r| r.0).collect::<Vec<_>>(),
        mb.iter().map(|r| r.0).collect::<Vec<_>>(),
        "the same steps logged once each"
    );
    let mut worst = 0f64;
    for (x, y) in ma.iter().zip(&mb) {
        for (p, q) in [(x.1, y.1), (x.2, y.2), (x.3, y.3)] {
            assert_eq!(p.is_some(), q.is_some(), "{x:?} vs {y:?}");
            if let (Some(p), Some(q)) = (p, q) {
                worst = worst.max(rel(p, q));
            }
        }
    }
    worst
}

/// The largest difference between two adapters, relative to the largest weight of each tensor.
fn adapter_diff(a: &Path, b: &Path) -> f64 {
    let load = |d: &Path| Adapter::load(d, candle_core::DType::F32, &candle_core::Device::Cpu);
    let (a, b) = (load(a).unwrap(), load(b).unwrap());
    assert_eq!(
        a.weights.keys().collect::<Vec<_>>(),
        b.weights.keys().collect::<Vec<_>>()
    );
    let mut worst = 0f64;
    for (k, (xa, xb)) in &a.weights {
        let (ya, yb) = &b.weights[k];
        for (x, y) in [(xa, ya), (xb, yb)] {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) as f64;
            for (p, q) in x.iter().zip(&y) {
                worst = worst.max((p - q).abs() as f64 / scale);
            }
        }
    }
    worst
}

fn run_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap()
}

#[test]
#[ignore = "needs Open MPI and the MPI trainer: make mpi-test"]
fn two_ranks_train_what_one_process_does_with_twice_the_accumulation() {
    let mpi = mpi_trainer();
    let tmp = tempfile::tempdir().unwrap();
    let model = real_model_dir().unwrap();
    let data = sample_shards(tmp.path(), 128, 0.15).unwrap();
    let base = strs(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        "--lora-r",
        "8",
        "--lora-dropout",
        "0.1",
        "--eval-steps",
        "2",
        "--logging-steps",
        "1",
    ]);
    let one = tmp.path().join("one");
    let (code, log) = run(single(
        &plain_trainer(),
        &with(&base, &one, &["--gradient-accumulation-steps", "2"]),
    ));
    assert_eq!(code, 0, "{log}");
    let two = tmp.path().join("two");
    let (code, log) = run(mpirun(
        2,
        &mpi,
        &with(&base, &two, &["--gradient-accumulation-steps", "1"]),
    ));
    assert_eq!(code, 0, "{log}");
    // rank 0 alone speaks and writes
    assert_eq!(log.matches("step 1/4:").count(), 1, "{log}");
    assert!(log.contains("on 2 ranks (4 sequences a step)"), "{log}");
    let r = run_json(&two);
    assert_eq!(r["world_size"], 2);
    assert_eq!(r["global_batch_size"], 4);
    assert_eq!(r["total_steps"], 4);
    let (m, w) = (metrics_diff(&one, &two), adapter_diff(&one, &two));
    assert!(m < 1e-5, "logged values differ by {m:e} (relative)");
    assert!(w < 1e-5, "adapters differ by {w:e} (relative)");
    // the comparison can tell batches apart: 2 ranks without their share of the batch (one
    // process with the per-rank batch) train something else
    let half = tmp.path().join("half");
    let (code, log) = run(single(
        &plain_trainer(),
        &with(&base, &half, &["--gradient-accumulation-steps", "1"]),
    ));
    assert_eq!(code, 0, "{log}");
    assert!(metrics_diff(&one, &half) > 1e-3);
    assert!(adapter_diff(&one, &half) > 1e-3);
}

/// A tiny model and the sample shards, and the arguments every run of it shares.
fn tiny(tmp: &Path, extra: &[&str]) -> Vec<String> {
    let model = tmp.join("tiny");
    write_tiny_model(&model, 32, 2, 5).unwrap();
    let data = sample_shards(tmp, 96, 0.15).unwrap();
    let mut a = strs(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--lora-r",
        "4",
        "--lora-dropout",
        "0.1",
        "--learning-rate",
        "1e-2",
        "--target-modules",
        "q_proj,v_proj,down_proj",
        "--init-lora-weights",
        "false",
    ]);
    a.extend(strs(extra));
    a
}

#[test]
#[ignore = "needs Open MPI and the MPI trainer: make mpi-test"]
fn uneven_batches_and_epoch_ends_split_across_ranks_as_one_process_takes_them() {
    let mpi = mpi_trainer();
    let tmp = tempfile::tempdir().unwrap();
    // 5 sequences a micro-batch: the epoch's last one is short, its micro-batches are odd in
    // number (a step spans the epoch's end) and the evaluation's 3-sequence batches split
    // unevenly over the ranks
    let base = tiny(
        tmp.path(),
        &[
            "--num-train-epochs",
            "2",
            "--per-device-train-batch-size",
            "5",
            "--per-device-eval-batch-size",
            "3",
            "--eval-strategy",
            "epoch",
            "--logging-steps",
            "1",
        ],
    );
    let one = tmp.path().join("one");
    let (code, log) = run(single(
        &plain_trainer(),
        &with(&base, &one, &["--gradient-accumulation-steps", "2"]),
    ));
    assert_eq!(code, 0, "{log}");
    let two = tmp.path().join("two");
    let (code, log) = run(mpirun(2, &mpi, &with(&base, &two, &[])));
    assert_eq!(code, 0, "{log}");
    let train = run_json(&two)["data"]["train_sequences"].as_u64().unwrap();
    assert_ne!(train % 5, 0, "the epoch ends on a short micro-batch");
    assert_eq!(train.div_ceil(5) % 2, 1, "an odd number of micro-batches");
    let (m, w) = (metrics_diff(&one, &two), adapter_diff(&one, &two));
    assert!(m < 1e-5, "logged values differ by {m:e}");
    assert!(w < 1e-5, "adapters differ by {w:e}");
    assert!(metrics(&two).iter().any(|r| r.3.is_some()), "evaluated");
}

/// The trainer processes mpirun started, by rank.
fn ranks(mpirun: &Child, n: usize) -> Vec<u32> {
    let t = Instant::now();
    loop {
        let mut found = vec![0u32; n];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid: u32 = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0);
            if ppid != mpirun.id() {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            for var in env.split(|&b| b == 0) {
                if let Some(r) = var.strip_prefix(b"OMPI_COMM_WORLD_RANK=") {
                    if let Some(r) = std::str::from_utf8(r)
                        .ok()
                        .and_then(|r| r.parse::<usize>().ok())
                    {
                        found[r] = pid;
                    }
                }
            }
        }
        if found.iter().all(|&p| p > 0) {
            return found;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "mpirun's ranks not found"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(pid: u32, sig: &str) {
    let s = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

/// Waits until metrics.csv logs `rows` training steps.
fn wait_for_steps(dir: &Path, rows: usize, child: &mut Child) {
    let t = Instant::now();
    loop {
        let n = std::fs::read_to_string(dir.join("metrics.csv"))
            .map(|s| s.lines().skip(1).filter(|l| !l.starts_with("0,")).count())
            .unwrap_or(0);
        if n >= rows {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(c: Child) -> (i32, String) {
    let o = c.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout),
    )
}

#[test]
#[ignore = "needs Open MPI and the MPI trainer: make mpi-test"]
fn a_signal_to_one_rank_stops_both_and_the_run_resumes_under_another_world_size() {
    let mpi = mpi_trainer();
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(
        tmp.path(),
        &[
            "--max-steps",
            "600",
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--logging-steps",
            "1",
            "--eval-steps",
            "200",
            "--save-steps",
            "10000",
        ],
    );
    let whole = tmp.path().join("whole");
    let (code, log) = run(mpirun(2, &mpi, &with(&base, &whole, &[])));
    assert_eq!(code, 0, "{log}");

    let cut = tmp.path().join("cut");
    let mut job = spawn(mpirun(2, &mpi, &with(&base, &cut, &[])));
    let pids = ranks(&job, 2);
    wait_for_steps(&cut, 5, &mut job);
    kill(pids[1], "TERM");
    let (code, log) = finish(job);
    assert_eq!(code, 75, "{log}");
    assert!(log.contains("rank 1: interrupt received"), "{log}");
    let cps = common::train::checkpoint::list(&cut);
    assert_eq!(cps.len(), 1, "one checkpoint: {cps:?}\n{log}");
    let step = cps[0].0;
    assert!(step < 600, "{log}");
    let r = run_json(&cut);
    assert_eq!(r["status"], "interrupted");
    assert_eq!(r["global_step"], step);

    // another world size with the same micro-batches a step (1 rank x accumulation 4) resumes
    // the same run; one that changes the step (1 rank x accumulation 2) is refused
    let cut1 = tmp.path().join("cut1");
    copy_dir(&cut, &cut1);
    let resume = |dir: &Path, gas: &str| {
        let mut a = with(&base, dir, &["--resume-from-checkpoint", "latest"]);
        a.extend(strs(&["--gradient-accumulation-steps", gas]));
        a
    };
    let (code, log) = run(single(&plain_trainer(), &resume(&cut1, "2")));
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("--gradient-accumulation-steps: checkpoint 2 on each of 2 ranks (4 micro-batches a step), now 2"),
        "{log}"
    );
    let (code, log) = run(single(&plain_trainer(), &resume(&cut1, "4")));
    assert_eq!(code, 0, "{log}");
    let (code, log) = run(mpirun(2, &mpi, &resume(&cut, "2")));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains(&format!("resuming at step {step}")), "{log}");
    for d in [&cut, &cut1] {
        let w = adapter_diff(&whole, d);
        assert!(
            w < 1e-5,
            "{}: differs from the uninterrupted run by {w:e}",
            d.display()
        );
        assert!(metrics_diff(&whole, d) < 1e-5);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

#[test]
#[ignore = "needs Open MPI and the MPI trainer: make mpi-test"]
fn a_killed_rank_fails_the_others_and_startup_failures_fail_all() {
    let mpi = mpi_trainer();
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(
        tmp.path(),
        &[
            "--max-steps",
            "100000",
            "--logging-steps",
            "1",
            "--eval-strategy",
            "no",
        ],
    );
    let dir = tmp.path().join("killed");
    let mut job = spawn(mpirun(2, &mpi, &with(&base, &dir, &[])));
    let pids = ranks(&job, 2);
    wait_for_steps(&dir, 3, &mut job);
    kill(pids[1], "KILL");
    let t = Instant::now();
    let (code, log) = finish(job);
    assert!(t.elapsed() < Duration::from_secs(60), "{log}");
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains(&format!("rank 1 (pid {} on", pids[1])),
        "the survivor names the rank that died:\n{log}"
    );
    let r = run_json(&dir);
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().contains("rank 1"), "{r}");

    // a failure on one rank at start (rank 0 finds the output directory taken) ends both,
    // said once, with the status one process gives it
    let (code, log) = run(mpirun(2, &mpi, &with(&base, &dir, &[])));
    assert_eq!(code, 1, "{log}");
    let said: Vec<&str> = log.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(
        said[0].contains("rank 0:") && said[0].contains("not empty"),
        "{log}"
    );
}

#[test]
#[ignore = "needs Open MPI and the MPI trainer: make mpi-test"]
fn n_copies_of_one_run_are_refused() {
    let mpi = mpi_trainer();
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(tmp.path(), &["--max-steps", "2"]);
    let out = tmp.path().join("o");
    // the trainer without MPI under mpirun: each task refuses
    let (code, log) = run(mpirun(2, &plain_trainer(), &with(&base, &out, &[])));
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("one of 2 tasks (OMPI_COMM_WORLD_SIZE=2)") && log.contains("make mpi"),
        "{log}"
    );
    // srun's tasks: without MPI, and with MPI but no PMI plugin (srun --mpi=none)
    let srun_env = |c: &mut Command| {
        c.env("SLURM_STEP_ID", "0")
            .env("SLURM_STEP_NUM_TASKS", "2")
            .env("SLURM_NTASKS", "2")
            .env("SLURM_PROCID", "0")
            .env_remove("PMIX_RANK")
            .env_remove("PMI_RANK")
            .env_remove("PMI_FD");
    };
    let mut c = single(&plain_trainer(), &with(&base, &out, &[]));
    srun_env(&mut c);
    let (code, log) = run(c);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("SLURM_STEP_NUM_TASKS=2") && log.contains("make mpi"),
        "{log}"
    );
    let mut c = single(&mpi, &with(&base, &out, &[]));
    srun_env(&mut c);
    let (code, log) = run(c);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("srun --mpi=pmix"), "{log}");
    assert!(!out.join("run.json").exists(), "nothing trained");
    // alone, the MPI trainer is a trainer (MPI's singleton start)
    let (code, log) = run(single(&mpi, &with(&base, &out, &[])));
    assert_eq!(code, 0, "{log}");
    assert_eq!(run_json(&out)["world_size"], 1);
}

#[test]
#[ignore = "needs Open MPI and the MPI trainer: make mpi-test"]
fn divergence_ends_every_rank_with_its_status() {
    let mpi = mpi_trainer();
    let tmp = tempfile::tempdir().unwrap();
    // an update of 1e30 makes the next loss non-finite on both ranks, the same step
    let base = tiny(
        tmp.path(),
        &[
            "--max-steps",
            "50",
            "--learning-rate",
            "1e30",
            "--max-nonfinite-steps",
            "2",
            "--eval-strategy",
            "no",
            "--max-grad-norm",
            "0",
        ],
    );
    let out = tmp.path().join("o");
    let (code, log) = run(mpirun(2, &mpi, &with(&base, &out, &[])));
    assert_eq!(code, common::cli::exit::DIVERGED, "{log}");
    assert_eq!(
        log.matches("training diverged").count(),
        1,
        "said once: {log}"
    );
    let r = run_json(&out);
    assert_eq!(r["status"], "diverged");
    assert_eq!(r["world_size"], 2);
}
