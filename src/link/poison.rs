//! Which message a broker drops the connection for: pure state, no I/O.
//!
//! A message the bridge can check before sending (a topic over MQTT's 65 535 bytes after
//! mapping, a packet over the maximum an MQTT 5 broker announced) is set aside at once. One it
//! cannot check is found by what the broker does: an MQTT 3.1.1 broker announces no maximum
//! packet size (mosquitto's `max_packet_size`, a proxy's limit) and simply closes the
//! connection on a packet it refuses. Unfound, that message is sent again on every connection
//! and wedges the link: nothing behind it is ever delivered.
//!
//! So: a connection lost with several messages written and unacknowledged makes the link send
//! those messages again **carefully** (it cannot tell which of them the broker refused): one
//! in flight at first, one more for each acknowledged, so the window doubles per round trip
//! (TCP's slow start). One at a time throughout took a round trip per message: over a 100 ms
//! path a cut with thousands in flight held the link to 10 messages per second for minutes.
//! A culprit among them drops the connection again once the window reaches it, with it the
//! oldest then in flight; the window starts again at one, and it goes out alone. And
//! a connection lost with exactly one message written and unacknowledged is a *strike* against
//! that message; [`PoisonPolicy::strikes`] in a row and it is set aside (dead-lettered, see
//! `TargetQueue::set_aside`) instead of being sent again. Anything acknowledged in between
//! clears the suspicion. A broker that merely restarts a few times does not dead-letter
//! anything: it would have to drop the connection each time right after the same lone message
//! was written, and never acknowledge it.

/// The rules of the poison watch, with why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoisonPolicy {
    /// Connections lost in a row with the same message alone written and unacknowledged before
    /// it is set aside. 3: one loss can be anything (a broker restart, a network cut); three in
    /// a row right after the same lone message, with backoff between them, is that message.
    pub(crate) strikes: u32,
}

impl Default for PoisonPolicy {
    fn default() -> Self {
        Self { strikes: 3 }
    }
}

/// A link's watch for the message its broker refuses by closing the connection.
#[derive(Debug, Default)]
pub(crate) struct PoisonWatch {
    policy: PoisonPolicy,
    /// Messages still to send carefully: those a lost connection had written.
    careful: usize,
    /// The window while sending carefully: 1 after a loss, one more per acknowledgement.
    ramp: usize,
    /// The message (its id) that was alone in flight when connections were lost, and how many
    /// times in a row.
    suspect: Option<(u64, u32)>,
}

