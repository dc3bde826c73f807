//! Progress reporting: a bar on a terminal, plain log lines (about every 10%) otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    total: u64,
    done: u64,
    next_log: u64,
}

impl Progress {
    pub fn new(total: u64, what: &str) -> Self {
        let bar = if std::io::stderr().is_terminal() && std::env::var_os("DIALORA_NO_BAR").is_none()
        {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            b.set_message(what.to_string());
            Some(b)
        } else {
            None
        };
        Progress {
            bar,
            what: what.into(),
            total,
            done: 0,
            next_log: (total / 10).max(1),
        }
    }

    /// Advances by `n`; `msg` is shown on the bar or appended to the log line.
    pub fn inc(&mut self, n: u64, msg: &str) {
        self.done += n;
        match &self.bar {
            Some(b) => {
                b.inc(n);
                if !msg.is_empty() {
                    b.set_message(format!("{} {msg}", self.what));
                }
            }
            None => {
                if self.done >= self.next_log || self.done == self.total {
                    eprintln!("{}: {}/{} {msg}", self.what, self.done, self.total);
                    self.next_log = self.done + (self.total / 10).max(1);
                }
            }
        }
    }

    /// A line that does not break the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
