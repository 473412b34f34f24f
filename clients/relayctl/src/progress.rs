//! Progress of a broadcast on stderr: an indicatif bar when stderr is a terminal, otherwise a
//! plain line about every second (logs and pipes get no control characters).

use indicatif::{ProgressBar, ProgressStyle};
use relay_client::{CampaignStatus, ChunkAck};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the plain lines come.
const LINE_EVERY: Duration = Duration::from_secs(1);
/// The bar while sending.
const SENDING_BAR: &str = "{spinner} [{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} \
                           sent ({per_sec}, ETA {eta}) {msg}";
/// The bar while following delivery.
const DELIVERY_BAR: &str = "{spinner} [{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} \
                            delivered or ended {msg}";

/// Recipients of a broadcast so far, updated by the tasks that wait for chunk answers.
#[derive(Debug, Default)]
pub struct Tally {
    sent: AtomicU64,
    acked: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
}

/// A consistent-enough copy of a [`Tally`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Handed to the SDK.
    pub sent: u64,
    /// Acknowledged by the relay (durable there).
    pub acked: u64,
    /// Of those, taken on.
    pub accepted: u64,
    /// Of those, refused (bad address, unknown platform).
    pub rejected: u64,
}

impl Tally {
    pub fn sent(&self, recipients: usize) {
        self.sent.fetch_add(recipients as u64, Ordering::Relaxed);
    }

    pub fn acked(&self, recipients: usize, ack: &ChunkAck) {
        self.acked.fetch_add(recipients as u64, Ordering::Relaxed);
        self.accepted
            .fetch_add(u64::from(ack.accepted), Ordering::Relaxed);
        self.rejected
            .fetch_add(u64::from(ack.rejected), Ordering::Relaxed);
    }

    pub fn counts(&self) -> Counts {
        Counts {
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

enum Display {
    Bar(ProgressBar),
    Lines { last: Option<Instant> },
}

/// The progress display of one broadcast.
pub struct Progress {
    display: Display,
    total: u64,
    started: Instant,
    following: bool,
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(len).with_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

impl Progress {
    /// A display for `total` recipients (an estimate: the file's line count).
    pub fn new(total: u64) -> Self {
        let display = if std::io::stderr().is_terminal() {
            Display::Bar(bar(total, SENDING_BAR))
        } else {
            Display::Lines { last: None }
        };
        Self {
            display,
            total,
            started: Instant::now(),
            following: false,
        }
    }

    /// How often [`Self::sending`] is worth calling.
    pub fn tick(&self) -> Duration {
        match self.display {
            Display::Bar(_) => Duration::from_millis(100),
            Display::Lines { .. } => LINE_EVERY,
        }
    }

    fn line_due(&mut self, force: bool) -> bool {
        match &mut self.display {
            Display::Lines { last } => {
                let due = force || last.is_none_or(|at| at.elapsed() >= LINE_EVERY);
                if due {
                    *last = Some(Instant::now());
                }
                due
            }
            Display::Bar(_) => false,
        }
    }

    /// Shows the recipients sent and acknowledged; `force` prints a plain line even if one
    /// was printed less than a second ago (the last one).
    pub fn sending(&mut self, c: Counts, force: bool) {
        if let Display::Bar(bar) = &self.display {
            if c.sent > bar.length().unwrap_or(0) {
                bar.set_length(c.sent);
            }
            bar.set_position(c.sent);
            bar.set_message(format!(
                "acked {} (accepted {}, rejected {})",
                c.acked, c.accepted, c.rejected
            ));
            return;
        }
        if self.line_due(force) {
            eprintln!("{}", sending_line(c, self.total, self.started.elapsed()));
        }
    }

    /// Shows a campaign status while following its delivery (`broadcast --wait`).
    pub fn delivery(&mut self, status: &CampaignStatus) {
        let t = &status.total;
        if !self.following {
            self.following = true;
            if let Display::Bar(old) = &self.display {
                old.finish_and_clear();
                self.display = Display::Bar(bar(t.accepted, DELIVERY_BAR));
            }
        }
        if let Display::Bar(bar) = &self.display {
            bar.set_length(t.accepted);
            bar.set_position(t.delivered + t.expired + t.cancelled);
            bar.set_message(format!("({}, pending {})", status.state, t.pending));
            return;
        }
        if self.line_due(false) {
            eprintln!("{}", delivery_line(status));
        }
    }

    /// Removes the bar, so that what follows prints cleanly.
    pub fn finish(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
        }
    }
}

fn sending_line(c: Counts, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        c.sent as f64 / secs
    } else {
        0.0
    };
    let mut line = format!("sent {}", c.sent);
    if total > 0 {
        let pct = (c.sent as f64 / total as f64 * 100.0).min(100.0);
        line.push_str(&format!("/{total} recipients ({pct:.0}%)"));
    } else {
        line.push_str(" recipients");
    }
    line.push_str(&format!(
        ", acked {} (accepted {}, rejected {}), {rate:.0}/s",
        c.acked, c.accepted, c.rejected
    ));
    if rate > 0.0 && total > c.sent {
        let eta = (total - c.sent) as f64 / rate;
        line.push_str(&format!(", ETA {eta:.0}s"));
    }
    line
}

fn delivery_line(s: &CampaignStatus) -> String {
    let t = &s.total;
    format!(
        "{}: delivered {}, pending {}, expired {}, cancelled {} of {} accepted ({} rejected)",
        s.state, t.delivered, t.pending, t.expired, t.cancelled, t.accepted, t.rejected
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_templates_parse() {
        for template in [SENDING_BAR, DELIVERY_BAR] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }

    #[test]
    fn plain_lines() {
        let c = Counts {
            sent: 500,
            acked: 400,
            accepted: 390,
            rejected: 10,
        };
        assert_eq!(
            sending_line(c, 1000, Duration::from_secs(2)),
            "sent 500/1000 recipients (50%), acked 400 (accepted 390, rejected 10), 250/s, ETA 2s"
        );
        assert_eq!(
            sending_line(c, 0, Duration::ZERO),
            "sent 500 recipients, acked 400 (accepted 390, rejected 10), 0/s"
        );
        let t = Tally::default();
        t.sent(3);
        t.acked(
            3,
            &ChunkAck {
                seq: 1,
                accepted: 2,
                rejected: 1,
                duplicate: false,
            },
        );
        assert_eq!(
            t.counts(),
            Counts {
                sent: 3,
                acked: 3,
                accepted: 2,
                rejected: 1
            }
        );
    }
}
