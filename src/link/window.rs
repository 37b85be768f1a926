//! How many messages a link keeps in flight to its broker: a window that follows the path's
//! bandwidth-delay product. Pure state, fed by the link with one timed message per round trip.
//!
//! A fixed window caps a link at `window / RTT`: 100 messages over a 100 ms round trip is 1 000
//! messages per second however fast the path is, while on loopback 100 is plenty. So the link
//! measures instead: it times one message at a time from the write to its acknowledgement (the
//! round trip) and counts the acknowledgements that came meanwhile (the delivery rate). The
//! window is twice the largest recent rate times the smallest recent round trip (the
//! bandwidth-delay product, as BBR estimates it), never below the configured floor nor above the
//! cap (the broker's Receive Maximum, the memory budget):
//! - while the window limits the link and the round trip stays at its minimum, each sample
//!   multiplies it (the rate is the window over the round trip): by four while the rate still
//!   grows by a quarter per round trip (a 100 ms path at 40 000 msg/s opens in three round
//!   trips, before the backlog it gathers meanwhile fills the target's queue), by two after;
//! - once the broker or the path is the bottleneck, messages queue, the round trip grows, and
//!   the product stops growing: at most about one product waits in queues;
//! - on loopback the product is a few messages: the floor applies, as before.
//!
//! On a long path (a round trip of [`LONG_PATH`] or more) the window starts at the cap and
//! stays there until the path is found full (BBR's startup, without a pacing rate): opened
//! from the samples alone it grew about 1.8 times per round trip at 100 ms (each sample sees
//! the round trip the larger flight inflates), and a burst of 20 000 was over before the window
//! had opened. A sample taken while the window was not full measured what the link had to send,
//! not what the path takes: it never ends the start. A connection that went idle starts again
//! at its next burst.
//!
//! A window held below the product by the broker's Receive Maximum on what looks like a long
//! path is checked once per connection before the link acts on it ([`Window::starved`]): the
//! window empties and carries one message alone, whose round trip has nothing queued ahead of
//! it (BBR's round-trip probe). A full window's round trip on a busy broker or machine looks
//! as long as a long path's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples the largest rate is taken over (about as many round trips).
const RATE_SAMPLES: usize = 10;

/// Samples in a row whose rate grew by less than a quarter after which the path is taken for
/// full and the window stops growing fast (BBR's "full pipe" test).
const FULL_AFTER: u32 = 3;

/// A round trip from which a window held down by the broker is worth a warning: below it, even
/// mosquitto's default Receive Maximum of 20 carries thousands of messages per second.
const LONG_PATH: Duration = Duration::from_millis(5);

/// A timed message not acknowledged within this is given up (a broker that dropped it): the
/// next one written is timed instead.
const GIVE_UP: Duration = Duration::from_secs(10);

/// The in-flight window of one connection (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct Window {
    floor: usize,
    cap: usize,
    size: usize,
    /// The message being timed.
    timing: Option<Timed>,
    /// Acknowledgements so far.
    acked: u64,
    /// The smallest round trip seen on this connection.
    min_rtt: Option<Duration>,
    /// Recent delivery rates (acknowledgements per second), newest last.
    rates: VecDeque<f64>,
    /// Still finding the path's rate: the window grows four times per round trip instead of
    /// twice, so that a long fast path opens before the backlog it gathers overflows the queue.
    startup: bool,
    /// Samples in a row without a quarter more rate (see [`FULL_AFTER`]).
    flat: u32,
    /// The window the path asked for at the last sample, before the floor and the cap.
    wanted: usize,
    /// The cap is the broker's Receive Maximum (below `inflight_max`).
    broker_capped: bool,
    /// The round trip was measured with a message written alone (see [`Window::starved`]).
    path_checked: bool,
    /// Measuring it: the window is 1 until a message written alone comes back.
    probing: bool,
}

/// A message being timed.
#[derive(Debug, Clone, Copy)]
struct Timed {
    pkid: u16,
    /// When it was written.
    at: Instant,
    /// The acknowledgements counted then.
    acked_then: u64,
    /// It filled the window (a sample of a window that was not full measured what the link
    /// had to send, not what the path takes).
    full: bool,
    /// Nothing else was in flight: its round trip is the path's, with nothing queued ahead.
    alone: bool,
}

