//! Every metric name in one place, and the per-link counters behind them.
//!
//! Counters are plain atomics updated on the hot path; the status view and (later) the
//! Prometheus exposition read them. Events that are worth a log line go through the functions
//! at the bottom, which log and count in one call, so the two never drift apart.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::SystemTime;

// Counter names are given without `_total`: the Prometheus encoder appends it.

/// Messages received from a broker (before loop checks). Counter.
pub(crate) const MESSAGES_IN: &str = "meshbridge_messages_in";
/// Messages published to a broker and acknowledged (QoS 0: written). Counter.
pub(crate) const MESSAGES_OUT: &str = "meshbridge_messages_out";
/// QoS 0 messages written to a broker's connection (QoS 0 has no acknowledgement, so they are
/// not in [`MESSAGES_OUT`]: a frozen broker's socket takes them too). Counter.
pub(crate) const SENT_QOS0: &str = "meshbridge_sent_qos0";
/// Messages received from a broker and handed to at least one target. Counter.
pub(crate) const FORWARDED: &str = "meshbridge_forwarded";
/// Echoes of our own publishes dropped on a 3.1.1 link. Counter.
pub(crate) const DROPPED_ECHO: &str = "meshbridge_dropped_echo";
/// Messages dropped because they carried an origin tag (single-hop rule). Counter.
pub(crate) const DROPPED_TAGGED: &str = "meshbridge_dropped_tagged";
/// Messages dropped because a target queue overflowed. Counter.
pub(crate) const DROPPED_OVERFLOW: &str = "meshbridge_dropped_overflow";
/// Repeats dropped by the storm guard (a forwarding loop somewhere). Counter.
pub(crate) const DROPPED_STORM: &str = "meshbridge_dropped_storm";
/// Messages for the broker dropped because the spool's disk refused writes for so long that
/// the memory holding them meanwhile was full.
pub(crate) const DROPPED_SPOOL_FAILED: &str = "meshbridge_dropped_spool_failed";
/// 1 per link, labelled with its protocol and TLS mode (`on`, `off`, `insecure`).
pub(crate) const LINK_INFO: &str = "meshbridge_link_info";
/// Messages no topic rule of the broker took: received on a topic no `in` rule matches, or
/// (from the spool, after a rule change) for a broker no `out` rule takes it to. Counter.
pub(crate) const DROPPED_UNMATCHED: &str = "meshbridge_dropped_unmatched";
/// 1 while the spool's disk refuses writes.
pub(crate) const SPOOL_FAILING: &str = "meshbridge_spool_failing";
/// Spool transactions that failed.
pub(crate) const SPOOL_WRITE_FAILURES: &str = "meshbridge_spool_write_failures";
/// Messages held in memory until the spool's disk takes them.
pub(crate) const SPOOL_HELD: &str = "meshbridge_spool_held_messages";
/// Messages a broker refused (error reason code, or larger than its maximum packet size). Counter.
pub(crate) const REJECTED: &str = "meshbridge_rejected";
/// When the link's client certificate expires, seconds since the Unix epoch (brokers with
/// mTLS only). Gauge.
pub(crate) const CLIENT_CERT_EXPIRY: &str = "meshbridge_client_cert_expiry_timestamp_seconds";
/// Changed TLS files that could not be used: the previous ones were kept. Counter.
pub(crate) const TLS_RELOAD_FAILURES: &str = "meshbridge_tls_reload_failures";
/// The broker had no session for the mesh's consumer although this process had one there
/// earlier in its run: it expired, the broker lost it (restarted without persistence), or a
/// client took the client id over with a clean session. What it held for the bridge is lost.
/// Counter.
pub(crate) const SESSION_LOST: &str = "meshbridge_session_lost";
/// The broker closed the consumer's connection and no instance of the mesh claimed the broker:
/// another client connected with the mesh's client id and took the session over (or the
/// broker restarted faster than the first reconnect). Counter.
pub(crate) const SESSION_TAKEN: &str = "meshbridge_session_taken";
/// Control payloads (records, Wills, echo notes, probes) refused on a broker: not sealed
/// with the mesh key, a bad seal, or stale (see `seal`); label `kind`. Counter.
pub(crate) const CONTROL_REJECTED: &str = "meshbridge_control_rejected";
/// Messages set aside for a broker that cannot take them as mapped (topic too long, packet too
/// large, one the broker closes the connection on), kept in the spool's dead-letter table.
/// Counter.
pub(crate) const DEAD_LETTERS: &str = "meshbridge_dead_letters";
/// Messages published again after a reconnect (possible duplicates downstream). Counter.
pub(crate) const REDELIVERED: &str = "meshbridge_redelivered";
/// Messages written to the broker's durable spool because it was down or fell behind. Counter.
pub(crate) const SPOOLED: &str = "meshbridge_spooled";
/// Times the broker's queue was full and held the origins that keep to no window instead of
/// spilling to the spool (see `router::hold`). Counter.
pub(crate) const HOLDS: &str = "meshbridge_holds";
/// Connection attempts after the first. Counter.
pub(crate) const RECONNECTS: &str = "meshbridge_reconnects";
/// Copies of spooled messages this broker acknowledged into its park sessions (it is their
/// origin; see `park`). Counter.
pub(crate) const PARKED: &str = "meshbridge_parked";
/// Messages spooled for this broker without a copy on their origin broker (too many copies
/// waiting there): on this host's disk only. Counter.
pub(crate) const PARK_SKIPPED: &str = "meshbridge_park_skipped";
/// Messages waiting for this broker with copies parked on their origin brokers (at most this
/// many in any one park session). Gauge.
pub(crate) const PARK_DEPTH: &str = "meshbridge_park_depth";
/// 1 while that depth is at 80 % of `broker_queue_limit` or more. Gauge.
pub(crate) const PARK_NEAR_LIMIT: &str = "meshbridge_park_near_limit";
/// Times this instance took a broker's consumer session (see `ha`). Counter.
pub(crate) const TAKEOVERS: &str = "meshbridge_ha_takeovers";
/// Times this instance stopped consuming a broker another instance owns. Counter.
pub(crate) const STEP_DOWNS: &str = "meshbridge_ha_step_downs";
/// Times this instance handed a broker over to an instance that joined. Counter.
pub(crate) const HANDOVERS: &str = "meshbridge_ha_handovers";
/// 1 while this instance consumes the broker. Gauge.
pub(crate) const CONSUMING: &str = "meshbridge_ha_consuming";
/// 1 while the broker's consumer (this instance or another) has its subscriptions in place:
/// what is published there reaches the mesh. Gauge.
pub(crate) const SUBSCRIBED: &str = "meshbridge_subscribed";
/// Live instances of the mesh, as the broker shows them. Gauge.
pub(crate) const INSTANCES: &str = "meshbridge_ha_instances";
/// 1 while the link is connected. Gauge.
pub(crate) const CONNECTED: &str = "meshbridge_connected";
/// Live entries of the link's dedup window. Gauge.
pub(crate) const DEDUP_ENTRIES: &str = "meshbridge_dedup_window_entries";
/// Approximate heap bytes of a 3.1.1 link's dedup window (bounded by `dedup_max_entries`).
/// Gauge.
pub(crate) const DEDUP_BYTES: &str = "meshbridge_dedup_window_bytes";
/// Dedup records dropped because the window was full: each one's echo will be forwarded once
/// more, a duplicate. Counter.
pub(crate) const DEDUP_EVICTIONS: &str = "meshbridge_dedup_evictions";
/// Dedup records that expired (`dedup_window`) without their echo coming back. Counter.
pub(crate) const DEDUP_EXPIRATIONS: &str = "meshbridge_dedup_expirations";
/// Messages waiting for the target (queued + in flight). Gauge.
pub(crate) const QUEUE_DEPTH: &str = "meshbridge_queue_depth";
/// The link's in-flight window now: `inflight` on a short path, up to `inflight_max` (and the
/// broker's Receive Maximum) as the path's bandwidth-delay product asks. Gauge.
pub(crate) const INFLIGHT_WINDOW: &str = "meshbridge_inflight_window";
/// Connections the link publishes on: 1, or more while the broker's Receive Maximum holds a
/// long path back (`publish_connections`, see `link::spread`). Gauge.
pub(crate) const PUBLISH_CONNECTIONS: &str = "meshbridge_publish_connections";
/// Messages waiting in the target's durable spool. Gauge.
pub(crate) const SPOOL_MESSAGES: &str = "meshbridge_spool_messages";
/// Bytes of the messages in the target's spool. Gauge.
pub(crate) const SPOOL_BYTES: &str = "meshbridge_spool_bytes";
/// Messages waiting for room in a full spool, unacknowledged upstream (policy `block`). Gauge.
pub(crate) const SPOOL_BLOCKED: &str = "meshbridge_spool_blocked";
/// 1 for the spool overflow policy in force (label `policy`). Gauge.
pub(crate) const SPOOL_OVERFLOW_POLICY: &str = "meshbridge_spool_overflow_policy";
/// Reconciliations of the retained messages run (see `reconcile`). Counter.
pub(crate) const RECONCILE_RUNS: &str = "meshbridge_reconcile_runs";
/// Retained topics the brokers disagreed on at the last reconciliation. Gauge.
pub(crate) const RECONCILE_DIFFERENCES: &str = "meshbridge_reconcile_differences";
/// Retained messages written or cleared by reconciliations. Counter.
pub(crate) const RECONCILE_REPAIRED: &str = "meshbridge_reconcile_repaired";
/// Snapshots of a broker's retained messages that failed. Counter.
pub(crate) const RECONCILE_SNAPSHOT_FAILURES: &str = "meshbridge_reconcile_snapshot_failures";
/// Retained messages handed to brokers added at run time. Counter.
pub(crate) const RETAINED_SEEDED: &str = "meshbridge_retained_seeded";
/// Lag of the end-to-end probes per (origin, target), seconds (see `probe`). Histogram.
pub(crate) const REPLICATION_LAG: &str = "meshbridge_replication_lag_seconds";
/// 1 while a pair has shown no probe for `probe_stall_after`. Gauge.
pub(crate) const REPLICATION_STALLED: &str = "meshbridge_replication_stalled";
/// Probes not seen on their target within `probe_stall_after`. Counter.
pub(crate) const PROBES_LOST: &str = "meshbridge_probes_lost";
/// Probes seen on their target. Counter.
pub(crate) const PROBES_SEEN: &str = "meshbridge_probes_seen";
/// Seconds since a pair last showed a probe. Gauge.
pub(crate) const PROBE_LAST_SEEN_AGE: &str = "meshbridge_probe_last_seen_age_seconds";

