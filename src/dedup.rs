//! Echo suppression for MQTT 3.1.1 links: pure, I/O-free, clock passed in.
//!
//! A 3.1.1 broker sends the bridge's own publishes back to it (there is no No Local), and the
//! echo carries nothing that marks it. Before the bridge publishes a message to a broker it
//! [`EchoWindow::record`]s the message's [`fingerprint`]; when a message arrives from that broker,
//! [`EchoWindow::take_echo`] consumes one matching record and the message is dropped as an echo.
//!
//! The window is a counted multiset with a TTL: publishing the same content twice expects two
//! echoes. Entries expire after `ttl` (an echo that never came: the broker dropped it, or a
//! filter did not match) and the number of live entries is capped at `max_entries`, oldest first
//! evicted (counted in [`EchoWindow::evictions`]; an evicted entry's echo would be forwarded once more).
//!
//! The fingerprint covers topic and payload only. QoS and retain are not part of it on purpose:
//! a 3.1.1 broker delivers a retained publish to live subscribers with retain = 0, and downgrades
//! QoS to the subscription's, so neither survives the echo.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// Fingerprint of a message's topic and payload (64-bit, fixed seeds so it is stable per process).
pub(crate) fn fingerprint(topic: &[u8], payload: &[u8]) -> u64 {
    let state = ahash::RandomState::with_seeds(0x6d62_7269, 0x6467_655f, 0x6563_686f, 0x5f77_696e);
    let mut h = state.build_hasher();
    h.write_usize(topic.len());
    h.write(topic);
    h.write(payload);
    h.finish()
}

/// Approximate heap bytes of one order-queue slot.
const SLOT_BYTES: usize = 24;
/// Approximate heap bytes of one map entry (key, counts, control byte and load factor).
const MAP_ENTRY_BYTES: usize = 24;

/// The records of one fingerprint: how many slots of the order queue it has, and how many of
/// them are live. Records are consumed oldest first, so the live ones are always the newest
/// `live` of its `queued` slots, and the oldest slot is live exactly when `live == queued`.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    live: u32,
    queued: u32,
}

/// A counted multiset of fingerprints with a TTL and a bound on its size.
///
/// One record costs a slot of the order queue and, per distinct fingerprint, one map entry
/// with two counters: nothing is allocated per record (the 3.1.1 lane records every message it
/// publishes, thousands at once over a long path).
#[derive(Debug)]
pub(crate) struct EchoWindow {
    ttl: Duration,
    max_entries: usize,
    /// Per fingerprint with a slot in `order`: its counts.
    live: HashMap<u64, Counts, ahash::RandomState>,
    /// Every record in insertion order: (expiry, fingerprint). Records consumed by an echo
    /// stay here until they reach the front, where they are skipped.
    order: VecDeque<(Instant, u64)>,
    live_count: usize,
    evictions: u64,
    expirations: u64,
}

