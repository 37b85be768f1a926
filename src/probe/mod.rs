//! End-to-end probes: is replication flowing, and how fast?
//!
//! Every `probe_interval` this process publishes a small QoS 1 message on each broker X, on
//! `$meshbridge/<id>/probe/<instance>/X`, from a client of its own ([`client`]). The link that
//! consumes X (this process's or another instance's) forwards it like any message, to every
//! other broker, bypassing the topic rules. On each target T, this process's probe client
//! observes it. Sender and observer are the same process, so the lag is measured on one
//! monotonic clock, whatever the hosts' clocks say.
//!
//! `$` topics are never matched by `#` (MQTT 4.7.2), so user subscribers never see a probe; the
//! links subscribe the probe filter explicitly and keep probes out of the message counters.
//!
//! [`ProbeBook`] is the bookkeeping, pure and clocked by its caller: what was sent, what each
//! target saw, lag per (origin, target) pair, probes lost, and which pairs are **stalled** (no
//! probe seen for `probe_stall_after`).

pub(crate) mod client;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// How long the lag samples behind the matrix's p50/p99 are kept.
pub(crate) const MATRIX_WINDOW: Duration = Duration::from_secs(60);

/// Lag histogram buckets: 1 ms to about 33 s, doubling.
fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The Prometheus family of lag histograms, labelled by origin and target.
pub(crate) type LagFamily = prometheus_client::metrics::family::Family<
    Vec<(&'static str, String)>,
    Histogram,
    fn() -> Histogram,
>;

/// One probe on its way.
#[derive(Debug)]
struct Sent {
    seq: u64,
    at: Instant,
    /// Targets that have not seen it yet.
    waiting: Vec<Arc<str>>,
}

/// What one (origin, target) pair has shown.
#[derive(Debug)]
struct Pair {
    /// When the pair began to be measured (both brokers in the book).
    since: Instant,
    last_seen: Option<Instant>,
    /// The first probe seen: loss is counted from there on (before it, the links may still be
    /// subscribing).
    first_seq: Option<u64>,
    /// Lags of the last [`MATRIX_WINDOW`].
    recent: VecDeque<(Instant, Duration)>,
    seen: u64,
    lost: u64,
    stalled: bool,
}

/// A change of a pair's stalled state, to be logged once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transition {
    /// Where the probes are published.
    pub(crate) origin: Arc<str>,
    /// Where they should come out.
    pub(crate) target: Arc<str>,
    /// Stalled now (false: recovered).
    pub(crate) stalled: bool,
    /// Since the last probe seen (or since measuring began).
    pub(crate) silent_for: Duration,
}

/// One pair as the status, the matrix and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairStatus {
    /// Origin broker.
    pub origin: String,
    /// Target broker.
    pub target: String,
    /// Median lag over the last minute, milliseconds (none seen: `None`).
    pub p50_ms: Option<f64>,
    /// 99th percentile lag over the last minute, milliseconds.
    pub p99_ms: Option<f64>,
    /// Probes seen over the last minute.
    pub samples: u64,
    /// Milliseconds since the last probe was seen (`None`: never).
    pub last_seen_ms_ago: Option<u64>,
    /// Probes seen since the pair began to be measured.
    pub seen: u64,
    /// Probes not seen within `probe_stall_after` (counted from the pair's first probe on).
    pub lost: u64,
    /// No probe for `probe_stall_after`.
    pub stalled: bool,
}

/// The N x N lag matrix of one process.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Matrix {
    /// Probes are on (`probe_interval` > 0).
    pub enabled: bool,
    /// Milliseconds between probes.
    pub interval_ms: u64,
    /// Milliseconds without a probe after which a pair is stalled.
    pub stall_after_ms: u64,
    /// The brokers, in name order (rows: origin, columns: target).
    pub brokers: Vec<String>,
    /// Every (origin, target) pair, origin-major in `brokers` order.
    pub pairs: Vec<PairStatus>,
}

impl Matrix {
    /// The pair from `origin` to `target`.
    pub fn pair(&self, origin: &str, target: &str) -> Option<&PairStatus> {
        self.pairs
            .iter()
            .find(|p| p.origin == origin && p.target == target)
    }

    /// The stalled pairs.
    pub fn stalled(&self) -> impl Iterator<Item = &PairStatus> {
        self.pairs.iter().filter(|p| p.stalled)
    }