/// Lifecycle state of one link, as shown by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Dialling or waiting for CONNACK.
    Connecting,
    /// Connected and subscribed.
    Connected,
    /// Waiting before the next attempt.
    Backoff,
    /// Finished (shutdown or removed).
    Stopped,
}

/// Counters and state of one link.
#[derive(Debug)]
pub(crate) struct LinkStats {
    /// See [`MESSAGES_IN`].
    pub(crate) messages_in: AtomicU64,
    /// See [`MESSAGES_OUT`].
    pub(crate) messages_out: AtomicU64,
    /// See [`SENT_QOS0`].
    pub(crate) sent_qos0: AtomicU64,
    /// See [`FORWARDED`].
    pub(crate) forwarded: AtomicU64,
    /// See [`DROPPED_ECHO`].
    pub(crate) dropped_echo: AtomicU64,
    /// See [`DROPPED_TAGGED`].
    pub(crate) dropped_tagged: AtomicU64,
    /// See [`DROPPED_OVERFLOW`].
    pub(crate) dropped_overflow: AtomicU64,
    /// See [`DROPPED_STORM`].
    pub(crate) dropped_storm: AtomicU64,
    /// See [`DROPPED_SPOOL_FAILED`].
    pub(crate) dropped_spool_failed: AtomicU64,
    /// See [`DROPPED_UNMATCHED`].
    pub(crate) dropped_unmatched: AtomicU64,
    /// See [`REJECTED`].
    pub(crate) rejected: AtomicU64,
    /// See [`DEAD_LETTERS`].
    pub(crate) dead_letters: AtomicU64,
    /// See [`SESSION_LOST`].
    pub(crate) session_lost: AtomicU64,
    /// See [`SESSION_TAKEN`].
    pub(crate) session_taken: AtomicU64,
    /// See [`CONTROL_REJECTED`], by `seal::ControlKind::index`.
    pub(crate) control_rejected: [AtomicU64; 5],
    /// See [`REDELIVERED`].
    pub(crate) redelivered: AtomicU64,
    /// See [`SPOOLED`].
    pub(crate) spooled: AtomicU64,
    /// See [`HOLDS`].
    pub(crate) holds: AtomicU64,
    /// See [`RECONNECTS`].
    pub(crate) reconnects: AtomicU64,
    /// See [`DEDUP_ENTRIES`].
    pub(crate) dedup_entries: AtomicI64,
    /// See [`DEDUP_BYTES`].
    pub(crate) dedup_bytes: AtomicI64,
    /// See [`DEDUP_EVICTIONS`] (the window's own count, stored by the link).
    pub(crate) dedup_evictions: AtomicU64,
    /// See [`DEDUP_EXPIRATIONS`] (likewise).
    pub(crate) dedup_expirations: AtomicU64,
    /// Messages in flight towards the broker (the queue's length is read from the queue).
    pub(crate) inflight: AtomicI64,
    /// See [`INFLIGHT_WINDOW`].
    pub(crate) window: AtomicI64,
    /// See [`PUBLISH_CONNECTIONS`].
    pub(crate) publish_connections: AtomicI64,
    state: Mutex<(LinkState, SystemTime)>,
    last_error: Mutex<Option<String>>,
    /// Rejected messages are logged at most once per reason every 10 s.
    reject_log: Mutex<crate::ratelimit::LogLimit>,
    /// Whether the link has connected at least once (readiness).
    pub(crate) ever_connected: std::sync::atomic::AtomicBool,
    /// See [`PARKED`].
    pub(crate) parked: AtomicU64,
    /// See [`PARK_SKIPPED`].
    pub(crate) park_skipped: AtomicU64,
    /// Copies are parked for this target (set by its link at start).
    pub(crate) parking: std::sync::atomic::AtomicBool,
    /// The brokers' queue limit for those copies (0: none), see [`PARK_NEAR_LIMIT`].
    pub(crate) park_limit: AtomicU64,
    /// Whether the link last logged the park depth as near that limit.
    pub(crate) park_near_logged: std::sync::atomic::AtomicBool,
    /// See [`TAKEOVERS`].
    pub(crate) takeovers: AtomicU64,
    /// See [`STEP_DOWNS`].
    pub(crate) step_downs: AtomicU64,
    /// See [`HANDOVERS`].
    pub(crate) handovers: AtomicU64,
}