impl Window {
    /// A window of at least `floor` and at most `cap` messages (`cap` below `floor`: `floor`,
    /// fixed), starting at `floor`.
    pub(crate) fn new(floor: usize, cap: usize) -> Self {
        let floor = floor.max(1);
        Self {
            floor,
            cap: cap.max(floor),
            size: floor,
            timing: None,
            acked: 0,
            min_rtt: None,
            rates: VecDeque::with_capacity(RATE_SAMPLES),
            startup: true,
            flat: 0,
            wanted: 0,
            broker_capped: false,
            path_checked: false,
            probing: false,
        }
    }

    /// The window now.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// The broker announced a Receive Maximum of `max`: the cap comes down to it (never up).
    pub(crate) fn cap_at(&mut self, max: usize) {
        let max = max.max(1);
        if max < self.cap {
            self.cap = max;
            self.broker_capped = true;
        }
        self.floor = self.floor.min(self.cap);
        self.size = self.size.clamp(self.floor, self.cap);
    }

    /// When the broker's Receive Maximum holds the window below what a long path wants: that
    /// maximum and the path's round trip. (Then the link carries at most `max / round trip`.)
    /// Only once a message written alone confirmed the round trip: a full window's samples
    /// cannot tell a long path from a short one with messages queued ahead (a busy broker, a
    /// busy machine: on loopback during a drain of 50 000 messages every acknowledgement took
    /// 6 ms, and the link opened extra connections it had no use for).
    pub(crate) fn starved(&self) -> Option<(usize, Duration)> {
        (self.path_checked && self.held_by_broker()).then_some((self.cap, self.min_rtt?))
    }

    /// The broker's Receive Maximum holds the window below the product on what the samples
    /// show as a long path.
    fn held_by_broker(&self) -> bool {
        self.broker_capped
            && self.wanted > self.cap
            && self.min_rtt.is_some_and(|rtt| rtt >= LONG_PATH)
    }

    /// A QoS 1 or 2 publish with packet id `pkid` was handed to the client at `now` (it
    /// writes at once, in order), `in_flight` now awaiting their acknowledgement with it:
    /// timed, unless one is (for less than [`GIVE_UP`]).
    pub(crate) fn written(&mut self, pkid: u16, now: Instant, in_flight: usize) {
        if in_flight <= 1 && !self.startup {
            // Idle until now: the next burst finds the path again from where the window is.
            self.startup = true;
            self.flat = 0;
        }
        let timing = self
            .timing
            .is_some_and(|t| now.saturating_duration_since(t.at) < GIVE_UP);
        // Checking the path: the message written alone is the one timed.
        if !timing || (self.probing && in_flight <= 1) {
            self.timing = Some(Timed {
                pkid,
                at: now,
                acked_then: self.acked,
                full: in_flight >= self.size,
                alone: in_flight <= 1,
            });
        }
    }

