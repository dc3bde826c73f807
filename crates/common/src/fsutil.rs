//! Output-directory discipline shared by every stage: never clobber an input or an earlier
//! result unless asked, build in a temporary sibling, rename into place at the end.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Checks that `out` may be written: absent, an empty directory, or `overwrite` is set.
pub fn prepare_output_dir(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!(
                "{}: output path exists and is not a directory",
                out.display()
            );
        }
        let non_empty = std::fs::read_dir(out)
            .with_context(|| format!("{}: cannot read", out.display()))?
            .next()
            .is_some();
        if non_empty && !overwrite {
            bail!(
                "{}: output directory exists and is not empty (use --overwrite to replace it)",
                out.display()
            );
        }
    }
    Ok(())
}

/// A fresh temporary directory next to `out` (same filesystem, so the final rename is atomic).
pub fn temp_sibling(out: &Path) -> Result<PathBuf> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    Ok(tmp)
}

/// Moves a finished temporary directory into place, replacing `out` (already vetted by
/// `prepare_output_dir`).
pub fn commit_dir(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        let old = tmp.with_extension("old");
        std::fs::rename(out, &old)
            .with_context(|| format!("{}: cannot move aside", out.display()))?;
        std::fs::rename(tmp, out)
            .with_context(|| format!("{}: cannot rename into place", out.display()))?;
        std::fs::remove_dir_all(&old).ok();
    } else {
        std::fs::rename(tmp, out)
            .with_context(|| format!("{}: cannot rename into place", out.display()))?;
    }
    Ok(())
}

/// Refuses `out` when it is `input`, lies inside it, or contains it (replacing `out` would then
/// destroy the input).
pub fn refuse_inside(out: &Path, input: &Path, what: &str) -> Result<()> {
    let abs = |p: &Path| -> PathBuf {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        // canonicalize the longest existing prefix
        let mut existing = p.clone();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (
                existing.file_name().map(|s| s.to_os_string()),
                existing.parent(),
            ) {
                (Some(n), Some(parent)) => {
                    rest.push(n);
                    existing = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut c = existing.canonicalize().unwrap_or(existing);
        for n in rest.into_iter().rev() {
            c.push(n);
        }
        c
    };
    let (o, i) = (abs(out), abs(input));
    if o == i || o.starts_with(&i) {
        bail!(
            "{}: output must not be the {what} or inside it ({})",
            out.display(),
            input.display()
        );
    }
    if i.starts_with(&o) {
        bail!(
            "{}: output must not contain the {what} ({}): replacing it would destroy the {what}",
            out.display(),
            input.display()
        );
    }
    Ok(())
}