impl Default for LinkStats {
    fn default() -> Self {
        Self {
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            sent_qos0: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            dropped_echo: AtomicU64::new(0),
            dropped_tagged: AtomicU64::new(0),
            dropped_overflow: AtomicU64::new(0),
            dropped_storm: AtomicU64::new(0),
            dropped_spool_failed: AtomicU64::new(0),
            dropped_unmatched: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            session_lost: AtomicU64::new(0),
            session_taken: AtomicU64::new(0),
            control_rejected: Default::default(),
            redelivered: AtomicU64::new(0),
            spooled: AtomicU64::new(0),
            holds: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            dedup_entries: AtomicI64::new(0),
            dedup_bytes: AtomicI64::new(0),
            dedup_evictions: AtomicU64::new(0),
            dedup_expirations: AtomicU64::new(0),
            inflight: AtomicI64::new(0),
            window: AtomicI64::new(0),
            publish_connections: AtomicI64::new(1),
            state: Mutex::new((LinkState::Connecting, SystemTime::now())),
            last_error: Mutex::new(None),
            reject_log: Mutex::new(crate::ratelimit::LogLimit::new(
                std::time::Duration::from_secs(10),
            )),
            ever_connected: std::sync::atomic::AtomicBool::new(false),
            parked: AtomicU64::new(0),
            park_skipped: AtomicU64::new(0),
            parking: std::sync::atomic::AtomicBool::new(false),
            park_limit: AtomicU64::new(0),
            park_near_logged: std::sync::atomic::AtomicBool::new(false),
            takeovers: AtomicU64::new(0),
            step_downs: AtomicU64::new(0),
            handovers: AtomicU64::new(0),
        }
    }
}