    /// Whether `target` is cut off from the mesh: every origin that still delivers to some
    /// other broker is stalled into `target` (and there is at least one such origin). A single
    /// slow or dead origin does not cut a target off, and neither does a pair that has not been
    /// measured long enough to tell.
    pub fn cut_off(&self, target: &str) -> bool {
        let healthy_origins: Vec<&str> = self
            .brokers
            .iter()
            .filter(|o| o.as_str() != target)
            .filter(|o| {
                self.pairs
                    .iter()
                    .any(|p| p.origin == **o && p.target != target && !p.stalled && p.seen > 0)
            })
            .map(String::as_str)
            .collect();
        !healthy_origins.is_empty()
            && healthy_origins
                .iter()
                .all(|o| self.pair(o, target).is_some_and(|p| p.stalled))
    }
}

/// The probes of this process: sent, seen, lost, lagging, stalled.
#[derive(Debug)]
pub(crate) struct ProbeBook {
    interval: Duration,
    stall_after: Duration,
    /// Probes on their way, per origin, oldest first.
    sent: BTreeMap<Arc<str>, VecDeque<Sent>>,
    next_seq: u64,
    pairs: BTreeMap<(Arc<str>, Arc<str>), Pair>,
    lag: LagFamily,
}

impl ProbeBook {
    /// A book for probes every `interval` (zero: off), pairs stalled after `stall_after`.
    pub(crate) fn new(interval: Duration, stall_after: Duration) -> Self {
        Self {
            interval,
            stall_after,
            sent: BTreeMap::new(),
            next_seq: 1,
            pairs: BTreeMap::new(),
            lag: LagFamily::new_with_constructor(lag_histogram),
        }
    }

    /// Probes are on.
    pub(crate) fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }

    /// Time between probes.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// The lag histograms (cheap to clone: shared).
    pub(crate) fn lag_family(&self) -> LagFamily {
        self.lag.clone()
    }

    fn brokers(&self) -> Vec<Arc<str>> {
        self.sent.keys().cloned().collect()
    }

    /// `broker` joins: its pairs with every other broker begin to be measured.
    pub(crate) fn add_broker(&mut self, broker: &Arc<str>, now: Instant) {
        if self.sent.contains_key(broker) {
            return;
        }
        for other in self.brokers() {
            for key in [
                (broker.clone(), other.clone()),
                (other.clone(), broker.clone()),
            ] {
                self.pairs.insert(
                    key,
                    Pair {
                        since: now,
                        last_seen: None,
                        first_seq: None,
                        recent: VecDeque::new(),
                        seen: 0,
                        lost: 0,
                        stalled: false,
                    },
                );
            }
        }
        self.sent.insert(broker.clone(), VecDeque::new());
    }

    /// `broker` left: its pairs and probes are forgotten.
    pub(crate) fn remove_broker(&mut self, broker: &str) {
        self.sent.remove(broker);
        for q in self.sent.values_mut() {
            for s in q.iter_mut() {
                s.waiting.retain(|t| t.as_ref() != broker);
            }
        }
        let gone: Vec<_> = self
            .pairs
            .keys()
            .filter(|(o, t)| o.as_ref() == broker || t.as_ref() == broker)
            .cloned()
            .collect();
        for (o, t) in gone {
            self.pairs.remove(&(o.clone(), t.clone()));
            self.lag.remove(&labels(&o, &t));
        }
    }

    /// A probe is about to be published on `origin`: its sequence number.
    pub(crate) fn send(&mut self, origin: &str, now: Instant) -> Option<u64> {
        let targets: Vec<Arc<str>> = self
            .sent
            .keys()
            .filter(|b| b.as_ref() != origin)
            .cloned()
            .collect();
        let q = self.sent.get_mut(origin)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        q.push_back(Sent {
            seq,
            at: now,
            waiting: targets,
        });
        Some(seq)
    }

    /// The probe `seq` could not be published after all.
    pub(crate) fn unsend(&mut self, origin: &str, seq: u64) {
        if let Some(q) = self.sent.get_mut(origin) {
            q.retain(|s| s.seq != seq);
        }
    }

    /// The probe `seq` from `origin` came out of `target`: its lag, unless it is unknown
    /// (already counted lost, seen before, or from an earlier run).
    pub(crate) fn observe(
        &mut self,
        origin: &str,
        target: &str,
        seq: u64,
        now: Instant,
    ) -> Option<Duration> {
        let sent = self
            .sent
            .get_mut(origin)?
            .iter_mut()
            .find(|s| s.seq == seq)?;
        let i = sent.waiting.iter().position(|t| t.as_ref() == target)?;
        let target = sent.waiting.swap_remove(i);
        let lag = now.saturating_duration_since(sent.at);
        let origin: Arc<str> = self.sent.get_key_value(origin)?.0.clone();
        let pair = self.pairs.get_mut(&(origin.clone(), target.clone()))?;
        pair.last_seen = Some(now);
        pair.first_seq.get_or_insert(seq);
        pair.seen += 1;
        pair.recent.push_back((now, lag));
        self.lag
            .get_or_create(&labels(&origin, &target))
            .observe(lag.as_secs_f64());
        Some(lag)
    }

    /// Counts the probes older than `probe_stall_after` that some target did not see as lost,
    /// forgets old lag samples, and returns the pairs whose stalled state changed.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Transition> {
        for (origin, q) in &mut self.sent {
            while q
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.at) > self.stall_after)
            {
                let Some(s) = q.pop_front() else { break };
                for target in s.waiting {
                    if let Some(p) = self.pairs.get_mut(&(origin.clone(), target))
                        && p.first_seq.is_some_and(|first| s.seq > first)
                    {
                        p.lost += 1;
                    }
                }
            }
        }
        let mut changes = Vec::new();
        for ((origin, target), p) in &mut self.pairs {
            while p
                .recent
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > MATRIX_WINDOW)
            {
                p.recent.pop_front();
            }
            let silent_for = now.saturating_duration_since(p.last_seen.unwrap_or(p.since));
            let stalled = self.interval > Duration::ZERO && silent_for > self.stall_after;
            if stalled != p.stalled {
                p.stalled = stalled;
                changes.push(Transition {
                    origin: origin.clone(),
                    target: target.clone(),
                    stalled,
                    silent_for,
                });
            }
        }
        changes
    }

    /// The matrix as of `now`.
    pub(crate) fn matrix(&self, now: Instant) -> Matrix {
        let pairs = self
            .pairs
            .iter()
            .map(|((origin, target), p)| {
                let mut lags: Vec<Duration> = p.recent.iter().map(|(_, l)| *l).collect();
                lags.sort_unstable();
                PairStatus {
                    origin: origin.to_string(),
                    target: target.to_string(),
                    p50_ms: percentile(&lags, 50),
                    p99_ms: percentile(&lags, 99),
                    samples: lags.len() as u64,
                    last_seen_ms_ago: p
                        .last_seen
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    seen: p.seen,
                    lost: p.lost,
                    stalled: p.stalled,
                }
            })
            .collect();
        Matrix {
            enabled: self.enabled(),
            interval_ms: self.interval.as_millis() as u64,
            stall_after_ms: self.stall_after.as_millis() as u64,
            brokers: self.sent.keys().map(|b| b.to_string()).collect(),
            pairs,
        }
    }
}