impl PoisonWatch {
    /// With its policy.
    pub(crate) fn new(policy: PoisonPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Whether it is watching anything (cheap: checked for every message).
    pub(crate) fn active(&self) -> bool {
        self.careful > 0 || self.suspect.is_some()
    }

    /// The in-flight window to use: the careful one (1 after a loss, growing with each
    /// acknowledgement) while sending carefully, `normal` otherwise.
    pub(crate) fn window(&self, normal: usize) -> usize {
        if self.careful > 0 {
            self.ramp.clamp(1, normal.max(1))
        } else {
            normal
        }
    }

    /// A connection that had its CONNACK was lost with `written`: the ids of the messages it
    /// had written and not seen acknowledged, oldest first.
    pub(crate) fn lost(&mut self, written: &[u64]) {
        if !written.is_empty() {
            self.ramp = 1;
        }
        match written {
            [] => {}
            [only] => {
                let strikes = match self.suspect {
                    Some((id, n)) if id == *only => n + 1,
                    _ => 1,
                };
                self.suspect = Some((*only, strikes));
                self.careful = self.careful.max(1);
            }
            several => {
                self.suspect = None;
                self.careful = self.careful.max(several.len());
            }
        }
    }

    /// Whether the message `id` is to be set aside rather than sent again.
    pub(crate) fn is_poison(&self, id: u64) -> bool {
        self.suspect
            .is_some_and(|(s, n)| s == id && n >= self.policy.strikes)
    }

    /// The message `id` is done with (acknowledged, refused, set aside): one fewer to send
    /// carefully, one more in the careful window, and no longer a suspect.
    pub(crate) fn done(&mut self, id: u64) {
        if self.careful > 0 {
            self.ramp += 1;
        }
        self.careful = self.careful.saturating_sub(1);
        if self.suspect.is_some_and(|(s, _)| s == id) {
            self.suspect = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_message_lost_with_three_connections_in_a_row_is_poison() {
        let mut w = PoisonWatch::new(PoisonPolicy::default());
        assert!(!w.active());
        assert_eq!(w.window(100), 100);
        w.lost(&[7]);
        assert!(w.active() && !w.is_poison(7));
        assert_eq!(w.window(100), 1, "sent alone until it is done with");
        w.lost(&[7]);
        assert!(!w.is_poison(7));
        w.lost(&[7]);
        assert!(w.is_poison(7) && !w.is_poison(8));
        w.done(7);
        assert!(!w.active(), "set aside: back to the full window");
        assert_eq!(w.window(100), 100);
    }

    #[test]
    fn several_in_flight_are_sent_again_carefully_to_find_the_culprit() {
        let mut w = PoisonWatch::new(PoisonPolicy::default());
        w.lost(&[1, 2, 3, 4]);
        assert_eq!(w.window(100), 1);
        // 1 goes through alone, then 2 with room for one more.
        w.done(1);
        assert_eq!(w.window(100), 2);
        w.done(2);
        assert_eq!(w.window(100), 3);
        // 3 and 4 in flight: 3 kills the connection; 3 is the oldest, and goes out alone.
        w.lost(&[3, 4]);
        assert_eq!(w.window(100), 1);
        // 3 kills the connection each time it is alone.
        for _ in 0..3 {
            w.lost(&[3]);
        }
        assert!(w.is_poison(3));
        w.done(3);
        assert!(w.active(), "4 was in flight too: still sent carefully");
        assert_eq!(w.window(100), 2);
        w.done(4);
        assert_eq!(w.window(100), 100);
        assert!(!w.active());
    }

    /// Thousands in flight on a long path when the connection was cut: sent again with a
    /// window that doubles per round trip, not one round trip per message.
    #[test]
    fn the_careful_window_grows_with_each_acknowledgement_up_to_the_normal_one() {
        let mut w = PoisonWatch::new(PoisonPolicy::default());
        let written: Vec<u64> = (0..4000).collect();
        w.lost(&written);
        let mut next = 0;
        let mut round_trips = 0;
        while w.active() {
            let window = w.window(8192);
            for id in next..(next + window as u64).min(4000) {
                w.done(id);
            }
            next = (next + window as u64).min(4000);
            round_trips += 1;
        }
        assert!(round_trips <= 12, "{round_trips} round trips");
        assert_eq!(w.window(8192), 8192);
        w.lost(&[1, 2]);
        assert_eq!(w.window(8192), 1, "a new loss starts it at one again");
        assert_eq!(w.window(0), 1, "never closed");
    }

    #[test]
    fn an_acknowledgement_or_another_message_in_between_clears_the_suspicion() {
        let mut w = PoisonWatch::new(PoisonPolicy::default());
        w.lost(&[5]);
        w.lost(&[5]);
        w.done(5);
        w.lost(&[5]);
        assert!(
            !w.is_poison(5),
            "acknowledged once: it is not what the broker refuses"
        );
        w.lost(&[5]);
        w.lost(&[6]);
        w.lost(&[5]);
        assert!(!w.is_poison(5), "not in a row");
        w.lost(&[]);
        assert!(
            !w.is_poison(5),
            "a loss with nothing in flight is no strike"
        );
        w.lost(&[5]);
        assert!(!w.is_poison(5));
        w.lost(&[5]);
        assert!(w.is_poison(5));
    }
}