    /// The broker acknowledged `pkid` at `now`.
    pub(crate) fn acknowledged(&mut self, pkid: u16, now: Instant) {
        self.acked += 1;
        let Some(Timed {
            pkid: timed,
            at,
            acked_then,
            full,
            alone,
        }) = self.timing
        else {
            return;
        };
        if timed != pkid {
            return;
        }
        self.timing = None;
        let rtt = now
            .saturating_duration_since(at)
            .max(Duration::from_micros(10));
        let min_rtt = self.min_rtt.map_or(rtt, |m| m.min(rtt));
        self.min_rtt = Some(min_rtt);
        let before = self.rates.iter().copied().fold(0.0, f64::max);
        let max_rate = if self.probing && alone {
            // The path's round trip with nothing queued ahead (a lone message's rate measures
            // nothing).
            self.probing = false;
            self.path_checked = true;
            before
        } else {
            let rate = (self.acked - acked_then) as f64 / rtt.as_secs_f64();
            if self.rates.len() == RATE_SAMPLES {
                self.rates.pop_front();
            }
            self.rates.push_back(rate);
            if rate > 1.25 * before {
                self.flat = 0;
            } else if full {
                self.flat += 1;
                self.startup &= self.flat < FULL_AFTER;
            }
            before.max(rate)
        };
        let gain = if self.startup { 4.0 } else { 2.0 };
        let product = gain * max_rate * min_rtt.as_secs_f64();
        self.wanted = product.ceil() as usize;
        // Held by the broker on what looks like a long path: first a message alone, to check
        // that the path is long (the window empties, then carries one message for a round
        // trip: two round trips once per connection).
        self.probing |= !self.path_checked && self.held_by_broker();
        self.size = if self.probing {
            1
        } else if self.startup && min_rtt >= LONG_PATH {
            self.cap
        } else {
            self.wanted.clamp(self.floor, self.cap)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `w` for `secs` seconds over a path with a fixed round trip `rtt` (no queueing)
    /// and a bottleneck that takes `capacity` messages per second, with a backlog always
    /// waiting: every acknowledgement lets the window write again (ack clocking). Returns the
    /// window at the end and the messages acknowledged per second over the last half.
    fn run(w: &mut Window, rtt: Duration, capacity: f64, secs: f64) -> (usize, f64) {
        use std::collections::BTreeMap;
        let start = Instant::now();
        let service = Duration::from_secs_f64(1.0 / capacity);
        let mut server_free = start;
        // Acknowledgement time -> packet id, for what is in flight.
        let mut flight: BTreeMap<(Instant, u16), ()> = BTreeMap::new();
        let mut pkid = 0u16;
        let mut now = start;
        let end = start + Duration::from_secs_f64(secs);
        let half = start + Duration::from_secs_f64(secs / 2.0);
        let mut acked_late = 0u64;
        loop {
            while flight.len() < w.size() {
                pkid = pkid.wrapping_add(1);
                w.written(pkid, now, flight.len() + 1);
                let arrival = now + rtt / 2;
                let begin = arrival.max(server_free);
                server_free = begin + service;
                flight.insert((server_free + rtt / 2, pkid), ());
            }
            let Some(((at, id), ())) = flight.pop_first() else {
                break;
            };
            if at > end {
                break;
            }
            now = at;
            if at > half {
                acked_late += 1;
            }
            w.acknowledged(id, now);
        }
        (w.size(), acked_late as f64 / (secs / 2.0))
    }

    #[test]
    fn on_loopback_the_floor_applies() {
        let mut w = Window::new(100, 8192);
        // 0.3 ms round trips, 50 000 msg/s: the product is 15 messages.
        let (size, rate) = run(&mut w, Duration::from_micros(300), 50_000.0, 2.0);
        assert_eq!(size, 100);
        assert!(rate > 49_000.0, "{rate}");
    }

    #[test]
    fn a_long_path_opens_the_window_and_fills_it() {
        // 100 ms, 40 000 msg/s: the product is 4 000, the floor 100 would give 1 000 msg/s.
        let mut w = Window::new(100, 8192);
        let (size, rate) = run(&mut w, Duration::from_millis(100), 40_000.0, 4.0);
        assert!(rate > 38_000.0, "{rate} msg/s");
        // About twice the product, not the cap: what queues at the bottleneck stays bounded.
        assert!((4_000..=8_192).contains(&size), "{size}");
        // A fixed window of the floor, for comparison.
        let mut fixed = Window::new(100, 100);
        let (_, slow) = run(&mut fixed, Duration::from_millis(100), 40_000.0, 4.0);
        assert!(slow < 1_100.0, "{slow}");
    }

    #[test]
    fn the_cap_holds_and_a_smaller_receive_maximum_lowers_it() {
        let mut w = Window::new(100, 1000);
        w.cap_at(65_535);
        assert_eq!(
            run(&mut w, Duration::from_millis(100), 1e6, 2.0).0,
            1000,
            "never raised"
        );
        assert_eq!(w.starved(), None, "inflight_max is the operator's own cap");
        w.cap_at(20);
        assert_eq!(w.size(), 20);
        // (A new connection: `run` starts with nothing in flight.)
        let mut w = Window::new(100, 1000);
        w.cap_at(20);
        assert_eq!(run(&mut w, Duration::from_millis(100), 1e6, 1.0).0, 20);
        let (max, rtt) = w.starved().expect("the broker's 20 hold a 100 ms path");
        assert_eq!(max, 20);
        assert!(rtt >= Duration::from_millis(100), "{rtt:?}");
    }

    #[test]
    fn a_round_trip_inflated_by_queueing_is_checked_with_a_message_alone() {
        // Loopback, a broker with a Receive Maximum of 100 that takes 16 000 msg/s, and a busy
        // machine: a full window's sample came back after 6 ms, as on a long path.
        let mut w = Window::new(100, 8192);
        w.cap_at(100);
        let now = Instant::now();
        w.written(1, now, 100);
        for _ in 0..99 {
            w.acknowledged(0, now + Duration::from_millis(3));
        }
        w.acknowledged(1, now + Duration::from_millis(6));
        assert_eq!(w.starved(), None, "not before a message alone confirmed it");
        assert_eq!(w.size(), 1, "the window empties to send one alone");
        // The path is 0.3 ms: the message alone comes back at once.
        let (size, _) = run(&mut w, Duration::from_micros(300), 16_000.0, 1.0);
        assert_eq!(w.starved(), None, "a short path with messages queued ahead");
        assert_eq!(size, 100);
    }

    #[test]
    fn a_small_receive_maximum_on_loopback_starves_nothing() {
        let mut w = Window::new(100, 2048);
        w.cap_at(20);
        run(&mut w, Duration::from_micros(300), 50_000.0, 1.0);
        assert_eq!(w.starved(), None);
    }

    #[test]
    fn a_sample_never_acknowledged_is_replaced_by_a_later_one() {
        let mut w = Window::new(10, 1000);
        let start = Instant::now();
        w.written(1, start, 1);
        let now = start + GIVE_UP;
        w.written(2, now, 2);
        for _ in 0..9 {
            w.acknowledged(0, now + Duration::from_micros(500));
        }
        w.acknowledged(2, now + Duration::from_millis(1));
        // Measured: 10 acknowledgements in 1 ms, a product of 10, four times that while
        // starting is 40 (with message 1 still timed, nothing would have been measured and the
        // window stayed 10).
        assert_eq!(w.size(), 40);
    }

    #[test]
    fn a_long_path_starts_at_the_cap_until_the_path_is_full() {
        // 100 ms, 10 000 msg/s: the product is 1 000; the start opens to the cap at the first
        // sample, and once three samples of a full window find no more rate it comes down to
        // about twice the product.
        let mut w = Window::new(100, 8192);
        let start = Instant::now();
        w.written(1, start, 1);
        w.acknowledged(1, start + Duration::from_millis(100));
        assert_eq!(w.size(), 8192, "a long path: the cap at once");
        let (size, rate) = run(&mut w, Duration::from_millis(100), 10_000.0, 4.0);
        assert!(rate > 9_500.0, "{rate}");
        assert!((1_000..=4_000).contains(&size), "{size}");
    }

    #[test]
    fn samples_of_a_window_not_full_never_end_the_start() {
        let mut w = Window::new(100, 8192);
        let mut now = Instant::now();
        // A trickle: one message at a time, 100 ms each, many samples with no more rate.
        for pkid in 1..=10 {
            w.written(pkid, now, 1);
            now += Duration::from_millis(100);
            w.acknowledged(pkid, now);
        }
        assert_eq!(w.size(), 8192, "still starting: a burst gets the cap");
        // A burst that fills it, and the rate it finds stops growing: the start ends.
        let (size, _) = run(&mut w, Duration::from_millis(100), 5_000.0, 10.0);
        assert!(size < 8192, "{size}");
        // Idle again (nothing else in flight), then the next burst starts over at the cap.
        w.written(1000, now + Duration::from_secs(30), 1);
        assert_eq!(w.size(), size, "the size waits for the next sample");
        w.acknowledged(
            1000,
            now + Duration::from_secs(30) + Duration::from_millis(100),
        );
        assert_eq!(w.size(), 8192);
    }
}
