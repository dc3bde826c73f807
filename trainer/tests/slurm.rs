//! The sweep's job array on a real Slurm cluster (`make slurm-test` starts a one-node cluster
//! on localhost and runs this): a 2x2 sweep in which one task is requeued, one is preempted by
//! a job of a higher-priority partition and one runs into its time limit with
//! `--signal=B:TERM@N`. Every point must complete, log each step once, and end with the adapter
//! an uninterrupted run makes, bit for bit; the report job that runs after the array lists all
//! points.

use common::testing::{sample_shards, write_tiny_model};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs a Slurm client command, returning its stdout; panics with its stderr on failure.
fn slurm(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `(job id, state, reason)` of every job in the queue (array tasks as `JOB_TASK`).
fn queue() -> Vec<(String, String, String)> {
    slurm("squeue", &["-h", "-r", "-o", "%i|%T|%r"])
        .lines()
        .filter_map(|l| {
            let mut p = l.split('|');
            Some((p.next()?.into(), p.next()?.into(), p.next()?.into()))
        })
        .collect()
}

/// Slurm holds a requeued job back for two minutes: lets those of `q` go now.
fn release_requeued(q: &[(String, String, String)]) {
    for (j, st, reason) in q {
        if st == "PENDING" && reason == "BeginTime" {
            Command::new("scontrol")
                .args(["update", &format!("JobId={j}"), "StartTime=now"])
                .status()
                .ok();
        }
    }
}

/// Runs scripts/sweep.sh with `args`, its runs under `runs`, the binaries of this build (and
/// `env`); panics with its stderr when it fails.
fn write_sweep(args: &[&str], runs: &Path, env: &[(&str, &Path)]) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_trainer"));
    let o = Command::new("bash")
        .arg(common::testing::repo_root().join("scripts/sweep.sh"))
        .args(args)
        .env("RUNS", runs)
        .env("DIALORA_BIN", bin.parent().unwrap())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The steps metrics.csv logs, each asserted to be logged once.
fn steps_logged_once(dir: &Path) -> Vec<usize> {
    let steps: Vec<usize> = common::train::metrics::read(dir)
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    let mut uniq = steps.clone();
    uniq.dedup();
    assert_eq!(steps, uniq, "{}: every step logged once", dir.display());
    steps
}

fn has_checkpoint(dir: &Path) -> bool {
    !common::train::checkpoint::list(dir).is_empty()
}

fn completed(dir: &Path) -> bool {
    common::train::completed_run(dir).is_some()
}

// long enough (about a minute a task on one core) that every disturbance finds its task running
const EXTRA: &[&str] = &[
    "--max-steps",
    "1600",
    "--save-steps",
    "100",
    "--per-device-train-batch-size",
    "2",
    "--logging-steps",
    "10",
    "--eval-steps",
    "400",
    "--lora-dropout",
    "0.1",
    "--target-modules",
    "all-linear",
];

#[test]
#[ignore = "needs a Slurm cluster: make slurm-test"]
fn a_sweep_survives_requeue_preemption_and_time_limits_on_slurm() {
    assert!(
        std::env::var_os("SLURM_CONF").is_some(),
        "SLURM_CONF is not set: run make slurm-test"
    );
    slurm("sinfo", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, 64, 2, 5).unwrap();
    let data = sample_shards(tmp.path(), 128, 0.15).unwrap();
    let runs = tmp.path().join("runs");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_trainer"));
    let mut args: Vec<&str> = vec![
        "--name",
        "s",
        "--slurm",
        "--cpus-per-task",
        "1",
        "--mem",
        "1G",
        "--time",
        "00:20:00",
        "--signal-seconds",
        "40",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "learning_rate=1e-3,2e-3",
        "lora_r=2,4",
        "--",
    ];
    args.extend(EXTRA);
    write_sweep(&args, &runs, &[]);
    let sweep = runs.join("s");
    let points: Vec<String> = std::fs::read_to_string(sweep.join("manifest.tsv"))
        .unwrap()
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(points.len(), 4);
    let script = sweep.join("sweep.sbatch");
    let s = script.to_str().unwrap();
    // tasks 0-2 as written; task 3 with a one-minute limit, warned 40 s before it
    let a = slurm("sbatch", &["--parsable", "--array=0-2", s]);
    let b = slurm("sbatch", &["--parsable", "--array=3", "--time=1", s]);
    let dep = format!("--dependency=afterany:{a}:{b}");
    let report = sweep.join("report.sbatch");
    slurm("sbatch", &["--parsable", &dep, report.to_str().unwrap()]);
    let dir = |i: usize| sweep.join(&points[i]);

    let (mut requeued, mut preempted) = (false, false);
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(540),
            "the sweep did not finish in 9 minutes: {:?}",
            queue()
        );
        let q = queue();
        let running = |id: &str| q.iter().any(|(j, st, _)| j == id && st == "RUNNING");
        release_requeued(&q);
        let task0 = format!("{a}_0");
        if !requeued && running(&task0) && has_checkpoint(&dir(0)) {
            slurm("scontrol", &["requeue", &task0]);
            requeued = true;
        }
        let task1 = format!("{a}_1");
        if requeued && !preempted && running(&task1) && has_checkpoint(&dir(1)) {
            // a job of the high-priority partition that needs every CPU of the node
            slurm(
                "sbatch",
                &[
                    "-p",
                    "high",
                    "-c",
                    "2",
                    "--mem",
                    "100M",
                    "-o",
                    "/dev/null",
                    "--wrap",
                    "sleep 2",
                ],
            );
            preempted = true;
        }
        if (0..4).all(|i| completed(&dir(i))) && q.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("sweep finished in {:.0} s", t0.elapsed().as_secs_f64());

    let log = |i: usize| {
        let id = if i == 3 {
            format!("{b}_3")
        } else {
            format!("{a}_{i}")
        };
        let (job, task) = id.split_once('_').unwrap();
        std::fs::read_to_string(sweep.join(format!("logs/dialora-s-{job}_{task}.log"))).unwrap()
    };
    // each disturbance reached the trainer, which saved a checkpoint and stopped (exit 75);
    // the task ran again from it, its log appended
    for (i, what) in [(0, "requeue"), (1, "preemption"), (3, "time limit")] {
        let l = log(i);
        assert!(
            l.contains("trainer: interrupted at step"),
            "task {i} ({what}):\n{l}"
        );
        assert!(l.matches("attempt").count() >= 2, "task {i} ({what}):\n{l}");
        assert!(l.contains("(resuming at step"), "task {i} ({what}):\n{l}");
    }
    assert!(log(1).contains("DUE TO PREEMPTION"), "{}", log(1));
    assert!(log(0).contains("DUE TO JOB REQUEUE"), "{}", log(0));
    for (i, p) in points.iter().enumerate() {
        let d = dir(i);
        let rec = common::train::run::RunRecord::load(&d).unwrap();
        assert_eq!(rec.status, common::train::run::RunStatus::Completed, "{p}");
        // the job's one CPU, one compute thread
        assert_eq!(rec.threads, 1, "{p}");
        assert_eq!(steps_logged_once(&d).last(), Some(&1600), "{p}");
        // the adapter of an uninterrupted run with the same arguments, bit for bit
        let reference = tmp.path().join(format!("ref-{i}"));
        let flags: Vec<String> = std::fs::read_to_string(sweep.join("manifest.tsv"))
            .unwrap()
            .lines()
            .nth(i)
            .unwrap()
            .split('\t')
            .nth(2)
            .unwrap()
            .split(' ')
            .map(str::to_string)
            .collect();
        let st = Command::new(&bin)
            .args([
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
            ])
            .args(["--output-dir", reference.to_str().unwrap()])
            .args(&flags)
            .args(EXTRA)
            .env("RAYON_NUM_THREADS", "1")
            .env("DIALORA_NO_BAR", "1")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let file = "adapter_model.safetensors";
        assert_eq!(
            std::fs::read(d.join(file)).unwrap(),
            std::fs::read(reference.join(file)).unwrap(),
            "{p}: the sweep's adapter differs from an uninterrupted run"
        );
    }
    // the report job ran after the array and lists every point
    let html = std::fs::read_to_string(sweep.join("report.html")).unwrap();
    for p in &points {
        assert!(html.contains(p.as_str()), "report lacks {p}");
    }
    assert_eq!(html.matches("class=\"status-completed\"").count(), 4);
}

