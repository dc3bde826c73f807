//! scripts/sweep.sh: the Slurm array maps every index to its grid point, with literal resources
//! and a frozen grid; a local 4-point sweep trains 4 runs and the report overlays 4 curves.
//! (The generated scripts on a real Slurm cluster: tests/slurm.rs, `make slurm-test`.)

use common::testing::{repo_root, write_tiny_model};
use std::process::Command;

fn sweep(runs: &std::path::Path, args: &[&str]) -> (i32, String) {
    let o = Command::new("bash")
        .arg(repo_root().join("scripts/sweep.sh"))
        .args(args)
        .env("RUNS", runs)
        .env(
            "DIALORA_BIN",
            std::path::Path::new(env!("CARGO_BIN_EXE_trainer"))
                .parent()
                .unwrap(),
        )
        .env("DIALORA_NO_BAR", "1")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn slurm_array_maps_each_index_to_its_grid_point() {
    let tmp = tempfile::tempdir().unwrap();
    // the sweep, with `grid` for the learning rates
    let generate = |grid: &str| {
        sweep(
            tmp.path(),
            &[
                "--name",
                "g",
                "--slurm",
                "--cpus-per-task",
                "4",
                "--mem",
                "6G",
                "--partition",
                "gpu",
                "--signal-seconds",
                "90",
                grid,
                "lora_r=8,64",
                "target_modules=q_proj,v_proj|all-linear",
                "--",
                "--max-steps",
                "7",
            ],
        )
    };
    let (code, log) = generate("learning_rate=2e-5,2e-4,1e-3");
    assert_eq!(code, 0, "{log}");
    let script = tmp.path().join("g/sweep.sbatch");
    for f in [&script, &tmp.path().join("g/report.sbatch")] {
        let st = Command::new("bash").arg("-n").arg(f).status().unwrap();
        assert!(st.success(), "bash -n {}", f.display());
    }
    let text = std::fs::read_to_string(&script).unwrap();
    // resources are literal values (Slurm expands no variables in #SBATCH lines), paths are
    // absolute, logs are appended across requeues, the trainer replaces the shell
    for want in [
        "#SBATCH --array=0-11",
        "#SBATCH --requeue",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=6G",
        "#SBATCH --partition=gpu",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:TERM@90",
        "\nexec \"${cmd[@]}\"",
    ] {
        assert!(text.contains(want), "want {want:?} in {text}");
    }
    for line in text.lines().filter(|l| l.starts_with("#SBATCH")) {
        assert!(!line.contains('$'), "{line}");
    }
    let out_line = text
        .lines()
        .find(|l| l.starts_with("#SBATCH --output="))
        .unwrap();
    assert!(
        out_line.starts_with(&format!(
            "#SBATCH --output={}/g/logs/",
            tmp.path().display()
        )),
        "{out_line}"
    );
    // the expected grid, enumerated independently (last key varies fastest)
    let mut want = Vec::new();
    for lr in ["2e-5", "2e-4", "1e-3"] {
        for r in ["8", "64"] {
            for t in ["q_proj,v_proj", "all-linear"] {
                want.push(format!(
                    "--learning-rate {lr} --lora-r {r} --target-modules {t} --run-name "
                ));
            }
        }
    }
    for (i, w) in want.iter().enumerate() {
        let o = Command::new("bash")
            .arg(&script)
            .env("SLURM_ARRAY_TASK_ID", i.to_string())
            .env("DIALORA_DRY_RUN", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cmd = String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        assert!(cmd.contains(w.as_str()), "index {i}: {cmd}\nwant ...{w}");
        assert!(
            cmd.ends_with("--resume-from-checkpoint auto --save-every-minutes 10 --max-steps 7"),
            "{cmd}"
        );
        assert!(
            cmd.starts_with(&repo_root().join("scripts/train.sh").display().to_string()),
            "{cmd}"
        );
    }
    // the grid is frozen: the same name with another grid is refused, the same grid is fine
    let (code, log) = generate("learning_rate=2e-5,2e-4");
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("already exists with another grid"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&script).unwrap(),
        text,
        "the queued script is untouched"
    );
    let (code, log) = generate("learning_rate=2e-5,2e-4,1e-3");
    assert_eq!(code, 0, "{log}");
    let o = Command::new("bash")
        .arg(&script)
        .env("SLURM_ARRAY_TASK_ID", "12")
        .env("DIALORA_DRY_RUN", "1")
        .output()
        .unwrap();
    assert!(!o.status.success(), "index past the grid is an error");
}

#[test]
fn local_four_point_sweep_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_tiny_model(&model, 32, 2, 4).unwrap();
    let args = [
        "--name",
        "s",
        "--model",
        model.to_str().unwrap(),
        "learning_rate=1e-3,1e-2",
        "lora_r=2,4",
        "--",
        "--max-steps",
        "3",
        "--logging-steps",
        "1",
        "--per-device-train-batch-size",
        "2",
    ];
    let (code, log) = sweep(tmp.path(), &args);
    assert_eq!(code, 0, "{log}");
    let html = std::fs::read_to_string(tmp.path().join("s/report.html")).unwrap();
    let loss = &html[html.find("id=\"chart-loss\"").unwrap()..];
    let loss = &loss[..loss.find("</svg>").unwrap()];
    for name in [
        "learning_rate=1e-3_lora_r=2",
        "learning_rate=1e-3_lora_r=4",
        "learning_rate=1e-2_lora_r=2",
        "learning_rate=1e-2_lora_r=4",
    ] {
        assert!(loss.contains(name), "legend of the loss chart lacks {name}");
        assert!(
            html.matches(&format!("<td>{name}</td>")).count() == 1,
            "table row for {name}"
        );
    }
    assert!(loss.matches("<polyline").count() >= 4, "4 curves");
    // a second call finds the points completed (each trainer says so and exits 0) and only
    // rebuilds the report
    let (code, log) = sweep(tmp.path(), &args);
    assert_eq!(code, 0, "{log}");
    assert_eq!(log.matches("already completed").count(), 4, "{log}");
    assert!(log.contains("4 points, 4 completed"), "{log}");
    // the same sweep with other trainer arguments would be another run: refused, not
    // reported as if its points had been trained so
    let (code, log) = sweep(tmp.path(), &args[..6]);
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("a completed run is not continued")
            && log.contains("--per-device-train-batch-size: run 2, now 8"),
        "{log}"
    );
}