/// The labels of a pair's series.
pub(crate) fn labels(origin: &str, target: &str) -> Vec<(&'static str, String)> {
    vec![
        ("origin", origin.to_string()),
        ("target", target.to_string()),
    ]
}

/// The `p`th percentile (nearest rank) of sorted `lags`, in milliseconds.
fn percentile(sorted: &[Duration], p: usize) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    Some(sorted[rank - 1].as_secs_f64() * 1000.0)
}

/// The payload of a probe: the run it belongs to and its sequence number.
pub(crate) fn encode(run: u64, seq: u64) -> Vec<u8> {
    format!("{run}:{seq}").into_bytes()
}

/// `(run, seq)` of a probe payload.
pub(crate) fn decode(payload: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (run, seq) = text.split_once(':')?;
    Some((run.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn book(names: &[&str], now: Instant) -> ProbeBook {
        let mut b = ProbeBook::new(5 * S, 15 * S);
        for n in names {
            b.add_broker(&Arc::from(*n), now);
        }
        b
    }

    #[test]
    fn a_probe_is_measured_once_per_target() {
        let t0 = Instant::now();
        let mut b = book(&["b1", "b2", "b3"], t0);
        let seq = b.send("b1", t0).unwrap();
        let ms = Duration::from_millis;
        assert_eq!(b.observe("b1", "b2", seq, t0 + ms(3)), Some(ms(3)));
        assert_eq!(b.observe("b1", "b2", seq, t0 + ms(4)), None, "a duplicate");
        assert_eq!(
            b.observe("b1", "b1", seq, t0 + ms(4)),
            None,
            "its own origin"
        );
        assert_eq!(b.observe("b1", "b3", seq + 7, t0 + ms(4)), None, "unknown");
        assert_eq!(b.observe("b1", "b3", seq, t0 + ms(9)), Some(ms(9)));
        let m = b.matrix(t0 + ms(10));
        assert_eq!(m.brokers, ["b1", "b2", "b3"]);
        assert_eq!(m.pairs.len(), 6);
        let p = m.pair("b1", "b2").unwrap();
        assert_eq!((p.p50_ms, p.samples, p.seen), (Some(3.0), 1, 1));
        assert_eq!(p.last_seen_ms_ago, Some(7));
        assert_eq!(m.pair("b2", "b1").unwrap().p50_ms, None);
    }

    #[test]
    fn unseen_probes_are_lost_and_silent_pairs_stall_then_recover() {
        let t0 = Instant::now();
        let mut b = book(&["b1", "b2"], t0);
        let mut now = t0;
        let mut changes = Vec::new();
        for i in 0..5 {
            let s1 = b.send("b1", now).unwrap();
            let s2 = b.send("b2", now).unwrap();
            b.observe("b1", "b2", s1, now + Duration::from_millis(2));
            if i == 0 {
                // b2's first probe gets through; loss is counted from there on.
                b.observe("b2", "b1", s2, now + Duration::from_millis(2));
            }
            now += 5 * S;
            changes.extend(b.tick(now));
        }
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(
            (&*changes[0].origin, &*changes[0].target, changes[0].stalled),
            ("b2", "b1", true),
            "b2's probes stop reaching b1"
        );
        let m = b.matrix(now);
        assert!(m.pair("b2", "b1").unwrap().stalled);
        assert!(!m.pair("b1", "b2").unwrap().stalled);
        assert_eq!(
            m.pair("b2", "b1").unwrap().lost,
            1,
            "the one sent at 5 s; 10 s is not overdue yet"
        );
        assert_eq!(m.pair("b1", "b2").unwrap().lost, 0);
        // Flowing again: recovered at the next tick.
        let s = b.send("b2", now).unwrap();
        b.observe("b2", "b1", s, now);
        let back = b.tick(now + S);
        assert_eq!(back.len(), 1);
        assert!(!back[0].stalled);
    }

    #[test]
    fn a_target_is_cut_off_only_when_every_working_origin_stalls_into_it() {
        let pair = |o: &str, t: &str, stalled: bool| PairStatus {
            origin: o.into(),
            target: t.into(),
            p50_ms: None,
            p99_ms: None,
            samples: 0,
            last_seen_ms_ago: None,
            seen: u64::from(!stalled),
            lost: 0,
            stalled,
        };
        let names = ["b1", "b2", "b3"];
        let matrix = |stalled: &[(&str, &str)]| Matrix {
            brokers: names.iter().map(|s| s.to_string()).collect(),
            pairs: names
                .iter()
                .flat_map(|o| names.iter().map(move |t| (*o, *t)))
                .filter(|(o, t)| o != t)
                .map(|(o, t)| pair(o, t, stalled.contains(&(o, t))))
                .collect(),
            ..Matrix::default()
        };
        let m = matrix(&[("b1", "b3")]);
        assert!(!m.cut_off("b3"), "one slow origin");
        let m = matrix(&[("b1", "b3"), ("b2", "b3")]);
        assert!(m.cut_off("b3"));
        assert!(!m.cut_off("b1") && !m.cut_off("b2"));
        // b1 is dead: everything from and to it stalls; nobody else is cut off.
        let m = matrix(&[("b1", "b2"), ("b1", "b3"), ("b2", "b1"), ("b3", "b1")]);
        assert!(!m.cut_off("b2") && !m.cut_off("b3"));
        assert!(m.cut_off("b1"));
    }

    #[test]
    fn removed_brokers_leave_no_pairs_and_percentiles_use_nearest_rank() {
        let t0 = Instant::now();
        let mut b = book(&["b1", "b2", "b3"], t0);
        b.remove_broker("b2");
        assert_eq!(b.matrix(t0).pairs.len(), 2);
        let lags: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&lags, 50), Some(50.0));
        assert_eq!(percentile(&lags, 99), Some(99.0));
        assert_eq!(percentile(&lags[..1], 99), Some(1.0));
        assert_eq!(decode(&encode(17, 4)), Some((17, 4)));
        assert_eq!(decode(b"x:1"), None);
    }
}