/// Adds one to a counter.
pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl LinkStats {
    /// Moves the link to `state` (the time is kept for `status`).
    pub(crate) fn set_state(&self, state: LinkState) {
        if let Ok(mut s) = self.state.lock()
            && s.0 != state
        {
            *s = (state, SystemTime::now());
        }
        if state == LinkState::Connected {
            self.ever_connected.store(true, Ordering::Relaxed);
        }
    }

    /// Current state and since when.
    pub(crate) fn state(&self) -> (LinkState, SystemTime) {
        self.state
            .lock()
            .map(|s| *s)
            .unwrap_or((LinkState::Stopped, SystemTime::now()))
    }

    /// Park depth of this target for a spool depth of `spooled` (see [`PARK_DEPTH`]), and
    /// whether it is near the brokers' queue limit (see [`PARK_NEAR_LIMIT`]).
    pub(crate) fn park_depth(&self, spooled: u64) -> (u64, bool) {
        if !self.parking.load(Ordering::Relaxed) {
            return (0, false);
        }
        let limit = self.park_limit.load(Ordering::Relaxed);
        let near = limit > 0 && spooled.saturating_mul(10) >= limit.saturating_mul(8);
        (spooled, near)
    }

    /// Remembers the last error for `status`.
    pub(crate) fn set_error(&self, error: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error);
        }
    }

    /// Forgets the last error (the link connected again: an old error would mislead).
    pub(crate) fn clear_error(&self) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }

    /// The last error, if any.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// A topic as it may be written to a log: not UTF-8 replaced, control characters escaped (a