impl EchoWindow {
    /// An empty window.
    pub(crate) fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries: max_entries.max(1),
            live: HashMap::default(),
            order: VecDeque::new(),
            live_count: 0,
            evictions: 0,
            expirations: 0,
        }
    }

    /// Notes that a message with this fingerprint was published to the broker at `now`.
    pub(crate) fn record(&mut self, fp: u64, now: Instant) {
        self.expire(now);
        while self.live_count >= self.max_entries {
            if self.pop_front_live().is_some() {
                self.evictions += 1;
            }
        }
        if self.order.len() >= 2 * self.max_entries {
            // Consumed slots stuck behind an old live one: drop them all (at least half of the
            // queue goes, so this is amortised O(1) per record). A fingerprint's consumed
            // slots are its oldest, so the first `queued - live` met from the front go.
            let live = &mut self.live;
            self.order.retain(|&(_, fp)| match live.get_mut(&fp) {
                Some(c) if c.queued > c.live => {
                    c.queued -= 1;
                    false
                }
                _ => true,
            });
            self.live.retain(|_, c| c.queued > 0);
        }
        let c = self.live.entry(fp).or_default();
        c.live += 1;
        c.queued += 1;
        self.order.push_back((now + self.ttl, fp));
        self.live_count += 1;
    }

    /// If a live record matches, consumes it and returns true: the message is an echo.
    pub(crate) fn take_echo(&mut self, fp: u64, now: Instant) -> bool {
        self.expire(now);
        match self.live.get_mut(&fp) {
            Some(c) if c.live > 0 => c.live -= 1,
            _ => return false,
        }
        self.live_count -= 1;
        self.compact_front();
        true
    }

    /// Live records (echoes still expected).
    pub(crate) fn len(&self) -> usize {
        self.live_count
    }

    /// No echo expected (expired records may still be counted until the next call).
    pub(crate) fn is_empty(&self) -> bool {
        self.live_count == 0
    }

    /// Records dropped because the window was full.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Records that expired without their echo.
    pub(crate) fn expirations(&self) -> u64 {
        self.expirations
    }

    /// Approximate heap bytes held, for the metrics.
    pub(crate) fn approx_bytes(&self) -> usize {
        self.order.len() * SLOT_BYTES + self.live.len() * MAP_ENTRY_BYTES
    }

    /// The upper bound of [`approx_bytes`](Self::approx_bytes): the order queue holds at most
    /// twice `max_entries` slots (consumed slots are compacted away), and the map an entry per
    /// fingerprint with a slot.
    #[cfg(test)]
    pub(crate) fn max_bytes(&self) -> usize {
        2 * self.max_entries * (SLOT_BYTES + MAP_ENTRY_BYTES)
    }

    /// Whether the front slot of the order queue is a live record.
    fn front_live(&self) -> Option<bool> {
        let &(_, fp) = self.order.front()?;
        Some(self.live.get(&fp).is_some_and(|c| c.live == c.queued))
    }

    /// Removes the front slot of the order queue; returns its fingerprint and whether it was a
    /// live record (then removed with it).
    fn pop_front(&mut self) -> Option<(u64, bool)> {
        let (_, fp) = self.order.pop_front()?;
        let Some(c) = self.live.get_mut(&fp) else {
            return Some((fp, false));
        };
        let was_live = c.live == c.queued;
        c.queued -= 1;
        if was_live {
            c.live -= 1;
            self.live_count -= 1;
        }
        if c.queued == 0 {
            self.live.remove(&fp);
        }
        Some((fp, was_live))
    }

    /// Removes the oldest live record (skipping consumed ones); returns its fingerprint.
    fn pop_front_live(&mut self) -> Option<u64> {
        while let Some((fp, was_live)) = self.pop_front() {
            if was_live {
                return Some(fp);
            }
        }
        None
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(expiry, _)) = self.order.front() {
            if expiry > now {
                break;
            }
            if let Some((_, true)) = self.pop_front() {
                self.expirations += 1;
            }
        }
        self.compact_front();
    }

    /// Drops consumed records from the front so the order queue tracks only what is live.
    fn compact_front(&mut self) {
        while self.front_live() == Some(false) {
            self.pop_front();
        }
        if self.order.capacity() > 64 && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to(self.order.len().max(64));
        }
        // The map too: a burst that filled the window would otherwise keep its room (and the
        // allocator its pages) for as long as the link lives. Shrinking to twice what is left
        // means at least half of that goes before the next shrink: amortised O(1).
        if self.live.capacity() > 64 && self.live.len() < self.live.capacity() / 4 {
            self.live.shrink_to((2 * self.live.len()).max(64));
        }
    }
}

/// Storm guard: notices when the same message (topic + payload) arrives from one broker over
/// and over, which is what a forwarding loop looks like (two bridges over 3.1.1 brokers, a
/// mosquitto bridge left in place, a broker ignoring No Local…). Past `threshold` copies within
/// `window`, further copies are reported as a storm; the link drops them and says so.
///
/// Memory is fixed: at most `max_tracked` counters (Misra–Gries heavy hitters). A message
/// that finds every counter taken takes one from each counter instead of one of its own,
/// and counters that reach zero, or whose window ended, are freed. A count is therefore never
/// above the true number of copies in its window (no message is dropped unless it really
/// arrived more than `threshold` times), and at most one below it for every
/// `max_tracked + 1` messages the link received meanwhile: a real storm, which is most of the
/// link's traffic, trips the guard after about `threshold` copies. (The earlier guard kept one
/// entry per distinct message, up to 100 000 per link, 4 MiB of map per busy link that the
/// allocator never gave back.)
#[derive(Debug)]
pub(crate) struct StormGuard {
    threshold: u32,
    window: Duration,
    max_tracked: usize,
    /// Per tracked fingerprint: when its window started and its count.
    seen: HashMap<u64, (Instant, u32), ahash::RandomState>,
}

