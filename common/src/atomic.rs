//! Atomic outputs, one way for every stage: a file or a directory is built under a temporary
//! name next to its target (same filesystem) and renamed into place when it is complete, so
//! whatever exists under a final name is whole. The temporary is removed when the work fails or
//! panics (tempfile's drop guards), and nothing replaces an input or an earlier result unless
//! the caller asked for it.
//!
//! safetensors files are written by `safetensors::serialize_to_file`, which is itself atomic in
//! this way (`weights::save`); everything else goes through here.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory a target lives in (`.` for a bare name), created if missing.
fn parent_of(target: &Path) -> Result<PathBuf> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    Ok(parent)
}

fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    format!(".{name}.partial-")
}

/// Gives a finished output the usual permissions (the temporaries are private: 0600/0700).
pub(crate) fn set_mode(path: &Path, dir: bool) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if dir { 0o755 } else { 0o644 };
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = (path, dir);
}

/// A file output under construction: written under a temporary name next to `target`, which
/// `commit` renames into place. Dropped without `commit`, it is removed.
pub struct AtomicFile {
    tmp: std::io::BufWriter<tempfile::NamedTempFile>,
    target: PathBuf,
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<Self> {
        let parent = parent_of(target)?;
        let tmp = tempfile::Builder::new()
            .prefix(&temp_prefix(target))
            .tempfile_in(&parent)
            .with_context(|| format!("{}: cannot create a temporary file", parent.display()))?;
        Ok(AtomicFile {
            tmp: std::io::BufWriter::new(tmp),
            target: target.to_path_buf(),
        })
    }

    /// Flushes the file and renames it into place (replacing an existing file).
    pub fn commit(self) -> Result<()> {
        let target = self.target;
        let tmp = self
            .tmp
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|t| t.as_file().sync_data().map(|_| t))
            .with_context(|| format!("{}: cannot write", target.display()))?;
        set_mode(tmp.path(), false);
        tmp.persist(&target)
            .map_err(|e| e.error)
            .with_context(|| format!("{}: cannot rename into place", target.display()))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tmp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tmp.flush()
    }
}

/// Writes `contents` to `path` atomically (replacing an existing file).
pub fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(contents)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    f.commit()
}

/// Writes `value` as pretty JSON with a final newline, atomically.
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_file(path, s.as_bytes())
}

/// Checks that directory `out` may be written: absent, empty, or `overwrite` is set.
pub fn check_output_dir(out: &Path, overwrite: bool) -> Result<()> {
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

/// Absolute form of `p` with its longest existing prefix canonicalised (symlinks resolved).
fn absolute(p: &Path) -> PathBuf {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
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
}

/// Refuses `out` when it is `input`, lies inside it, or contains it (replacing `out` would then
/// destroy the input). `what` names the input in the message.
pub fn refuse_inside(out: &Path, input: &Path, what: &str) -> Result<()> {
    let (o, i) = (absolute(out), absolute(input));
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

/// A directory output under construction: a temporary sibling of the target that `commit`
/// renames into place. Dropped without `commit` (an error, a panic), it is removed.
pub struct OutputDir {
    tmp: tempfile::TempDir,
    target: PathBuf,
}

impl OutputDir {
    /// Starts building `target` (the caller has vetted it with `check_output_dir`).
    pub fn create(target: &Path) -> Result<Self> {
        let parent = parent_of(target)?;
        let tmp = tempfile::Builder::new()
            .prefix(&temp_prefix(target))
            .tempdir_in(&parent)
            .with_context(|| {
                format!("{}: cannot create a temporary directory", parent.display())
            })?;
        Ok(OutputDir {
            tmp,
            target: target.to_path_buf(),
        })
    }

    /// Where to write the directory's files.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Moves the finished directory into place, replacing an existing `target`.
    pub fn commit(self) -> Result<PathBuf> {
        let OutputDir { tmp, target } = self;
        let built = tmp.keep();
        set_mode(&built, true);
        let aside = if target.exists() {
            let parent = parent_of(&target)?;
            let aside = tempfile::Builder::new()
                .prefix(&format!("{}old-", temp_prefix(&target)))
                .tempdir_in(&parent)?
                .keep();
            // a directory can only be renamed over an empty one
            std::fs::remove_dir(&aside).ok();
            std::fs::rename(&target, &aside)
                .with_context(|| format!("{}: cannot move aside", target.display()))?;
            Some(aside)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&built, &target) {
            if let Some(a) = &aside {
                std::fs::rename(a, &target).ok();
            }
            std::fs::remove_dir_all(&built).ok();
            return Err(e)
                .with_context(|| format!("{}: cannot rename into place", target.display()));
        }
        if let Some(a) = aside {
            std::fs::remove_dir_all(&a).ok();
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn files_replace_atomically_and_leave_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_json(&p, &serde_json::json!({"x": 1})).unwrap();
        write_file(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(names(d.path()), ["a.json"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644);
        }
        // a file whose directory cannot be written: an error naming it, the old file intact
        let e = write_file(&d.path().join("a.json/inner"), b"x").unwrap_err();
        assert!(format!("{e:#}").contains("a.json"), "{e:#}");
    }

    #[test]
    fn directories_commit_or_vanish() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out");
        // failure: the temporary goes away with the guard
        {
            let o = OutputDir::create(&target).unwrap();
            std::fs::write(o.path().join("f"), b"1").unwrap();
        }
        assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
        let o = OutputDir::create(&target).unwrap();
        std::fs::write(o.path().join("f"), b"1").unwrap();
        o.commit().unwrap();
        assert_eq!(names(&target), ["f"]);
        // replacing an existing directory
        let o = OutputDir::create(&target).unwrap();
        std::fs::write(o.path().join("g"), b"2").unwrap();
        o.commit().unwrap();
        assert_eq!(names(&target), ["g"]);
        assert_eq!(names(d.path()), ["out"]);
        assert!(check_output_dir(&target, false)
            .unwrap_err()
            .to_string()
            .contains("--overwrite"));
        check_output_dir(&target, true).unwrap();
    }

    #[test]
    fn outputs_inside_or_around_inputs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let input = d.path().join("in");
        std::fs::create_dir(&input).unwrap();
        assert!(refuse_inside(&input, &input, "base").is_err());
        assert!(refuse_inside(&input.join("x"), &input, "base").is_err());
        let e = refuse_inside(d.path(), &input, "base")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must not contain the base"), "{e}");
        refuse_inside(&d.path().join("other"), &input, "base").unwrap();
    }
}
