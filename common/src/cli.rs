//! What every binary does around its work: results on stdout, progress and logs on stderr, an
//! error as one line (`NAME: error: ...`) with a non-zero exit status, and a reader that goes
//! away (`infer ... | head`) ending the program quietly with status 0.

use anyhow::{Context, Result};
use std::io::Write;

/// Exit statuses, all below 128 so job systems report them as they are.
pub mod exit {
    /// The work is done.
    pub const OK: i32 = 0;
    /// Any error not listed below.
    pub const ERROR: i32 = 1;
    /// Bad command-line arguments or configuration (clap's own status).
    pub const USAGE: i32 = 2;
    /// Training stopped on non-finite losses or gradients: retrying will not help.
    pub const DIVERGED: i32 = 65;
    /// Stopped by a signal after saving a checkpoint: run again to resume (EX_TEMPFAIL).
    pub const INTERRUPTED: i32 = 75;
}

/// A bad argument or configuration, found after parsing: `finish` exits with `exit::USAGE`
/// for it, as for clap's own errors.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// An error for a bad argument (exit status 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(message.into()))
}

/// Whether an error is (or was caused by) a bad argument.
pub fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Usage>())
}

/// An error as the one line a user sees: its chain joined by ": ", without the backtrace that
/// candle's errors carry in their text when RUST_BACKTRACE is set.
pub fn error_line(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let mut kept = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        let frame = t
            .split_once(": ")
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok());
        if frame && t.starts_with("0: ") {
            break;
        }
        kept.push(line.trim_end());
    }
    kept.join(" ").trim_end().to_string()
}

/// Whether an error is a write to a closed pipe or socket.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes a line of results to stdout (an error, not a panic, when stdout is closed).
pub fn say(line: impl std::fmt::Display) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .context("writing to stdout")
}

/// Writes text to stdout as it comes (streamed replies), flushing it.
pub fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .context("writing to stdout")
}

/// Ends the program with the outcome of `main`'s work: the status it returned; for an error,
/// one line on stderr (never a backtrace, whatever RUST_BACKTRACE says) and `exit::ERROR`,
/// `exit::USAGE` for a bad argument (`usage`), or status 0 when the error is a reader that
/// went away.
pub fn finish(name: &str, outcome: Result<i32>) -> ! {
    let code = match outcome {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => exit::OK,
        Err(e) => {
            // another rank of a training run that failed has said why: this one only exits
            if e.downcast_ref::<crate::train::comm::OtherRankFailed>()
                .is_none()
            {
                eprintln!("{name}: error: {}", error_line(&e));
            }
            exit_code(&e)
        }
    };
    std::process::exit(code)
}

/// The exit status `finish` gives an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if let Some(o) = e.downcast_ref::<crate::train::comm::OtherRankFailed>() {
        o.code
    } else if is_usage(e) {
        exit::USAGE
    } else {
        exit::ERROR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_facing_errors_are_one_line_without_a_backtrace() {
        let inner = anyhow::anyhow!(
            "tensor needs 69120 bytes\n   0: candle_core::error::Error::bt\n   1: main\n             at ./x.rs:1:2"
        );
        let e = inner.context("/tmp/t.gguf");
        assert_eq!(error_line(&e), "/tmp/t.gguf: tensor needs 69120 bytes");
        assert!(is_usage(&usage("bad")) && !is_usage(&e));
    }

    #[test]
    fn broken_pipes_are_recognised_through_context() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "closed");
        let e = anyhow::Error::new(io).context("writing to stdout");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
