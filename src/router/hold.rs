//! The intake hold (issue 28, docs/FLOW.md step 2): when a target's memory queue is full, its
//! origins stop reading for a while instead of its queue spilling to the spool at once.
//!
//! A full queue used to move everything waiting to the target's spool, and what came after
//! followed it there until the target caught up: every message of a burst then cost a disk
//! write, a read and (with parking) a copy on its origin broker. A burst that the target would
//! have taken a moment later went that way too, e.g. while a link held back by its broker's
//! Receive Maximum opens more connections. Now a full queue first *holds*: the message is
//! taken (up to a quarter of the capacity more), the queue counts itself as over capacity, and
//! the links whose brokers may be held stop reading them (see `Link::intake_held`) until it is
//! back under its capacity. The hold ends in a spill as before when it lasts [`HOLD_MAX`], or
//! the queue reaches its slack; and after a spill a queue does not hold for [`QUIET`], so that
//! a target that stays slower than its origins does not stop them again and again.
//!
//! Only an origin that sends more than the bridge's Receive Maximum unacknowledged (Debian's
//! mosquitto 2.0.11, which keeps to no window) is held: it does not queue what it cannot send,
//! so holding it loses nothing. A broker that keeps to the window would queue its publishers'
//! messages meanwhile and drop them past its `max_queued_messages`: its messages spill, as
//! before.

use std::time::{Duration, Instant};

/// The longest hold: then the queue spills. Below the stall check's 2 s (`Policy`): a held
/// link does not read its own broker's acknowledgements meanwhile.
pub(super) const HOLD_MAX: Duration = Duration::from_secs(1);

/// No hold for this long after a spill.
pub(super) const QUIET: Duration = Duration::from_secs(10);

/// A queue's hold (pure state, clock passed in).
#[derive(Debug, Default)]
pub(super) struct Hold {
    /// Over capacity since.
    since: Option<Instant>,
    /// The last spill.
    spilled: Option<Instant>,
}

impl Hold {
    /// The queue holds `len` messages of `capacity` and one more arrives at `now`: whether it
    /// waits in memory (the origins held) rather than the queue spilling.
    pub(super) fn admit(&mut self, len: usize, capacity: usize, now: Instant) -> bool {
        if self
            .spilled
            .is_some_and(|t| now.saturating_duration_since(t) < QUIET)
        {
            return false;
        }
        let since = *self.since.get_or_insert(now);
        len < capacity + (capacity / 4).max(1) && now.saturating_duration_since(since) < HOLD_MAX
    }

    /// Whether a hold is on (the queue over its capacity).
    pub(super) fn on(&self) -> bool {
        self.since.is_some()
    }

    /// Whether the hold has lasted [`HOLD_MAX`] at `now`: the queue spills. (With every origin
    /// held nothing more arrives to find out at [`Hold::admit`]: its link asks.)
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.since
            .is_some_and(|t| now.saturating_duration_since(t) >= HOLD_MAX)
    }

    /// The queue is back under its capacity: the hold ends. True if one was on.
    pub(super) fn end(&mut self) -> bool {
        self.since.take().is_some()
    }

    /// The queue spilled at `now`: the hold ends, and none for [`QUIET`]. True if one was on.
    pub(super) fn spilled(&mut self, now: Instant) -> bool {
        self.spilled = Some(now);
        self.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_holds_up_to_its_slack_and_for_a_while_then_spills_and_rests() {
        let mut h = Hold::default();
        let t = Instant::now();
        assert!(!h.on());
        assert!(h.admit(100, 100, t), "full: held");
        assert!(h.on());
        assert!(h.admit(124, 100, t + HOLD_MAX / 2), "within a quarter more");
        assert!(!h.expired(t + HOLD_MAX / 2));
        assert!(h.expired(t + HOLD_MAX), "its link spills it");
        assert!(!h.admit(125, 100, t + HOLD_MAX / 2), "the slack is full");
        assert!(!h.admit(100, 100, t + HOLD_MAX), "held long enough");
        assert!(h.end(), "back under capacity");
        assert!(!h.on());
        assert!(
            h.admit(100, 100, t + HOLD_MAX),
            "a new hold starts its own clock"
        );
        let spill = t + 3 * HOLD_MAX;
        assert!(h.spilled(spill));
        assert!(
            !h.admit(100, 100, spill + QUIET / 2),
            "resting after a spill"
        );
        assert!(!h.on());
        assert!(h.admit(100, 100, spill + QUIET), "then it holds again");
    }
}