/// topic is whatever a client sent; it must not forge log lines).
pub(crate) fn loggable_topic(topic: &[u8]) -> String {
    String::from_utf8_lossy(topic).escape_debug().to_string()
}

/// A broker refused a message or it could not be sent to it: counted, and logged at most once
/// per reason every 10 s with the number of rejections the line stands for (a filter like
/// `$SYS/#` that a broker refuses would otherwise write a line per message).
pub(crate) fn message_rejected(stats: &LinkStats, topic: &[u8], reason: &str) {
    inc(&stats.rejected);
    // Reasons that only differ by a number (a size) share one key.
    let key: String = reason.chars().filter(|c| !c.is_ascii_digit()).collect();
    let logged = stats
        .reject_log
        .lock()
        .map(|mut l| l.event(&key, std::time::Instant::now()))
        .unwrap_or(Some(0));
    if let Some(more) = logged {
        tracing::warn!(
            topic = %loggable_topic(topic),
            reason,
            rejected_since_last_line = more,
            "message rejected by broker, skipped for this target (logged at most once per reason every 10 s)"
        );
    }
}

/// The mesh's session on this broker was gone when the consumer connected again (see
/// [`SESSION_LOST`]): counted and logged.
pub(crate) fn session_lost(stats: &LinkStats) {
    inc(&stats.session_lost);
    tracing::error!(
        "the broker had no session for the mesh although this process had one there: it expired, the broker lost it (restarted without persistence?), or another client connected with its client id and a clean session (set a mesh key: docs/SECURITY.md); what it held for the bridge is lost"
    );
}

/// The consumer's session was taken over by no instance of the mesh (see [`SESSION_TAKEN`]),
/// `ago`: counted and logged.
pub(crate) fn session_taken(stats: &LinkStats, ago: std::time::Duration) {
    inc(&stats.session_taken);
    tracing::error!(
        ago = ?ago,
        "the broker closed the connection that consumed it and no instance of the mesh claims it: another client connected with the mesh's client id and took the session over (what it received is lost to the mesh; set a mesh key: docs/SECURITY.md), or the broker restarted within a second"
    );
}

/// A control payload of `kind` on `topic` was refused (see `seal`): counted, and logged at
/// most once per kind every 10 s with the number of refusals the line stands for (a flood
/// of forged records costs a counter each, not a line each).
pub(crate) fn control_rejected(
    stats: &LinkStats,
    kind: crate::seal::ControlKind,
    topic: &[u8],
    why: crate::seal::Rejected,
) {
    inc(&stats.control_rejected[kind.index()]);
    let logged = stats
        .reject_log
        .lock()
        .map(|mut l| {
            l.event(
                &format!("control: {}", kind.as_str()),
                std::time::Instant::now(),
            )
        })
        .unwrap_or(Some(0));
    if let Some(more) = logged {
        tracing::warn!(
            kind = kind.as_str(),
            topic = %loggable_topic(&topic[..topic.len().min(120)]),
            %why,
            refused_since_last_line = more,
            "control payload refused: not sealed with this mesh's key, or stale (a client forging or replaying the mesh's records? see docs/SECURITY.md; logged at most once per kind every 10 s)"
        );
    }
}

