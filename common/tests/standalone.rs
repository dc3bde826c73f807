//! The repository stands alone: no source, script, test, Makefile or document uses a path
//! outside it (a user's clone has nothing beside it). Every file git tracks is read.

use common::testing::repo_root;
use std::path::{Path, PathBuf};

/// The files of the repository: what git tracks, or (outside a git checkout, e.g. an exported
/// tarball) every file except build outputs and downloads.
fn repo_files(root: &Path) -> Vec<PathBuf> {
    let git = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output();
    if let Some(o) = git
        .ok()
        .filter(|o| o.status.success() && !o.stdout.is_empty())
    {
        return o
            .stdout
            .split(|&b| b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| root.join(String::from_utf8_lossy(p).as_ref()))
            .collect();
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                if !["target", "models", "runs", ".git"].contains(&name.as_str()) {
                    stack.push(p);
                }
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn no_file_reaches_outside_the_repository() {
    let root = repo_root();
    let files = repo_files(&root);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    // the walk sees the repository (so the test cannot pass on an empty list)
    for must in [
        "README.md",
        "Makefile",
        "scripts/pipeline.sh",
        "common/src/lib.rs",
    ] {
        assert!(
            names.iter().any(|n| n == must),
            "{must} not found among {} files",
            names.len()
        );
    }
    // what a file beside the clone, or this development machine, would be reached by
    let outside = [
        format!("{}/{}", "..", "shared"),
        format!("{}{}", "/work", "/"),
        format!("{}{}", "/tmp/", "hfref"),
    ];
    let mut hits = Vec::new();
    for (p, n) in files.iter().zip(&names) {
        let Ok(text) = std::fs::read_to_string(p) else {
            continue; // binary (the screenshot)
        };
        for (i, line) in text.lines().enumerate() {
            if let Some(o) = outside.iter().find(|o| line.contains(o.as_str())) {
                hits.push(format!("{n}:{}: {o}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "paths outside the repository:\n{}",
        hits.join("\n")
    );
}

#[test]
fn the_oracle_fixture_and_its_script_are_in_the_repository() {
    let root = repo_root();
    let fixture = common::testing::reference_path();
    assert!(fixture.starts_with(&root), "{}", fixture.display());
    let r = common::testing::reference().unwrap();
    assert!(r["about"]
        .as_str()
        .unwrap()
        .contains("scripts/make-reference.py"));
    assert!(root.join("scripts/make-reference.py").exists());
}
