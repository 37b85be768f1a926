//! Exponential backoff with jitter that resets after a stable connection (as rathole does).

use std::time::Duration;

/// Reconnect delays: `initial`, doubling up to `max`, each with ±50 % jitter; a connection
/// that stayed up for `stable_after` resets the sequence.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    stable_after: Duration,
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(30),
        )
    }
}

impl Backoff {
    /// A fresh sequence.
    pub(crate) fn new(initial: Duration, max: Duration, stable_after: Duration) -> Self {
        Self {
            initial,
            max,
            stable_after,
            current: initial,
        }
    }

    /// The delay before the next attempt, given how long the last connection lasted
    /// (`None` when it never connected). `jitter` in [0, 1) comes from the caller.
    pub(crate) fn next_delay(&mut self, last_uptime: Option<Duration>, jitter: f64) -> Duration {
        if last_uptime.is_some_and(|up| up >= self.stable_after) {
            self.current = self.initial;
        }
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        base.mul_f64(0.5 + jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets_after_stable_uptime() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(10),
        );
        let seq: Vec<_> = (0..6).map(|_| b.next_delay(None, 0.5)).collect();
        assert_eq!(
            seq,
            [100, 200, 400, 800, 1000, 1000]
                .map(Duration::from_millis)
                .to_vec()
        );
        // A short-lived connection does not reset.
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(2)), 0.5),
            Duration::from_secs(1)
        );
        // A stable one does.
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(10)), 0.5),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(10),
        );
        assert_eq!(b.next_delay(None, 0.0), Duration::from_millis(50));
        assert_eq!(b.next_delay(None, 0.999_999).as_millis(), 299);
    }
}