/// What the storm guard says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StormVerdict {
    /// Forward it.
    Normal,
    /// A repeat past the threshold; `first` is true for the first such repeat in this window.
    Storm {
        /// First repeat past the threshold in the current window.
        first: bool,
    },
}

impl StormGuard {
    /// A guard; `threshold` 0 disables it.
    pub(crate) fn new(threshold: u32, window: Duration, max_tracked: usize) -> Self {
        let max_tracked = max_tracked.max(1);
        Self {
            threshold,
            window,
            max_tracked,
            seen: HashMap::with_capacity_and_hasher(max_tracked, ahash::RandomState::default()),
        }
    }

    /// Counts one arrival of `fp`.
    pub(crate) fn observe(&mut self, fp: u64, now: Instant) -> StormVerdict {
        if self.threshold == 0 {
            return StormVerdict::Normal;
        }
        let (window, room) = (self.window, self.seen.len() < self.max_tracked);
        let count = match self.seen.get_mut(&fp) {
            Some(entry) => {
                if now.duration_since(entry.0) >= window {
                    *entry = (now, 0);
                }
                entry.1 = entry.1.saturating_add(1);
                entry.1
            }
            None if room => {
                self.seen.insert(fp, (now, 1));
                1
            }
            None => {
                // Every counter taken: this copy takes one from each (itself uncounted).
                self.seen.retain(|_, (start, n)| {
                    *n -= 1;
                    *n > 0 && now.duration_since(*start) < window
                });
                0
            }
        };
        if count > self.threshold {
            StormVerdict::Storm {
                first: count == self.threshold + 1,
            }
        } else {
            StormVerdict::Normal
        }
    }

    /// Fingerprints tracked (memory bound: `max_tracked`).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    #[test]
    fn storm_guard_trips_past_threshold_and_resets_per_window() {
        let t0 = Instant::now();
        let mut g = StormGuard::new(3, Duration::from_secs(10), 100);
        let fp = fingerprint(b"loop", b"x");
        let verdicts: Vec<_> = (0..5).map(|_| g.observe(fp, t0)).collect();
        assert_eq!(
            verdicts,
            vec![
                StormVerdict::Normal,
                StormVerdict::Normal,
                StormVerdict::Normal,
                StormVerdict::Storm { first: true },
                StormVerdict::Storm { first: false },
            ]
        );
        assert_eq!(
            g.observe(fingerprint(b"other", b"x"), t0),
            StormVerdict::Normal
        );
        assert_eq!(
            g.observe(fp, t0 + Duration::from_secs(10)),
            StormVerdict::Normal,
            "new window"
        );
    }

    #[test]
    fn storm_guard_finds_a_loop_among_many_distinct_messages_and_never_overcounts() {
        let t0 = Instant::now();
        let mut g = StormGuard::new(100, Duration::from_secs(10), 64);
        let looping = fingerprint(b"loop", b"x");
        let mut first_storm = None;
        // One looping copy for every 3 distinct messages.
        for i in 0..2_000u32 {
            for k in 0..3u32 {
                let fp = fingerprint(b"t", &(i * 3 + k).to_be_bytes());
                assert_eq!(
                    g.observe(fp, t0),
                    StormVerdict::Normal,
                    "distinct: never a storm"
                );
            }
            if g.observe(looping, t0) == (StormVerdict::Storm { first: true }) {
                first_storm = Some(i + 1);
            }
            assert!(g.tracked() <= 64);
        }
        // Each copy loses at most one count per 65 messages: 4 messages a round, so it trips
        // after at most 101 / (1 - 4/65) copies.
        let copies = first_storm.expect("the loop is found");
        assert!(
            (101..=108).contains(&copies),
            "tripped after {copies} copies"
        );

        // A message repeated just up to the threshold among many others is never dropped.
        let mut g = StormGuard::new(100, Duration::from_secs(10), 64);
        let busy = fingerprint(b"sensor", b"on");
        for i in 0..100u32 {
            assert_eq!(g.observe(busy, t0), StormVerdict::Normal);
            for k in 0..50u32 {
                g.observe(fingerprint(b"t", &(i * 50 + k).to_be_bytes()), t0);
            }
        }
    }