/// A message was set aside for this target (see `spool::dead`): counted, and logged with its
/// origin, the start of its topic and its size — at most once per reason every 10 s, with the
/// number of letters the line stands for (`bridge dead-letters` lists every one).
pub(crate) fn dead_letter(
    stats: &LinkStats,
    origin: &str,
    topic: &[u8],
    size: usize,
    reason: &str,
) {
    inc(&stats.dead_letters);
    let key: String = reason.chars().filter(|c| !c.is_ascii_digit()).collect();
    let logged = stats
        .reject_log
        .lock()
        .map(|mut l| l.event(&format!("dead letter: {key}"), std::time::Instant::now()))
        .unwrap_or(Some(0));
    if let Some(more) = logged {
        let shown = &topic[..topic.len().min(80)];
        tracing::warn!(
            origin,
            topic_starts = %loggable_topic(shown),
            topic_bytes = topic.len(),
            size,
            reason,
            set_aside_since_last_line = more,
            "message set aside for this target (dead letter; see `bridge dead-letters`): the link goes on with the next one"
        );
    }
}

/// Whether an event counter that just grew by `added` to `total` is to be logged: the first
/// time, and each time it passes a multiple of 1000, so a long outage does not flood the log.
pub(crate) fn sampled(total: u64, added: u64) -> bool {
    total == added || total % 1000 < added
}

/// A target queue overflowed: the oldest message was dropped.
pub(crate) fn queue_overflow(stats: &LinkStats, dropped: u64) {
    let total = stats.dropped_overflow.fetch_add(dropped, Ordering::Relaxed) + dropped;
    if sampled(total, dropped) {
        tracing::warn!(
            dropped_total = total,
            "target queue full: oldest messages dropped"
        );
    }
}

/// A spooled message got no copy on its origin broker because too many copies wait for that
/// broker already (see `park`): it is acknowledged once on disk.
pub(crate) fn park_skipped(stats: &LinkStats, origin: &str) {
    let total = stats.park_skipped.fetch_add(1, Ordering::Relaxed) + 1;
    if sampled(total, 1) {
        tracing::warn!(
            origin,
            skipped_total = total,
            "origin broker behind on park copies: spooled message kept on this host's disk only"
        );
    }
}

/// A QoS 0 message met a full spool with the `block` policy: it cannot hold its origin back
/// (QoS 0 is never acknowledged), so it is dropped and counted as an overflow.
pub(crate) fn spool_full_qos0_dropped(stats: &LinkStats) {
    let total = stats.dropped_overflow.fetch_add(1, Ordering::Relaxed) + 1;
    if sampled(total, 1) {
        tracing::warn!(
            dropped_total = total,
            "spool full: QoS 0 message dropped (spool_overflow = \"block\" holds back QoS 1 and 2 only)"
        );
    }
}

/// A link (re)connection failed or dropped: logged, counted, remembered for `status`.
pub(crate) fn link_error(stats: &LinkStats, error: &str, retry_in: std::time::Duration) {
    stats.set_error(error.to_string());
    tracing::warn!(error, retry_in = ?retry_in, "link down");
}

/// The storm guard tripped on a link: logged (once per message and window), counted, and
/// shown in `status` as the link's last error.
pub(crate) fn storm(stats: &LinkStats, topic: &[u8], first: bool, threshold: u32) {
    inc(&stats.dropped_storm);
    if first {
        let error = format!(
            "possible message loop: the same message on \"{}\" arrived more than {threshold} times within 10s; dropping repeats",
            loggable_topic(topic)
        );
        tracing::warn!(%error);
        stats.set_error(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_and_every_thousandth_event_is_logged() {
        let logged: Vec<u64> = (1..=3001).filter(|&t| sampled(t, 1)).collect();
        assert_eq!(logged, vec![1, 1000, 2000, 3000]);
        assert!(sampled(5, 5), "a first batch");
        assert!(
            sampled(1002, 5) && !sampled(1007, 5),
            "a batch that passes 1000"
        );
    }

    #[test]
    fn topics_in_logs_cannot_forge_lines() {
        assert_eq!(loggable_topic(b"a/b"), "a/b");
        assert_eq!(loggable_topic(b"a\nWARN forged\r"), "a\\nWARN forged\\r");
        assert_eq!(loggable_topic(b"x\x1b[31m"), "x\\u{1b}[31m");
        assert_eq!(loggable_topic(b"\xff"), "\u{fffd}");
    }
}