/// The MPI trainer of `make mpi` (DIALORA_MPI_BIN names its directory).
fn mpi_bin_dir() -> PathBuf {
    let dir = std::env::var_os("DIALORA_MPI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::testing::repo_root().join("target/mpi/release"));
    assert!(
        dir.join("trainer").exists(),
        "{}/trainer is missing: build it with make mpi",
        dir.display()
    );
    dir
}

#[test]
#[ignore = "needs a Slurm cluster and the MPI trainer: make slurm-test"]
fn a_two_task_point_is_requeued_and_resumes_as_one_two_rank_run() {
    assert!(
        std::env::var_os("SLURM_CONF").is_some(),
        "SLURM_CONF is not set: run make slurm-test"
    );
    let mpi = mpi_bin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, 64, 2, 5).unwrap();
    let data = sample_shards(tmp.path(), 128, 0.15).unwrap();
    let runs = tmp.path().join("runs");
    let mut args: Vec<&str> = vec![
        "--name",
        "mpi",
        "--slurm",
        "--ntasks-per-point",
        "2",
        "--cpus-per-task",
        "1",
        "--mem",
        "1G",
        "--time",
        "00:20:00",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "learning_rate=1e-3",
        "--",
    ];
    args.extend(EXTRA);
    write_sweep(&args, &runs, &[("DIALORA_MPI_BIN", &mpi)]);
    let sweep = runs.join("mpi");
    let script = std::fs::read_to_string(sweep.join("sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --ntasks=2"), "{script}");
    assert!(script.contains("srun --mpi=pmix --ntasks=2"), "{script}");
    let job = slurm(
        "sbatch",
        &["--parsable", sweep.join("sweep.sbatch").to_str().unwrap()],
    );
    let task = format!("{job}_0");
    let dir = sweep.join("learning_rate=1e-3");
    let mut requeued = false;
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(480),
            "the 2-task job did not finish in 8 minutes: {:?}",
            queue()
        );
        let q = queue();
        release_requeued(&q);
        let running = q.iter().any(|(j, st, _)| j == &task && st == "RUNNING");
        if !requeued && running && has_checkpoint(&dir) {
            slurm("scontrol", &["requeue", &task]);
            requeued = true;
        }
        if requeued && completed(&dir) && q.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let log = std::fs::read_to_string(sweep.join(format!("logs/dialora-mpi-{job}_0.log"))).unwrap();
    assert!(log.contains("on 2 ranks"), "{log}");
    assert!(log.contains("trainer: interrupted at step"), "{log}");
    assert!(log.contains("(resuming at step"), "{log}");
    assert!(log.matches("attempt").count() >= 2, "{log}");
    let rec = common::train::run::RunRecord::load(&dir).unwrap();
    assert_eq!((rec.world_size, rec.threads), (2, 1));
    assert_eq!(steps_logged_once(&dir).last(), Some(&1600));
    // the adapter of an uninterrupted 2-rank run (mpirun), bit for bit
    let reference = tmp.path().join("ref");
    let st = Command::new("mpirun")
        .args(["-n", "2"])
        .arg(mpi.join("trainer"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--output-dir",
            reference.to_str().unwrap(),
            "--learning-rate",
            "1e-3",
        ])
        .args(EXTRA)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("DIALORA_NO_BAR", "1")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let file = "adapter_model.safetensors";
    assert_eq!(
        std::fs::read(dir.join(file)).unwrap(),
        std::fs::read(reference.join(file)).unwrap(),
        "the requeued 2-task run's adapter differs from an uninterrupted 2-rank run"
    );
}
