//! The backlog's pace (`[[broker]] drain_rate`): while a broker has messages waiting in the
//! spool, at most so many per second are published to it. Pure: the link passes the clock.
//!
//! Without it a backlog goes out as fast as the broker acknowledges it (the in-flight window
//! keeps the broker itself from being sent more than it takes). That can still be too fast for
//! what is behind the broker: a broker back from an outage queues the whole backlog for its
//! subscribers, and mosquitto drops what a slow subscriber's queue cannot hold
//! (`max_queued_messages`, default 1000). With `drain_rate` the backlog reaches them at that
//! rate. Messages for the broker that arrive meanwhile wait behind the backlog (their order
//! holds), so the rate must be above the broker's live traffic for the backlog ever to end.

use std::time::{Duration, Instant};

/// How much unused rate is kept: a tenth of a second's worth (at least one message), so a
/// link that wakes every 20 ms sends a few messages at a time and never a burst.
const BURST: Duration = Duration::from_millis(100);

/// A token bucket of `rate` messages per second.
#[derive(Debug, Clone)]
pub(crate) struct DrainPace {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl DrainPace {
    /// `rate` messages per second (at least 1), from `now`.
    pub(crate) fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = (rate * BURST.as_secs_f64()).max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// How many messages may go out at `now`.
    pub(crate) fn allowed(&mut self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        self.tokens.max(0.0) as usize
    }

    /// `n` messages went out.
    pub(crate) fn spent(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_goes_out_at_the_rate_and_never_in_a_burst() {
        let start = Instant::now();
        let mut pace = DrainPace::new(1000, start);
        // A link that takes all it may every 20 ms, for 10 s.
        let mut sent = 0;
        let mut largest = 0;
        let mut now = start;
        while now < start + Duration::from_secs(10) {
            let n = pace.allowed(now);
            pace.spent(n);
            sent += n;
            largest = largest.max(n);
            now += Duration::from_millis(20);
        }
        assert!(
            (9_900..=10_100).contains(&sent),
            "{sent} in 10 s at 1 000/s"
        );
        assert!(
            largest <= 100,
            "at most a tenth of a second's worth at once: {largest}"
        );
    }

    #[test]
    fn an_idle_while_saves_no_more_than_the_burst() {
        let start = Instant::now();
        let mut pace = DrainPace::new(50, start);
        assert_eq!(pace.allowed(start + Duration::from_secs(60)), 5);
        // A slow rate still lets one message through.
        let mut slow = DrainPace::new(1, start);
        assert_eq!(slow.allowed(start), 1);
        slow.spent(1);
        assert_eq!(slow.allowed(start + Duration::from_millis(500)), 0);
        assert_eq!(slow.allowed(start + Duration::from_millis(1000)), 1);
    }
}
