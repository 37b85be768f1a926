//! Rate limits for log lines: an event that can repeat thousands of times a second (a refused
//! admin request, a message a broker rejects) is logged at most once per interval per key,
//! with the number of repeats it stood for. Pure: the caller passes the clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most keys one [`LogLimit`] tracks; beyond, the oldest interval's keys are forgotten (a key
/// forgotten early only means one more log line).
const MAX_KEYS: usize = 256;

/// At most one log line per key and interval.
#[derive(Debug)]
pub(crate) struct LogLimit {
    every: Duration,
    /// Per key: when the next line may be written, and the events not logged since the last.
    keys: HashMap<String, (Instant, u64)>,
}

impl LogLimit {
    /// One line per key every `every`.
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            keys: HashMap::new(),
        }
    }

    /// Records an event of `key` at `now`: `Some(n)` when it is to be logged, `n` being the
    /// events of that key not logged since the last line; `None` when it is only counted.
    pub(crate) fn event(&mut self, key: &str, now: Instant) -> Option<u64> {
        if let Some((next, suppressed)) = self.keys.get_mut(key) {
            if now < *next {
                *suppressed += 1;
                return None;
            }
            let n = *suppressed;
            *next = now + self.every;
            *suppressed = 0;
            return Some(n);
        }
        if self.keys.len() >= MAX_KEYS {
            self.keys.retain(|_, (next, _)| *next > now);
            if self.keys.len() >= MAX_KEYS {
                self.keys.clear();
            }
        }
        self.keys.insert(key.to_string(), (now + self.every, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_and_interval_with_the_count_it_stands_for() {
        let mut limit = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.event("a", t0), Some(0));
        for i in 1..100 {
            assert_eq!(limit.event("a", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(limit.event("b", t0), Some(0), "keys are independent");
        assert_eq!(limit.event("a", t0 + Duration::from_secs(10)), Some(99));
        assert_eq!(limit.event("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.event("a", t0 + Duration::from_secs(20)), Some(1));
    }

    #[test]
    fn keys_are_bounded() {
        let mut limit = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..10 * MAX_KEYS {
            assert_eq!(limit.event(&i.to_string(), t0), Some(0));
            assert!(limit.keys.len() <= MAX_KEYS);
        }
    }
}