    #[test]
    fn storm_guard_memory_is_bounded_and_can_be_disabled() {
        let t0 = Instant::now();
        let mut g = StormGuard::new(2, Duration::from_secs(10), 1000);
        for i in 0..100_000u32 {
            g.observe(fingerprint(b"t", &i.to_be_bytes()), t0);
            assert!(g.tracked() <= 1000);
        }
        let mut off = StormGuard::new(0, Duration::from_secs(10), 10);
        for _ in 0..100 {
            assert_eq!(off.observe(1, t0), StormVerdict::Normal);
        }
        assert_eq!(off.tracked(), 0);
    }

    #[test]
    fn echo_is_consumed_once() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 100);
        let fp = fingerprint(b"a/b", b"hello");
        w.record(fp, t0);
        assert!(w.take_echo(fp, t0));
        assert!(!w.take_echo(fp, t0), "a second copy is not an echo");
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn counted_multiset() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 100);
        let fp = fingerprint(b"t", b"same");
        for _ in 0..3 {
            w.record(fp, t0);
        }
        assert_eq!(w.len(), 3);
        assert!(w.take_echo(fp, t0));
        assert!(w.take_echo(fp, t0));
        assert!(w.take_echo(fp, t0));
        assert!(!w.take_echo(fp, t0));
    }

    #[test]
    fn different_topic_or_payload_is_not_an_echo() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 100);
        w.record(fingerprint(b"a", b"x"), t0);
        assert!(!w.take_echo(fingerprint(b"b", b"x"), t0));
        assert!(!w.take_echo(fingerprint(b"a", b"y"), t0));
        // Length-prefixing keeps topic/payload boundaries apart.
        assert_ne!(fingerprint(b"ab", b"c"), fingerprint(b"a", b"bc"));
        assert!(w.take_echo(fingerprint(b"a", b"x"), t0));
    }

    #[test]
    fn records_expire_after_ttl() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 100);
        let fp = fingerprint(b"t", b"p");
        w.record(fp, t0);
        assert!(!w.take_echo(fp, t0 + TTL), "expired at exactly ttl");
        assert_eq!(w.expirations(), 1);
        assert_eq!(w.len(), 0);

        w.record(fp, t0);
        assert!(w.take_echo(fp, t0 + TTL - Duration::from_millis(1)));
    }

    #[test]
    fn expiry_of_a_consumed_record_does_not_remove_a_younger_one() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 100);
        let fp = fingerprint(b"t", b"p");
        w.record(fp, t0);
        w.record(fp, t0 + Duration::from_secs(20));
        assert!(w.take_echo(fp, t0 + Duration::from_secs(21)));
        // The first record's expiry passes: the younger record must still be there.
        assert!(w.take_echo(fp, t0 + Duration::from_secs(31)));
        assert_eq!(w.expirations(), 0);
    }

    #[test]
    fn bounded_memory_evicts_oldest() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 10);
        for i in 0..25u32 {
            w.record(fingerprint(b"t", &i.to_be_bytes()), t0);
        }
        assert_eq!(w.len(), 10);
        assert_eq!(w.evictions(), 15);
        assert!(
            !w.take_echo(fingerprint(b"t", &0u32.to_be_bytes()), t0),
            "oldest was evicted"
        );
        assert!(
            w.take_echo(fingerprint(b"t", &24u32.to_be_bytes()), t0),
            "newest kept"
        );
        assert!(w.approx_bytes() <= w.max_bytes());
    }

    #[test]
    fn order_queue_stays_small_when_echoes_return() {
        // Steady state of a healthy link: every record is consumed soon after it is made. The
        // order queue must not keep a slot per message for the whole TTL.
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 1_000_000);
        for i in 0..100_000u32 {
            let fp = fingerprint(b"t", &i.to_be_bytes());
            w.record(fp, t0);
            assert!(w.take_echo(fp, t0));
        }
        assert_eq!(w.len(), 0);
        assert!(
            w.order.len() <= 1,
            "stale slots were kept: {}",
            w.order.len()
        );
        assert!(w.approx_bytes() < 64 * 1024, "{} bytes", w.approx_bytes());
    }

    #[test]
    fn the_window_gives_its_room_back_after_a_burst() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 1_000_000);
        let fps: Vec<u64> = (0..50_000u32)
            .map(|i| fingerprint(b"t", &i.to_be_bytes()))
            .collect();
        for fp in &fps {
            w.record(*fp, t0);
        }
        assert!(w.live.capacity() >= 50_000);
        // The burst's echoes come back: the map shrinks as they are consumed.
        for fp in &fps {
            assert!(w.take_echo(*fp, t0));
        }
        assert!(w.live.capacity() <= 128, "map kept {}", w.live.capacity());
        // Expiry gives the room back as well.
        for fp in &fps {
            w.record(*fp, t0);
        }
        w.record(1, t0 + TTL + Duration::from_secs(1));
        assert_eq!(w.len(), 1);
        assert!(w.live.capacity() <= 128, "map kept {}", w.live.capacity());
        assert!(
            w.order.capacity() <= 128,
            "queue kept {}",
            w.order.capacity()
        );
    }

    #[test]
    fn consumed_slots_behind_a_stuck_entry_stay_bounded() {
        // One echo never comes back; everything after it is echoed at once. The order queue must
        // not grow with the traffic while the stuck entry waits for its TTL.
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 100);
        w.record(fingerprint(b"stuck", b""), t0);
        for i in 0..100_000u32 {
            let fp = fingerprint(b"t", &i.to_be_bytes());
            w.record(fp, t0);
            assert!(w.take_echo(fp, t0));
        }
        assert_eq!(w.len(), 1);
        assert!(
            w.order.len() <= 200,
            "order queue grew to {}",
            w.order.len()
        );
        assert!(w.approx_bytes() <= w.max_bytes());
        assert!(w.take_echo(fingerprint(b"stuck", b""), t0));
    }

    #[test]
    fn repeated_content_behind_a_stuck_entry_keeps_its_live_records() {
        // Slots of one fingerprint, some consumed and some live, behind a record whose echo
        // never comes: the queue is cut back, and exactly the live records stay.
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 4);
        let (stuck, same, kept) = (
            fingerprint(b"stuck", b""),
            fingerprint(b"same", b""),
            fingerprint(b"kept", b""),
        );
        w.record(stuck, t0);
        w.record(kept, t0);
        for _ in 0..100 {
            w.record(same, t0);
            w.record(same, t0);
            assert!(w.take_echo(same, t0));
            assert!(w.take_echo(same, t0));
        }
        w.record(same, t0);
        assert_eq!(w.len(), 3);
        assert!(w.order.len() <= 8, "order queue grew to {}", w.order.len());
        assert!(w.approx_bytes() <= w.max_bytes());
        assert!(w.take_echo(same, t0));
        assert!(!w.take_echo(same, t0), "one live record of it was left");
        assert!(w.take_echo(kept, t0));
        assert!(w.take_echo(stuck, t0));
        assert_eq!(w.evictions(), 0);
        assert!(w.order.is_empty() && w.live.is_empty());
    }

    #[test]
    fn out_of_order_echoes() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 100);
        let fps: Vec<u64> = (0..5u8).map(|i| fingerprint(b"t", &[i])).collect();
        for &fp in &fps {
            w.record(fp, t0);
        }
        for &fp in fps.iter().rev() {
            assert!(w.take_echo(fp, t0));
        }
        assert_eq!(w.len(), 0);
        assert!(w.order.is_empty());
    }

    #[test]
    fn eviction_skips_consumed_slots() {
        let t0 = Instant::now();
        let mut w = EchoWindow::new(TTL, 2);
        let (a, b, c) = (
            fingerprint(b"a", b""),
            fingerprint(b"b", b""),
            fingerprint(b"c", b""),
        );
        w.record(a, t0);
        w.record(b, t0);
        assert!(w.take_echo(b, t0));
        w.record(c, t0);
        assert_eq!(w.evictions(), 0, "room was freed by the echo of b");
        assert!(w.take_echo(a, t0));
        assert!(w.take_echo(c, t0));
    }
}