/// With CARGO_TARGET_DIR set (absolute or relative to the repository) and no DIALORA_BIN, the
/// scripts and the Makefile look for the binaries where cargo put them (they looked in
/// target/release, and `make test` failed in such a shell).
#[test]
fn scripts_find_the_binaries_in_cargo_target_dir() {
    let root = repo_root();
    // with CARGO_TARGET_DIR elsewhere, the repository's own target/ may not exist yet
    std::fs::create_dir_all(root.join("target")).unwrap();
    let tmp = tempfile::Builder::new()
        .prefix(".test-target-")
        .tempdir_in(root.join("target"))
        .unwrap();
    let release = tmp.path().join("release");
    std::fs::create_dir_all(&release).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_trainer"), release.join("trainer")).unwrap();
    let relative = tmp.path().strip_prefix(&root).unwrap().to_path_buf();
    for target in [tmp.path().to_path_buf(), relative] {
        let o = Command::new("bash")
            .arg(root.join("scripts/train.sh"))
            .args(["m", "d", "o", "--help"])
            .env_remove("DIALORA_BIN")
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("--per-device-train-batch-size"),
            "{target:?}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let o = Command::new("make")
            .args(["-s", "-n", "model"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(&root)
            .output()
            .unwrap();
        let plan = String::from_utf8_lossy(&o.stdout);
        assert!(
            plan.contains(&format!("DIALORA_BIN={}/release", target.display())),
            "{plan}"
        );
    }
}
