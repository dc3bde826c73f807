//! Progress of long work, for every binary: a bar on a terminal (stderr), plain log lines
//! otherwise (at most one per 10% of the work, and none for work that ends within a couple of
//! seconds). `DIALORA_NO_BAR=1` forces the plain lines.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Work shorter than this logs no progress lines off a terminal.
const QUIET_FOR: Duration = Duration::from_secs(2);

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    total: u64,
    done: u64,
    start: Instant,
    next_log: u64,
}

/// Whether progress goes to a terminal as a bar.
pub fn bar_wanted() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("DIALORA_NO_BAR").is_none()
}

/// A duration as an ETA: `45s`, `3m05s`, `1h02m`.
pub fn eta(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

impl Progress {
    /// Progress over `total` units of work named `what` (the bar's prefix, the log lines' start).
    pub fn new(total: u64, what: &str) -> Self {
        let bar = bar_wanted().then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(what.to_string());
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        Progress {
            bar,
            what: what.into(),
            total,
            done: 0,
            start: Instant::now(),
            next_log: (total / 10).max(1),
        }
    }

    /// The text after the bar (what is happening now, the ETA).
    pub fn set_message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        }
    }

    /// Sets the total (work whose size is known only once it has started).
    pub fn set_length(&mut self, total: u64) {
        self.total = total;
        self.next_log = self.done + (total / 10).max(1);
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }

    /// Moves to `pos` units done (no log line).
    pub fn set_position(&mut self, pos: u64) {
        self.done = pos;
        self.next_log = pos + (self.total / 10).max(1);
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }

    /// Advances by `n`. Off a terminal, a line every 10% once the work has lasted a while.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(b) => b.inc(n),
            None => {
                if self.done >= self.next_log && self.done < self.total {
                    self.next_log = self.done + (self.total / 10).max(1);
                    if self.start.elapsed() >= QUIET_FOR {
                        eprintln!("{}: {}/{}", self.what, self.done, self.total);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_reads_as_minutes_and_hours() {
        assert_eq!(eta(Duration::from_secs(45)), "45s");
        assert_eq!(eta(Duration::from_secs(185)), "3m05s");
        assert_eq!(eta(Duration::from_secs(3720)), "1h02m");
    }
}
